"""The `attnscope` command: its verbs, and one line with exit status 2 for every user error."""

from __future__ import annotations

import shutil
import sys

import pytest
from synthetic_trace import Run

from analysis.cli import main


def test_bad_stores_exit_non_zero(make_store, tmp_path, capsys, run_cli):
    status, _, err = run_cli("info", tmp_path / "nothing.zarr")
    assert status == 2 and "does not exist" in err
    path, _ = make_store(Run(), version=99)
    status, _, err = run_cli("info", path)
    assert status == 2 and "format version 99" in err


@pytest.mark.parametrize("verb", ["info", "heatmap", "heads", "steps"])
def test_a_file_or_a_damaged_store_is_one_line_and_exit_2(store, tmp_path, capsys, verb, run_cli):
    path, _ = store
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a store")
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(path, damaged)
    (damaged / "zarr.json").write_text('{"zarr_format": 3, "node_ty')
    for target, words in ((a_file, "is a file, not a trace store"), (damaged, "not valid JSON")):
        figure = () if verb == "info" else ("--span", "cat", "-o", tmp_path / "x.png")
        status, _, err = run_cli(verb, target, *figure)
        assert status == 2
        assert words in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.png").exists()


def test_record_without_the_tracer_says_how_to_install_it(monkeypatch, capsys, run_cli):
    # A None entry makes `import tracer.cli` raise ImportError, as on a machine without torch.
    monkeypatch.setitem(sys.modules, "tracer.cli", None)
    status, _, err = run_cli("record", "--demo", "--out", "x.zarr")
    assert status == 2
    assert "pip install -e '.[tracer]'" in err


def test_help_lists_every_verb(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for verb in ("info", "heatmap", "heads", "steps", "record"):
        assert verb in out
