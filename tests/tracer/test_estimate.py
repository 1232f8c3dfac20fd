"""`record --estimate` and `tracer.estimate`: the cost said before recording is what is recorded."""

from __future__ import annotations

import importlib
import json
import re
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch
import zarr

import tracer
from analysis.cli import main
from tracer.demo import demo_pipeline
from tracer.estimate import MEASURED_BYTES_PER_VALUE, estimate

CALL = {
    "prompt": "a cat on a red chair",
    "num_inference_steps": 3,
    "height": 96,
    "width": 160,
    "max_sequence_length": 32,
}


def test_the_estimate_is_the_size_of_the_recording(tmp_path):
    pipe = demo_pipeline(seed=0, max_sequence_length=32)
    options = {"heads": "1:3", "steps": "0,2", "directions": ["txt2img"], "keep_tokens": (8, 12)}
    cost = estimate(pipe, CALL, keepbits=None, **options)
    with tracer.trace(pipe, tmp_path / "t.zarr", keepbits=None, progress=False, **options) as rec:
        pipe(**CALL, generator=torch.Generator().manual_seed(0), output_type="latent")
    stored = zarr.open_group(tmp_path / "t.zarr", path=rec.last_run, mode="r")["txt2img"]
    assert stored.shape == (cost.steps, cost.layers, cost.heads, cost.rows, *cost.grid)
    assert cost.generation_bytes == stored.nbytes
    assert cost.stored_bytes == cost.generation_bytes  # lossless: no compression counted on


@pytest.mark.parametrize("family", ["wan", "cogvideox", "sana", "hidream"])
def test_another_familys_estimate_is_the_size_of_the_recording(tmp_path, family):
    from tracer.cli import load_demo

    pipe = load_demo(family, seed=0, **({} if family == "sana" else {"max_sequence_length": 16}))
    call = {"prompt": "a cat", "num_inference_steps": 2, "height": 48, "width": 64}
    call |= {"max_sequence_length": 16}
    grid = (3, 3, 4)
    if family == "sana":  # 32 pixels a token
        call |= {"height": 96, "width": 128, "use_resolution_binning": False}
        grid = (3, 4)
    elif family == "hidream":  # the pipeline scales 48 x 64 to its area, 128²: 96 x 144
        grid = (6, 9)
    else:
        call |= {"num_frames": 9}  # three latent frames
    cost = estimate(pipe, call, keepbits=None)
    with tracer.trace(pipe, tmp_path / "t.zarr", keepbits=None, progress=False) as rec:
        pipe(**call, generator=torch.Generator().manual_seed(0), output_type="latent")
    run = zarr.open_group(tmp_path / "t.zarr", path=rec.last_run, mode="r")
    stored = [run[d] for d in ("txt2img", "img2txt") if d in run]
    assert cost.grid == grid and len(cost.directions) == len(stored)
    assert stored[0].shape == (cost.steps, cost.layers, cost.heads, cost.rows, *cost.grid)
    assert cost.generation_bytes == sum(array.nbytes for array in stored)


def test_fewer_kept_bits_are_estimated_to_store_fewer_bytes():
    pipe = demo_pipeline(seed=0, max_sequence_length=32)
    stored = {bits: estimate(pipe, CALL, keepbits=bits).stored_bytes for bits in (5, 7, 9, 12)}
    assert stored[5] < stored[7] < stored[9] < stored[12]
    cost = estimate(pipe, CALL, keepbits=7)
    assert cost.stored_bytes == pytest.approx(cost.generation_bytes / 4 * 1.42)
    assert cost.disk_rate_needed == pytest.approx(cost.stored_bytes / 3 / 0.15)


def test_the_estimate_keeps_the_models_precision_as_a_recording_does():
    bf16 = demo_pipeline(seed=0, max_sequence_length=32, dtype=torch.bfloat16)
    cost = estimate(bf16, CALL)
    assert cost.keepbits == 7
    assert cost.stored_bytes == pytest.approx(cost.generation_bytes / 4 * 1.42)
    assert estimate(bf16, CALL, keepbits=9).keepbits == 9
    assert estimate(demo_pipeline(seed=0, max_sequence_length=32), CALL).keepbits == 9


def test_the_estimates_bytes_per_value_are_the_benchmarks():
    """The estimate's figures are the compressor benchmark's last measurement."""
    report = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.json"
    measured = json.loads(report.read_text())["codecs"]
    by_keepbits = {int(k): v for k, v in measured["bytes_per_value_by_keepbits"].items()}
    assert by_keepbits.keys() == MEASURED_BYTES_PER_VALUE.keys()
    for keepbits, value in by_keepbits.items():
        assert MEASURED_BYTES_PER_VALUE[keepbits] == pytest.approx(value, abs=0.005)


def test_record_estimate_prints_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "e.zarr"
    assert main(["record", "--demo", "--estimate", "--num-steps", "2", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "maps: 5 layers × 4 heads × " in said and "2 steps" in said
    assert "decoded, about " in said and "/s to disk, at 0.15 s a step" in said
    assert "on disk (9 mantissa bits kept, relative error <= 2^-10)" in said  # a float32 demo
    assert "the disk it goes to synced " in said  # probed beside the store, and removed
    assert "the writer, on this host's cores and disk alone, sustained " in said  # likewise
    assert list(tmp_path.iterdir()) == []


FLUX_DEV = {
    "layers": 57,
    "heads": 24,
    "rows": 26,
    "grid": (64, 64),
    "steps": 28,
    "directions": ("txt2img", "img2txt"),
    "keepbits": 7,
    "step_seconds": 0.15,
}


@pytest.mark.parametrize("disk_gb_s", [1.742, 2.5, 4.0])
def test_the_estimate_says_how_long_a_slower_disk_would_hold_the_generation(disk_gb_s):
    cost = tracer.Estimate(
        **FLUX_DEV,
        disk_rate=disk_gb_s * 1e9,
    )
    # By hand: 57 × 24 × 26 × 4096 values a step and direction, 1.42 bytes each on disk.
    stored = 28 * 2 * 57 * 24 * 26 * 4096 * 1.42
    expected = max(1.0, stored / (disk_gb_s * 1e9) / (28 * 0.15))
    assert cost.disk_ratio == pytest.approx(expected)
    said = str(cost).splitlines()[-1]
    assert said.startswith(f"the disk it goes to synced {disk_gb_s:.2f} GB/s in a probe: ")
    if expected > 1:
        assert f"take about {expected:.2f}× as long as untraced, or longer" in said
        assert "or fsync off, whose listed steps survive a crash of the process" in said
    else:
        assert said.endswith(": it keeps up")


def test_an_estimate_probes_a_local_disk_only(tmp_path, monkeypatch):
    pipe = demo_pipeline(seed=0, max_sequence_length=32)
    assert estimate(pipe, CALL).disk_rate is None
    assert estimate(pipe, CALL, out="s3://bucket/run.zarr").disk_rate is None
    probed: list[tuple] = []

    def disk_sync_rate(folder, nbytes, *, files, block_bytes):
        probed.append((folder, nbytes, files, block_bytes))
        return 5e8

    # The module: `tracer.estimate` as an attribute is the function.
    monkeypatch.setattr(
        importlib.import_module("tracer.estimate"), "disk_sync_rate", disk_sync_rate
    )
    cost = estimate(pipe, CALL, out=tmp_path / "new" / "folders" / "cat.zarr")
    assert cost.disk_rate == 5e8 and "synced 500.00 MB/s in a probe" in str(cost)
    # Beside the store, in the nearest folder that exists; a file per shard in flight (two
    # steps' of each direction), each in one write; a small recording probes a few MiB, not
    # the largest probe.
    assert probed == [(tmp_path, 4 * 2**20, 4, 2**20)]
    assert list(tmp_path.iterdir()) == []
    # A large one probes 256 MiB: four shards of 64 MiB.
    large = CALL | {"height": 1024, "width": 1024, "num_inference_steps": 200}
    assert estimate(pipe, large, out=tmp_path / "cat.zarr").stored_bytes > 2**28
    assert probed[-1] == (tmp_path, 2**28, 4, 2**26)
    # With more steps in flight, as many more shards side by side.
    estimate(pipe, large, out=tmp_path / "cat.zarr", max_pending_steps=4)
    assert probed[-1] == (tmp_path, 2**28, 8, 2**25)


def test_with_fsync_off_the_disk_is_not_probed_and_the_kernels_allowance_is_said(
    tmp_path, monkeypatch, capsys
):
    def disk_sync_rate(folder, nbytes, *, files, block_bytes):
        pytest.fail("the synced rate is not what an unsynced recording waits for")

    module = importlib.import_module("tracer.estimate")
    monkeypatch.setattr(module, "disk_sync_rate", disk_sync_rate)
    monkeypatch.setattr(module, "unwritten_bytes_allowed", lambda: 3_000_000_000)
    out = tmp_path / "cat.zarr"
    argv = ["record", "--demo", "--estimate", "--no-fsync", "--num-steps", "2", "--out", str(out)]
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert "per generation: " in said and "the disk it goes to" not in said
    assert (
        "fsync off: steps are left in the page cache unsynced (a listed step survives a crash "
        "of the process, not of the machine); the kernel lets 3.00 GB wait unwritten here "
        "before a writer waits for the disk (vm.dirty_*), so the generation does not wait for "
        "the disk"
    ) in said
    pipe = demo_pipeline(seed=0, max_sequence_length=32)
    cost = estimate(pipe, CALL, fsync=False, out=out)
    assert not cost.fsync and cost.disk_rate is None and cost.disk_ratio is None
    assert cost.unwritten_allowed == 3_000_000_000
    assert estimate(pipe, CALL, fsync=False, out="s3://bucket/run.zarr").unwritten_allowed is None
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("allowed_gb", [None, 10.0, 30.0])
def test_with_fsync_off_a_generation_past_the_kernels_allowance_waits_for_the_disk(allowed_gb):
    allowed = None if allowed_gb is None else int(allowed_gb * 1e9)
    cost = tracer.Estimate(
        **FLUX_DEV,
        fsync=False,
        unwritten_allowed=allowed,
    )
    # By hand: 28 steps × 2 directions × 57 × 24 × 26 × 4096 values, 1.42 bytes each: 18.5 GB.
    assert cost.stored_bytes == pytest.approx(28 * 2 * 57 * 24 * 26 * 4096 * 1.42)
    said = str(cost).splitlines()[-1]
    if allowed is None:
        assert said.startswith("fsync off: steps are left in the page cache unsynced, so the")
    elif allowed_gb < 18.5:
        assert said.endswith(
            f"lets {allowed_gb:.2f} GB wait unwritten here before a writer "
            "waits for the disk (vm.dirty_*), so past that the generation "
            "waits for the disk to write them"
        )
    else:
        assert said.endswith("so the generation does not wait for the disk")


def test_a_disk_that_cannot_be_probed_is_said_and_the_estimate_stands(
    tmp_path, monkeypatch, capsys
):
    def full(folder, nbytes, *, files, block_bytes):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(importlib.import_module("tracer.estimate"), "disk_sync_rate", full)
    out = tmp_path / "cat.zarr"
    assert main(["record", "--demo", "--estimate", "--num-steps", "2", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "per generation: " in said and "/s to disk, at 0.15 s a step" in said
    assert "the disk it goes to could not be probed: OSError: [Errno 28] No space left" in said
    assert "synced" not in said


def test_a_recording_that_cannot_fit_is_refused_before_it_starts(tmp_path, capsys, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    out = tmp_path / "full.zarr"
    assert main(["record", "--demo", "--num-steps", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "need about" in err and "has 0.0 GB free" in err and "--estimate" in err
    assert "--keepbits" in err
    assert not out.exists()


@pytest.mark.parametrize("write_gb_s", [2.0, 7.0, 12.0])
def test_the_estimate_says_how_long_a_slower_writer_would_hold_the_generation(write_gb_s):
    cost = tracer.Estimate(
        **FLUX_DEV,
        write_rate=write_gb_s * 1e9,
    )
    # By hand: 2 × 57 × 24 × 26 × 4096 float32 values a step, one step every 0.15 s.
    needed = 2 * 57 * 24 * 26 * 4096 * 4 / 0.15
    expected = max(1.0, needed / (write_gb_s * 1e9))
    assert cost.write_ratio == pytest.approx(expected)
    said = str(cost).splitlines()[-1]
    assert said.startswith(
        f"the writer, on this host's cores and disk alone, sustained {write_gb_s:.2f} GB/s "
        "decoded in a probe: "
    )
    if expected > 1:
        assert f"take about {expected:.2f}× as long as untraced, or longer" in said
        assert "more steps in flight, max pending steps" in said
    else:
        assert said.endswith(": it keeps up")


def test_an_estimate_probes_the_writer_as_the_recording_would_write(tmp_path, monkeypatch):
    probed: list[tuple] = []

    def writer_rate(folder, **shape):
        probed.append((folder, shape))
        return 3e9

    monkeypatch.setattr(importlib.import_module("tracer.estimate"), "writer_rate", writer_rate)
    pipe = demo_pipeline(seed=0, max_sequence_length=32)
    cost = estimate(pipe, CALL, out=tmp_path / "new" / "cat.zarr", max_pending_steps=3)
    assert cost.write_rate == 3e9 and cost.write_ratio == 1.0
    # Beside the store, at the recording's shape, on its device, synced, as many in flight.
    assert probed == [
        (
            tmp_path,
            {
                "layers": cost.layers,
                "heads": cost.heads,
                "rows": cost.rows,
                "grid": cost.grid,
                "directions": cost.directions,
                "keepbits": cost.keepbits,
                "device": "cpu",
                "fsync": True,
                "max_pending_steps": 3,
            },
        )
    ]
    assert estimate(pipe, CALL, fsync=False, out=tmp_path / "cat.zarr").write_rate == 3e9
    assert probed[-1][1]["fsync"] is False
    assert estimate(pipe, CALL, out="s3://bucket/run.zarr").write_rate is None
    assert estimate(pipe, CALL).write_rate is None and len(probed) == 2


def test_record_estimate_probes_the_writer_with_its_options(tmp_path, capsys, monkeypatch):
    probed: list[dict] = []

    def writer_rate(folder, **shape):
        probed.append(shape)
        return 1e6

    monkeypatch.setattr(importlib.import_module("tracer.estimate"), "writer_rate", writer_rate)
    out = tmp_path / "cat.zarr"
    argv = ["record", "--demo", "--estimate", "--num-steps", "2", "--out", str(out)]
    assert main([*argv, "--max-pending-steps", "4", "--no-fsync", "--keepbits", "6"]) == 0
    assert [(p["max_pending_steps"], p["fsync"], p["keepbits"]) for p in probed] == [(4, False, 6)]
    said = capsys.readouterr().out
    assert (
        "the writer, on this host's cores and disk alone, sustained 1.00 MB/s decoded in a probe"
    ) in said


def test_a_writer_that_cannot_be_probed_is_said_and_the_estimate_stands(
    tmp_path, monkeypatch, capsys
):
    def full(folder, **shape):
        raise tracer.WriterError("writing step 0 failed: OSError: [Errno 28] No space left")

    monkeypatch.setattr(importlib.import_module("tracer.estimate"), "writer_rate", full)
    out = tmp_path / "cat.zarr"
    assert main(["record", "--demo", "--estimate", "--num-steps", "2", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "per generation: " in said and "the disk it goes to synced " in said
    assert (
        "the writer could not be probed here: WriterError: writing step 0 failed: OSError: "
        "[Errno 28] No space left"
    ) in said
    assert "sustained" not in said and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_max_pending_steps_is_checked_before_anything_runs(tmp_path, bad):
    pipe = demo_pipeline(seed=0, max_sequence_length=32)
    said = f"max_pending_steps must be a whole number of steps, at least 1, got {bad!r}"
    with pytest.raises(tracer.UsageError, match=re.escape(said)):
        estimate(pipe, CALL, max_pending_steps=bad, out=tmp_path / "cat.zarr")
    with (
        pytest.raises(tracer.UsageError, match=re.escape(said)),
        tracer.trace(pipe, str(tmp_path / "cat.zarr"), max_pending_steps=bad),
    ):
        pipe(**CALL)
    assert list(tmp_path.iterdir()) == []
