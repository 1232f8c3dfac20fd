"""`python -m bench`'s bookkeeping: which sections run, which are kept from earlier results.

The measurements themselves are replaced by fakes that note their calls: what is checked is
that a rerun runs the sections named and only those, and keeps the rest as they were.
"""

from __future__ import annotations

import json
from collections import defaultdict

import pytest

import bench.__main__ as main
from bench.report import _header as report_header


@pytest.fixture
def calls(monkeypatch):
    """Every measurement the run starts, by name, each returning a figure of its own."""
    made: list[str] = []

    def measured(name):
        def measure(*args, **kwargs):
            made.append(name)
            return {"figure": f"{name} #{made.count(name)}"}

        return measure

    monkeypatch.setattr(main, "isolated", lambda target, **kw: measured(target)())
    monkeypatch.setattr(main, "_analysis", measured("analysis"))
    for module in ("rate", "s3", "families", "video", "view"):
        monkeypatch.setattr(getattr(main, module), "figures", measured(module))
    return made


def test_a_rerun_runs_the_sections_named_and_keeps_the_others(tmp_path, calls):
    results, report = tmp_path / "results.json", ["--output", str(tmp_path / "report.md")]
    first = main.run(main._parse(["--json", str(results), *report]))
    assert "bench.common:machine" in calls and "analysis" in calls
    assert json.loads(results.read_text())["done"] == first["done"]

    calls.clear()
    argv = ["--rerun", "machine", "analysis", "--resume", str(results), "--json", str(results)]
    again = main.run(main._parse([*argv, *report]))
    assert sorted(calls) == ["analysis", "bench.common:machine"]
    assert again["machine"] == {"figure": "bench.common:machine #1"}
    assert again["rows"] == first["rows"] and again["rate"] == first["rate"]
    assert again["done"].keys() == first["done"].keys()
    assert json.loads(results.read_text())["analysis"] == again["analysis"]
    # The report is still the first run's, saying what was measured again since.
    assert (again["command"], again["date"]) == (first["command"], first["date"])
    assert again["reruns"][-1]["sections"] == ["machine", "analysis"]
    header = report_header(again | {"machine": defaultdict(str)})
    assert f"Rerun since by `{again['reruns'][-1]['command']}` on " in header


def test_a_rerun_of_a_section_the_results_lack_names_those_they_have(tmp_path, calls):
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"done": {"machine": True, "rate": True}}))
    argv = ["--rerun", "rate", "speed", "--resume", str(results), "--output", "r.md"]
    with pytest.raises(SystemExit, match=r"--rerun speed: not a section .*: machine, rate$"):
        main.run(main._parse(argv))
    assert calls == []
    assert json.loads(results.read_text()) == {"done": {"machine": True, "rate": True}}


def test_the_report_of_record_keeps_its_results_beside_it():
    assert main._parse([]).json == main.DEFAULT_RESULTS
    rerun = main._parse(["--rerun", "view"])
    assert rerun.resume == rerun.json == main.DEFAULT_RESULTS
    assert main._parse(["--quick"]).json is None
    with pytest.raises(SystemExit):  # a report elsewhere: nothing to keep by default
        main._parse(["--rerun", "view", "--output", "elsewhere.md"])
