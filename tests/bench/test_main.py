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


def test_a_resumed_report_measures_what_it_lacks_and_says_so(tmp_path, calls):
    results, report = tmp_path / "results.json", ["--output", str(tmp_path / "report.md")]
    first = main.run(main._parse(["--json", str(results), *report]))
    # A section this bench added after the report was written: the report lacks it.
    kept = json.loads(results.read_text())
    del kept["done"]["slow disk"], kept["slow_disk"]
    results.write_text(json.dumps(kept))
    calls.clear()
    again = main.run(main._parse(["--resume", str(results), "--json", str(results), *report]))
    assert calls == ["bench.slow_disk:measure"]
    assert again["slow_disk"] == {"figure": "bench.slow_disk:measure #1"}
    # Still the first run's report, saying what was measured since.
    assert (again["command"], again["date"]) == (first["command"], first["date"])
    assert again["reruns"][-1]["sections"] == ["slow disk"]
    # Resumed again, it lacks nothing: nothing is measured, nothing said.
    calls.clear()
    third = main.run(main._parse(["--resume", str(results), "--json", str(results), *report]))
    assert calls == [] and third["reruns"] == again["reruns"]


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


def _gpu_figures() -> dict:
    """What `python -m bench.gpu --json` writes on a GPU box, with round numbers."""
    return {
        "geometry": {"name": "flux-dev-gpu", "device": "cuda"},
        "device": "NVIDIA H200",
        "cuda_tests": {"returncode": 0, "summary": "5 passed", "failed": []},
        "capture_per_call": {
            "kernel": "cuda_cudnn",
            "chunks": {"256": {"seconds": 0.002}, "512": {"seconds": 0.0015}},
            "attention_seconds": 0.0004,
            "gemm": {
                "float32_seconds": 0.00025,
                "out_dtype_seconds": 0.00004,
                "out_dtype_max_abs_error": 2e-5,
                "logit_scale": 70.0,
            },
        },
        "traced_over_untraced": 5.5,
        "traced_over_untraced_first_run": 5.0,
        "traced_over_untraced_later_run": 6.0,
        "median_wall": {"untraced": 5.0, "attnscope": 27.5},
        "breakdown": {
            "wall": 28.0, "writer_put": 18.0, "capture_device": 2.5, "attention_device": 0.7
        },
        "gpu_memory_added_bytes": 92e6,
        "bytes_written": 24e9,
        "token_rows": 45,
        "lse_used": {"kernel": 1596, "recompute": 0},
        "decoded_bytes": 56e9,
        "decoded_gb_s": 2.0,
        "pinning_seconds_per_gib": 0.4,
    }  # fmt: skip


def test_a_gpu_box_s_figures_are_filed_into_the_report(tmp_path):
    results, report, figures = (tmp_path / name for name in ("r.json", "r.md", "gpu.json"))
    results.write_text((main.DEFAULT_RESULTS).read_text())
    figures.write_text(json.dumps(_gpu_figures()))
    paths = ["--results", str(results), "--output", str(report)]
    assert main.main(["gpu", str(figures), "--at", "abc1234", *paths]) == 0
    filed = json.loads(results.read_text())
    assert filed["gpu_box"]["at"] == "abc1234"
    assert filed["gpu_box"]["traced_over_untraced"] == 5.5
    assert filed["reruns"][-1]["sections"] == ["gpu box"]
    text = report.read_text()
    row = "| tracing overhead, FLUX.1-dev shape on an NVIDIA H200 (`python -m bench.gpu`) |"
    assert f"{row} ≤ 1.10 | 5.500 | **missed** |" in text
    assert "**GPU at FLUX.1-dev's shape: 5.50 on an NVIDIA H200 (missed; target 1.10).**" in text
    assert "put() held the generation 18.0 s" in text
    # What bench.gpu measures since: the host's cores and disk, and a deeper writer queue.
    host = {
        "host": {"cores": 16, "disk_sync_mb_s": 1742.0},
        "median_cpu": {"attnscope": 137.5},
        "bytes_per_value": 1.71,
        "capture_per_call": _gpu_figures()["capture_per_call"]
        | {
            "padding_row": {
                "blocks": {"seconds": 0.0015, "max_relative_error": 2e-6},
                "fused": {"error": "no kernel"},
            }
        },
        "deeper_writer": {"max_pending_steps": 8, "traced_over_untraced": 1.5},
        "keepbits": 7,
        "keepbits_9": {
            "traced_over_untraced": 1.3,
            "bytes_written": 15.0e9,
            "bytes_per_value": 1.67,
        },
    }
    figures.write_text(json.dumps(_gpu_figures() | host))
    assert main.main(["gpu", str(figures), "--at", "abc1234", *paths]) == 0
    text = report.read_text()
    assert "The host: 16 cores, its disk syncing 1,742 MB/s; a traced run kept 5.0 of" in text
    assert "With 8 steps in flight instead of 2: 1.50." in text
    assert "instead of the default's 7 (`--keepbits 9`): 1.30, 15.0 GB written (1.67 bytes" in text
    assert "the capture with the padding row from blocks 1.500 ms, largest error 2.0e-06" in text
    assert "the padding row from fused kernels failed there: no kernel" in text
    # And since: the disk written as the writer writes, and whether the allocator's settings held.
    host["host"] |= {"disk_sync_mb_s_4_files": 3105.0}
    allocator = {"allocator_tuned": False, "malloc_arenas": 3, "page_faults_per_gb_decoded": 2.5e5}
    figures.write_text(json.dumps(_gpu_figures() | host | allocator))
    assert main.main(["gpu", str(figures), "--at", "abc1234", *paths]) == 0
    text = report.read_text()
    assert "in 64 MiB writes, as the writer's shards are, synced 3,105 MB/s." in text
    assert "Pinning host memory afresh took 0.40 s per GiB." in text
    # And since: pinning by registering pages several threads faulted in.
    registered = {"pinning_registered": {"threads": 16, "seconds_per_gib": 0.05}}
    copies = {"copy_off_gb_s": 24.5}
    figures.write_text(json.dumps(_gpu_figures() | host | allocator | registered | copies))
    assert main.main(["gpu", str(figures), "--at", "abc1234", *paths]) == 0
    text = report.read_text()
    assert "took 0.40 s per GiB, 0.05 s with its pages faulted in by 16 threads and" in text
    assert "on a stream of its own as the writer's, ran at 24.5 GB/s." in text
    assert "With fsync off" not in text  # not measured before
    unsynced = {"unsynced": {"traced_over_untraced": 1.12, "wall": 5.5, "cpu": 60.0}}
    figures.write_text(json.dumps(_gpu_figures() | host | allocator | unsynced))
    assert main.main(["gpu", str(figures), "--at", "abc1234", *paths]) == 0
    assert "With fsync off (`--no-fsync`, its steps left in the page cache): 1.12." in (
        report.read_text()
    )
    assert "at a power of two" not in text  # pinned_at_size not said: figures from before
    older_torch = {"pinned_at_size": False}
    figures.write_text(json.dumps(_gpu_figures() | host | allocator | registered | older_torch))
    assert main.main(["gpu", str(figures), "--at", "abc1234", *paths]) == 0
    assert (
        "(its torch pins every block at a power of two: no `pinned_max_round" in report.read_text()
    )
    refused = {"pinning_registered": {"threads": 16, "error": "RuntimeError: unknown"}}
    figures.write_text(json.dumps(_gpu_figures() | host | allocator | refused))
    assert main.main(["gpu", str(figures), "--at", "abc1234", *paths]) == 0
    assert "registered instead, refused there: RuntimeError: unknown." in report.read_text()
    assert "settings (analysis.allocator) did not hold: 3 malloc arena(s) after the" in text
    assert "250,000 page faults per decoded GB" in text
    # The writer alone on the box's cores.
    run = {"decoded_mb_s": 9876.0}
    alone = {
        "writer_alone": {
            "cores": 16,
            "steps": 8,
            "step_bytes": 1.165e9,
            "runs": {"2 steps in flight, unthrottled": run, "8 steps in flight, paced": run},
        }
    }
    figures.write_text(json.dumps(_gpu_figures() | host | allocator | alone))
    assert main.main(["gpu", str(figures), "--at", "abc1234", *paths]) == 0
    text = report.read_text()
    assert "The writer alone on the host's 16 cores (8 steps of 1.17 GB decoded" in text
    assert "2 steps in flight, unthrottled 9,876 MB/s, 8 steps in flight, paced 9,876" in text
    assert "an H100's step needs 7,767 MB/s." in text
    # What record --estimate predicted there, and a probe that could not be made.
    assert "probe of the writer there" not in text  # not measured before
    rate = {"step_seconds": 0.174, "write_rate": 4.2e9, "write_ratio": 1.71, "write_error": None}
    figures.write_text(json.dumps(_gpu_figures() | {"estimate": rate}))
    assert main.main(["gpu", str(figures), "--at", "abc1234", *paths]) == 0
    assert (
        "`record --estimate`'s probe of the writer there sustained 4.20 GB/s decoded: at the "
        "untraced generation's 0.174 s a step it predicted at least 1.71."
    ) in report.read_text()
    full = {"step_seconds": 0.174, "write_rate": None, "write_ratio": None}
    full["write_error"] = "OSError: [Errno 28] No space left on device"
    figures.write_text(json.dumps(_gpu_figures() | {"estimate": full}))
    assert main.main(["gpu", str(figures), "--at", "abc1234", *paths]) == 0
    assert "`record --estimate` could not probe the writer there: OSError: [Errno 28]" in (
        report.read_text()
    )
    # A capture that could not be measured there leaves the rest of the box's figures.
    failed = {"capture_per_call": {"error": "RuntimeError: no kernel"}}
    figures.write_text(json.dumps(_gpu_figures() | host | allocator | failed))
    assert main.main(["gpu", str(figures), "--at", "abc1234", *paths]) == 0
    text = report.read_text()
    assert "measuring one call's capture failed there: RuntimeError: no kernel." in text
    assert "The host: 16 cores" in text


def test_figures_of_a_smoke_run_are_refused(tmp_path, capsys):
    figures = tmp_path / "gpu.json"
    figures.write_text(json.dumps(_gpu_figures() | {"geometry": {"device": "cpu"}}))
    with pytest.raises(SystemExit):
        main.main(["gpu", str(figures), "--at", "abc1234", "--results", str(tmp_path / "r")])
    assert "not the figures of a GPU run" in capsys.readouterr().err


def test_the_compressor_section_says_what_each_kept_bit_costs():
    from bench.report import _codecs

    codec = {"codec": "blosc lz4-5 bitshuffle", "encode_mb_s": 1e3, "decode_mb_s": 1.6e3}
    results = {
        "codecs": {
            "chunks": 30,
            "decoded_bytes": 12e6,
            "codecs": [codec | {"bytes_per_value": 1.674}],
            # As JSON gives them back: the keepbits as strings.
            "bytes_per_value_by_keepbits": {"9": 1.670, "7": 1.419},
        }
    }
    text = _codecs(results)
    assert "| blosc lz4-5 bitshuffle | 1,000 MB/s | 1,600 MB/s | 1.674 B |" in text
    assert "| 9 | 2^-10 = 9.77e-04 | 1.670 B |" in text
    assert "| 7 | 2^-8 = 3.91e-03 | 1.419 B |" in text
    # Results from before the keepbits were measured render without the table.
    del results["codecs"]["bytes_per_value_by_keepbits"]
    assert "relative error bound" not in _codecs(results)
