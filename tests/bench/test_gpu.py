"""bench.gpu is run on a GPU box only now and then: its code path is kept working here."""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
import re
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from bench.gpu import CUDA_TESTS, ROOT, cuda_tests, install, main, requires


def test_the_smoke_run_writes_every_figure(tmp_path):
    out = tmp_path / "gpu.json"
    assert main(["--smoke", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["geometry"]["name"] == "quick"
    assert figures["traced_over_untraced"] > 0
    # The first traced run in the process and a later one, each against its own pair.
    first = figures["traced_over_untraced_first_run"]
    later = figures["traced_over_untraced_later_run"]
    assert first > 0 and later > 0
    assert figures["traced_over_untraced"] == pytest.approx((first + later) / 2)  # two pairs
    assert figures["bytes_written"] > 0
    # A 6-word prompt: its tokens, </s> and the padding row.
    assert figures["token_rows"] >= 7
    layers = figures["geometry"]["num_layers"] + figures["geometry"]["num_single_layers"]
    grid = (figures["geometry"]["height"] // 16) * (figures["geometry"]["width"] // 16)
    per_row = figures["geometry"]["steps"] * layers * figures["geometry"]["num_attention_heads"]
    assert figures["decoded_bytes"] == 2 * per_row * figures["token_rows"] * grid * 4
    assert figures["decoded_gb_s"] > 0
    assert 0 < figures["bytes_per_value"] < 4
    assert figures["host"]["cores"] >= 1 and figures["host"]["disk_sync_mb_s"] > 0
    assert figures["host"]["disk_sync_mb_s_4_files"] > 0
    assert figures["median_cpu"]["attnscope"] > 0
    # Whether the allocator's settings held: a smoke run leaves the suite's process as it is.
    assert figures["allocator_tuned"] is False
    assert figures["page_faults_per_gb_decoded"] > 0
    assert figures["malloc_arenas"] >= 1
    # The writer alone, fed real maps: 3 steps of 3 layers here, with 2 and more in flight.
    alone = figures["writer_alone"]
    assert alone["steps"] == 3 and alone["step_bytes"] == 2 * 3 * 24 * 26 * 64 * 64 * 4
    assert set(alone["runs"]) == {
        f"{pending} steps in flight, {how}"
        for pending in {2, figures["deeper_writer"]["max_pending_steps"]}
        for how in ("unthrottled", "paced")
    }
    for run in alone["runs"].values():
        assert run["decoded_mb_s"] > 0 and run["stored_bytes"] > 0
    deep = figures["deeper_writer"]
    assert deep["max_pending_steps"] >= 2 and deep["traced_over_untraced"] > 0
    # A float32 model keeps 9 bits by default: the run keeping 9 whatever the dtype stores alike.
    assert figures["keepbits"] == 9
    nine_bits = figures["keepbits_9"]
    assert nine_bits["traced_over_untraced"] > 0
    assert nine_bits["bytes_per_value"] == pytest.approx(figures["bytes_per_value"], rel=0.02)
    assert figures["unsynced"]["traced_over_untraced"] > 0 and figures["unsynced"]["wall"] > 0
    # What record --estimate predicts of the traced runs, at the untraced run's step time.
    estimate = figures["estimate"]
    assert estimate["write_rate"] > 0 and estimate["write_ratio"] >= 1.0
    assert estimate["write_error"] is None
    untraced = figures["median_wall"]["untraced"]
    assert estimate["step_seconds"] == pytest.approx(untraced / figures["geometry"]["steps"])
    # Every traced call took its normalisers from the kernel: 3 layers x 2 steps.
    assert figures["lse_used"] == {"kernel": 6, "recompute": 0}
    assert figures["gpu_memory_added_bytes"] is None  # no CUDA here
    assert figures["pinning_seconds_per_gib"] is None
    assert figures["pinning_registered"] is None
    assert figures["copy_off_gb_s"] is None
    assert figures["pinned_at_size"] is False  # a smoke run leaves the suite's process as it is
    # The device's seconds in the capture and in the model's attention (on the CPU, the same
    # calls' host time: the host's clock wraps the device's).
    parts = figures["breakdown"]
    assert 0 < parts["capture"] <= parts["capture_device"] < parts["wall"]
    assert 0 < parts["attention_device"] < parts["wall"]


def test_a_capture_that_cannot_be_measured_does_not_stop_the_pairs(tmp_path, monkeypatch):
    import bench.capture_cost

    def fail(*args, **kwargs):
        raise RuntimeError("no lse kernel")

    monkeypatch.setattr(bench.capture_cost, "measure", fail)
    out = tmp_path / "gpu.json"
    assert main(["--smoke", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["capture_per_call"] == {"error": "RuntimeError: no lse kernel"}
    assert figures["traced_over_untraced"] > 0


def test_what_was_measured_before_a_failure_is_kept(tmp_path, monkeypatch):
    import bench.overhead

    def fail(*args, **kwargs):
        raise RuntimeError("the traced runs failed")

    monkeypatch.setattr(bench.overhead, "measure", fail)
    out = tmp_path / "gpu.json"
    with pytest.raises(RuntimeError, match="the traced runs failed"):
        main(["--smoke", "--json", str(out)])
    figures = json.loads(out.read_text())
    assert figures["capture_per_call"]["attention_seconds"] > 0
    assert "traced_over_untraced" not in figures


def test_the_capture_per_call_is_counted_measured_and_checked():
    from bench.capture_cost import CHUNK_SIZES, measure, work
    from bench.common import GEOMETRIES

    geo = GEOMETRIES["flux-dev-gpu"]
    # Counted by hand for FLUX.1-dev at 1024² (24 heads of 128, 512 text + 4096 image tokens)
    # and a 20-word prompt's 26 rows: 4·H·T·I·(D + rows), 4·H·N²·D, two [H, T, I] float32 blocks.
    assert work(geo) == {
        "capture_flop": 31_004_295_168,
        "attention_flop": 260_919_263_232,
        "block_bytes": 402_653_184,
    }
    got = measure(GEOMETRIES["quick"], repeats=2)
    assert got["kernel"] == "cpu_flash"
    assert got["bit_identical_to_sdpa"] is True
    assert got["attention_seconds"] > 0
    assert set(got["chunks"]) == set(CHUNK_SIZES)
    for chunk in got["chunks"].values():
        assert chunk["seconds"] > 0
        assert chunk["max_relative_error"] < 1e-4  # float32 against float64
    assert "gemm" not in got  # CUDA only
    # The padding row from blocks and from fused kernels (the CPU's flash kernel here).
    for way in ("blocks", "fused"):
        assert got["padding_row"][way]["seconds"] > 0
        assert got["padding_row"][way]["max_relative_error"] < 1e-4


def test_it_runs_every_cuda_test_whose_imports_it_carries():
    marked = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "tests").rglob("test_*.py")
        if re.search(r"^\s*@pytest\.mark\.cuda$|marks=pytest\.mark\.cuda\b", path.read_text(), re.M)
    }
    # The one left out imports DiffSynth-Studio, whose wheels the box is not given.
    assert marked == {*CUDA_TESTS, "tests/tracer/adapters/test_diffsynth_flux.py"}
    for path in CUDA_TESTS:
        assert "diffsynth" not in (ROOT / path).read_text()


def test_the_cuda_tests_are_run_and_reported():
    got = cuda_tests()  # no CUDA here: each is collected and skipped
    assert got["returncode"] == 0 and got["failed"] == []
    assert "skipped" in got["summary"] and "deselected" in got["summary"]


def test_the_wheels_it_carries_cover_what_the_tracer_imports_and_leave_torch():
    pins = {pin.split("==")[0].lower() for pin in requires()}
    needed = {"diffusers", "transformers", "tokenizers", "zarr", "zarrs", "numcodecs", "xarray"}
    assert needed | {"dask", "pytest", "pluggy"} <= pins
    assert not pins & {"torch", "torchvision", "numpy", "attnscope"}
    # Installed here for the S3 tests and imported by accelerate when present; never by a trace.
    assert not pins & {"boto3", "botocore", "s3transfer", "jmespath"}
    # Loaded by diffusers, transformers and numcodecs when installed; a trace runs without them.
    assert not pins & {"peft", "sentencepiece", "msgpack"}


def _wheel(folder: Path, name: str, module: str, source: str) -> Path:
    """A minimal pure-Python wheel of distribution `name` 1.0 holding `module`.py."""
    info = f"{name}-1.0.dist-info"
    files = {
        f"{module}.py": source,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    files[f"{info}/RECORD"] = "\n".join([*record, f"{info}/RECORD,,"]) + "\n"
    wheel = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


def test_carried_wheels_install_beside_the_box_s_python_and_import(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # install() puts its folder first
    carried = tmp_path / "wheels"
    carried.mkdir()
    _wheel(carried, "attnscope_carried_probe", "attnscope_carried_probe", "VALUE = 7\n")
    # torch's own distributions (numpy, which torchvision requires) are left to the box's.
    _wheel(carried, "numpy", "numpy_carried_by_mistake", "VALUE = 0\n")
    # Any other the box has too (xarray, here) is shadowed by the carried one.
    _wheel(carried, "xarray", "xarray_carried_probe", "VALUE = 3\n")
    site = tmp_path / "site"
    install(carried, site)
    assert sys.path[0] == str(site)
    assert importlib.import_module("attnscope_carried_probe").VALUE == 7
    assert not (site / "numpy_carried_by_mistake.py").exists()
    assert metadata.version("numpy") != "1.0"
    assert importlib.import_module("xarray_carried_probe").VALUE == 3
    assert metadata.version("xarray") == "1.0"
