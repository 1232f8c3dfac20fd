"""Crash safety end to end: `attnscope record` killed with SIGKILL, failing disks, exceptions.

Every recording here is the real `record` command of the demo pipeline, run in a forked child of
a recorder server (`crashkit`) and stopped on a chosen object write of zarr's LocalStore: before
the first step is listed, between steps, inside a shard write, inside the update of the run's
attributes, inside the image write, inside the final status update. Each killed store is checked
against an untouched recording of the same command, through plain zarr/xarray first (no attnscope
on the read path) and then through `analysis`: it opens, says it is partial and which steps exist,
and every step it lists equals the untouched recording bit for bit (lossless storage).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from crashkit import RecorderServer, wait_until_listed

import analysis
from analysis import store_format as sf
from analysis.cli import main
from analysis.verify import format_report, verify
from tracer import trace
from tracer.demo import demo_pipeline

STEPS = 4
ALL = list(range(STEPS))

# Plain zarr warns about a torn write's `*.partial` temporary file when it lists a group.
pytestmark = pytest.mark.filterwarnings("ignore:Object at .* is not recognized:UserWarning")


def record(out: Path, *extra: str, steps: int = STEPS) -> list[str]:
    return [
        "record",
        "--demo",
        "--lossless",
        "--num-inference-steps",
        str(steps),
        "--out",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = RecorderServer(tmp_path_factory.mktemp("crash"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def reference(server) -> xr.Dataset:
    """An untouched recording of the same command, read with plain xarray."""
    path = server.workdir / "reference.zarr"
    child = server.start(record(path))
    assert child.rc == 0, child.output
    return xr.open_zarr(path, group="run-0000", consolidated=False).load()


def plain_run(path: Path, run: str = "run-0000") -> tuple[dict, xr.Dataset]:
    attrs = dict(zarr.open_group(path, path=run, mode="r").attrs)
    return attrs, xr.open_zarr(path, group=run, consolidated=False)


def assert_steps_equal(ds: xr.Dataset, reference: xr.Dataset, steps: list[int]) -> None:
    for direction in sf.DIRECTIONS:
        np.testing.assert_array_equal(
            ds[direction].sel(step=steps).values, reference[direction].sel(step=steps).values
        )


def assert_no_traceback(text: str) -> None:
    assert "Traceback" not in text, text


# ------------------------------------------------------------------------------------ SIGKILL

KILL_POINTS = [
    # (hook on one object write, steps the killed run lists complete, whether the image is in)
    pytest.param({"key": "run-0000/txt2img/zarr.json"}, [], False, id="laying-down-the-run"),
    pytest.param(
        {"key": "run-0000/txt2img/c/0/0/0/0/0/0", "mode": "mid"}, [], False, id="first-shard"
    ),
    pytest.param(
        {"key": "run-0000/zarr.json", "listed": 2, "mode": "after"},
        [0, 1],
        False,
        id="between-steps",
    ),
    pytest.param(
        {"key": "run-0000/img2txt/c/2/0/0/0/0/0", "mode": "mid"}, [0, 1], False, id="mid-shard"
    ),
    pytest.param(
        {"key": "run-0000/zarr.json", "listed": 3, "mode": "mid"},
        [0, 1],
        False,
        id="listing-a-step",
    ),
    pytest.param({"key": "run-0000/image/c/0/0/0", "mode": "mid"}, ALL, False, id="image-write"),
    pytest.param(
        {"key": "run-0000/zarr.json", "status": "complete", "mode": "mid"},
        ALL,
        True,
        id="marking-complete",
    ),
]


@pytest.mark.parametrize(("hook", "listed", "has_image"), KILL_POINTS)
def test_sigkill_leaves_a_store_that_opens_with_every_listed_step_intact(
    server, reference, tmp_path, capsys, hook, listed, has_image
):
    store = tmp_path / "killed.zarr"
    child = server.start(record(store), hook=hook, root=store)
    assert child.paused, f"the kill point was never reached: {child.event}\n{child.output}"
    if listed and hook.get("mode") == "mid" and "c/" in hook["key"]:
        wait_until_listed(store, "run-0000", listed)
    assert child.kill().killed
    missing = [s for s in ALL if s not in listed]

    # Plain zarr and xarray, no attnscope: status, listed steps, and their maps.
    attrs, plain = plain_run(store)
    assert attrs[sf.STATUS] == sf.RECORDING
    assert attrs[sf.STEPS_COMPLETE] == listed
    if listed:
        assert_steps_equal(plain, reference, listed)

    # attnscope: the run is partial and says which steps exist; only those are used.
    [info] = analysis.list_runs(store)
    assert (info.name, info.status, list(info.steps_complete)) == ("run-0000", "recording", listed)
    if listed:
        assert list(info.steps_missing) == missing
        with pytest.warns(analysis.PartialRunWarning) as caught:
            ds = analysis.open_trace(store, tokens=True)
        [message] = [str(w.message) for w in caught if w.category is analysis.PartialRunWarning]
        assert "still recording" in message
        if missing:
            named = ", ".join(map(str, missing)) if len(missing) < 3 else f"{missing[0]}..3"
            assert f"steps {named} are missing" in message, message
        assert ds.step.values.tolist() == listed
        assert_steps_equal(ds, reference, listed)
        if has_image:
            np.testing.assert_array_equal(ds.image.values, reference.image.values)
        else:
            assert "image" not in ds  # never drawn as a black picture
            if listed == ALL:
                assert "image was never written" in message
    elif "mode" in hook:
        with pytest.raises(analysis.SelectionError, match="no complete step yet"):
            analysis.open_trace(store, tokens=True)
        with pytest.warns(analysis.PartialRunWarning, match="steps 0..3 are not complete"):
            ds = analysis.open_trace(store, complete_only=False, tokens=True)
        # The torn shard never reached its key. (Step 1's shards are written alongside step
        # 0's and may be in place, unlisted: nothing reads them as complete.)
        assert np.isnan(ds.txt2img.sel(step=0).values).all()
    else:
        with pytest.raises(analysis.FormatError, match="being laid down"):
            analysis.open_trace(store, complete_only=False, tokens=True)

    # verify: nothing damaged; the partial run and a torn write's temporary file are notes.
    report = verify(store)
    assert report.ok, format_report(report)
    notes = " | ".join(f.message for f in report.notes)
    assert "is partial" in notes
    if hook.get("mode") == "mid":
        assert ".partial left by an interrupted write" in notes
    assert main(["info", str(store)]) == 0
    assert_no_traceback(capsys.readouterr().err)


def test_sigkill_with_fsync_off_leaves_every_listed_step_intact(server, reference, tmp_path):
    # Unsynced, the kernel still holds every renamed shard and listing: a kill loses nothing
    # listed (a power loss could).
    store = tmp_path / "unsynced.zarr"
    hook = {"key": "run-0000/img2txt/c/2/0/0/0/0/0", "mode": "mid"}
    child = server.start(record(store, "--no-fsync"), hook=hook, root=store)
    assert child.paused, f"the kill point was never reached: {child.event}\n{child.output}"
    wait_until_listed(store, "run-0000", [0, 1])
    assert child.kill().killed
    attrs, plain = plain_run(store)
    assert (attrs[sf.STATUS], attrs[sf.STEPS_COMPLETE]) == (sf.RECORDING, [0, 1])
    assert_steps_equal(plain, reference, [0, 1])


def test_a_run_killed_while_laid_down_does_not_block_the_next(server, reference, tmp_path):
    store = tmp_path / "killed.zarr"
    child = server.start(record(store), hook={"key": "run-0000/step/zarr.json"}, root=store)
    assert child.kill().killed
    again = server.start(record(store, "--append"))
    assert again.rc == 0, again.output
    assert [(r.name, r.status) for r in analysis.list_runs(store)] == [
        ("run-0000", "recording"),
        ("run-0001", "complete"),
    ]
    attrs, ds = plain_run(store, "run-0001")
    assert attrs[sf.STEPS_COMPLETE] == ALL
    assert_steps_equal(ds, reference, ALL)
    assert verify(store).ok


def test_a_sweep_killed_mid_run_resumes_and_records_that_run_again(server, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat on a red chair\na dog on a blue chair\n")

    def sweep(out: Path) -> list[str]:
        return record(out, "--prompts", str(prompts), "--seeds", "0")

    untouched = tmp_path / "untouched.zarr"
    assert server.start(sweep(untouched)).rc == 0
    store = tmp_path / "sweep.zarr"
    hook = {"key": "run-0001/txt2img/c/2/0/0/0/0/0"}
    killed = server.start(sweep(store), hook=hook, root=store)
    wait_until_listed(store, "run-0001", [0, 1])
    assert killed.kill().killed

    resumed = server.start(sweep(store))
    assert resumed.rc == 0, resumed.output
    assert "skipping 1 runs already complete" in resumed.output
    runs = analysis.list_runs(store)
    # The killed worker's run is marked abandoned (its claim's process is gone), its steps kept.
    assert "run-0001 ('a dog on a blue chair', seed 0) was abandoned" in resumed.output
    assert [(r.name, r.status, list(r.steps_complete)) for r in runs] == [
        ("run-0000", "complete", ALL),
        ("run-0001", "failed: abandoned", [0, 1]),
        ("run-0002", "complete", ALL),
    ]
    # The re-recorded run equals an untouched sweep's.
    for mine, theirs in (("run-0000", "run-0000"), ("run-0002", "run-0001")):
        attrs, ds = plain_run(store, mine)
        ref_attrs, ref = plain_run(untouched, theirs)
        assert (attrs["prompt"], attrs["seed"]) == (ref_attrs["prompt"], ref_attrs["seed"])
        assert_steps_equal(ds, ref.load(), ALL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the latest run is complete: no partial warning
        assert analysis.open_trace(store).attrs["run"] == "run-0002"

    again = server.start(sweep(store))
    assert again.rc == 0 and "skipping 2 runs already complete" in again.output
    assert len(analysis.list_runs(store)) == 3


# ------------------------------------------------------------------------- failing disks


def test_a_full_disk_stops_the_generation_with_a_clear_error(server, tmp_path):
    # RLIMIT_FSIZE below one step's shard (SIGXFSZ ignored): every shard write fails with EFBIG,
    # while the small zarr.json documents (the run's metadata, its status) still fit.
    store = tmp_path / "full.zarr"
    child = server.start(record(store, steps=12), fsize=20_000, count_steps=True)
    assert child.rc == 2, child.output
    assert_no_traceback(child.output)
    errors = [line for line in child.output.splitlines() if line.startswith("attnscope: error:")]
    assert len(errors) == 1, child.output
    assert "record: writing the trace" in errors[0] and "File too large" in errors[0]
    # It stopped at once instead of running the other steps for nothing: the writer holds at
    # most two pending steps, so the third denoiser call is the last.
    assert 1 <= child.output.count("crashkit: denoiser call") <= 3, child.output
    attrs, _ = plain_run(store)
    assert attrs[sf.STATUS].startswith("failed: ") and "File too large" in attrs[sf.STATUS]
    assert attrs[sf.STEPS_COMPLETE] == []
    assert "image" not in zarr.open_group(store, path="run-0000", mode="r")


def test_a_permission_error_mid_run_keeps_the_steps_before_it(server, reference, tmp_path):
    store = tmp_path / "denied.zarr"
    hook = {"key": "run-0000/txt2img/c/1/0/0/0/0/0", "mode": "fail", "errno": "EACCES"}
    child = server.start(record(store), hook=hook, root=store)
    assert child.rc == 2, child.output
    assert_no_traceback(child.output)
    assert re.search(r"error: record: writing the trace .*Permission denied", child.output)
    attrs, ds = plain_run(store)
    assert attrs[sf.STATUS].startswith("failed: WriterError: writing step 1")
    assert attrs[sf.STEPS_COMPLETE] == [0]
    assert_steps_equal(ds, reference, [0])
    with pytest.warns(analysis.PartialRunWarning, match=r"failed .*Permission denied"):
        assert analysis.open_trace(store).step.values.tolist() == [0]
    assert verify(store).ok


def test_no_space_while_laying_down_the_run_is_a_clear_error(server, tmp_path):
    store = tmp_path / "nospace.zarr"
    hook = {"key": "run-0000/txt2img/zarr.json", "mode": "fail", "errno": "ENOSPC"}
    child = server.start(record(store), hook=hook, root=store, count_steps=True)
    assert child.rc == 2, child.output
    assert_no_traceback(child.output)
    assert re.search(r"attnscope: error: record: .*No space left on device", child.output)
    # The run is laid down on the writer's thread during the first step: the generation stops
    # at its next put(), and the run's group, written first, says why.
    assert 1 <= child.output.count("crashkit: denoiser call") <= 3, child.output
    status = zarr.open_group(store, path="run-0000", mode="r").attrs[sf.STATUS]
    assert status.startswith("failed: WriterError: laying down the run failed"), status
    assert "No space left on device" in status


# ----------------------------------------------------------------------- Python exceptions


def test_an_exception_in_generation_marks_the_run_failed_and_keeps_its_steps(tmp_path):
    pipe = demo_pipeline(seed=0)

    def generate(**extra):
        return pipe(
            "a cat on a red chair",
            num_inference_steps=STEPS,
            height=128,
            width=128,
            max_sequence_length=32,
            generator=torch.Generator().manual_seed(0),
            **extra,
        )

    untouched, store = tmp_path / "untouched.zarr", tmp_path / "failed.zarr"
    with trace(pipe, untouched, keepbits=None, progress=False):
        generate()

    def boom(pipe, step, timestep, kwargs):
        if step == 2:
            raise RuntimeError("boom at step 2")
        return kwargs

    with trace(pipe, store, keepbits=None, progress=False), pytest.raises(RuntimeError):
        generate(callback_on_step_end=boom)
    attrs, ds = plain_run(store)
    assert attrs[sf.STATUS] == "failed: RuntimeError: boom at step 2"
    assert attrs[sf.STEPS_COMPLETE] == [0, 1, 2]  # every step captured whole before the error
    reference = xr.open_zarr(untouched, group="run-0000", consolidated=False)
    assert_steps_equal(ds, reference, [0, 1, 2])
    with pytest.warns(analysis.PartialRunWarning, match=r"failed .*boom at step 2.*steps 3"):
        opened = analysis.open_trace(store, tokens=True)
    assert opened.step.values.tolist() == [0, 1, 2]
    assert verify(store).ok
