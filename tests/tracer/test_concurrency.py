"""Concurrency end to end: recorders appending to one store at once, readers during a recording.

Recordings are the real `attnscope record` of the demo pipeline in forked children of a recorder
server (`crashkit`), paused on a chosen object write so that the interleaving that matters is
forced rather than hoped for. Every run is compared with an untouched recording of its prompt.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from crashkit import RecorderServer, wait_until_listed

import analysis
from analysis import store_format as sf
from analysis.cli import main
from analysis.verify import format_report, verify

CAT, DOG = "a cat on a red chair", "a dog on a blue chair"
ALL = [0, 1, 2, 3]
RUN_METADATA = {"key": r"run-\d+/zarr\.json"}  # a run group's first write: its name is taken


def record(out: Path, *extra: str) -> list[str]:
    return [
        "record",
        "--demo",
        "--lossless",
        "--num-inference-steps",
        "4",
        "--out",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = RecorderServer(tmp_path_factory.mktemp("concurrency"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def references(server) -> dict[str, xr.Dataset]:
    """Untouched recordings of each prompt, read with plain xarray."""
    out = {}
    for prompt in (CAT, DOG):
        path = server.workdir / f"reference-{len(out)}.zarr"
        child = server.start(record(path, "--prompt", prompt))
        assert child.rc == 0, child.output
        out[prompt] = xr.open_zarr(path, group="run-0000", consolidated=False).load()
    return out


def assert_run_matches(store: Path, run: str, references: dict[str, xr.Dataset]) -> str:
    """The run is complete and holds exactly the maps of the untouched recording of its prompt."""
    attrs = dict(zarr.open_group(store, path=run, mode="r").attrs)
    assert attrs[sf.STATUS] == sf.COMPLETE
    assert attrs[sf.STEPS_COMPLETE] == ALL
    ds = xr.open_zarr(store, group=run, consolidated=False)
    reference = references[attrs["prompt"]]
    for name in (*sf.DIRECTIONS, "image"):
        np.testing.assert_array_equal(ds[name].values, reference[name].values)
    return attrs["prompt"]


def test_two_recorders_appending_at_once_get_separate_runs(server, references, tmp_path):
    store = tmp_path / "shared.zarr"
    # Both pass every check and stop right before writing their run group: each must have
    # claimed a name of its own by then.
    first = server.start(record(store, "--append", "--prompt", CAT), hook=RUN_METADATA, root=store)
    second = server.start(record(store, "--append", "--prompt", DOG), hook=RUN_METADATA, root=store)
    assert first.paused and second.paused, (first.output, second.output)
    assert first.event["key"] != second.event["key"]
    first.release()
    second.release()  # both record at once from here
    assert first.wait().rc == 0, first.output
    assert second.wait().rc == 0, second.output
    runs = analysis.list_runs(store)
    assert [r.name for r in runs] == ["run-0000", "run-0001"]
    prompts = {assert_run_matches(store, r.name, references) for r in runs}
    assert prompts == {CAT, DOG}
    assert verify(store).ok


def test_two_sweeps_started_at_once_split_the_prompts(server, references, tmp_path):
    store = tmp_path / "shared.zarr"
    children = []
    for i, order in enumerate(((CAT, DOG), (DOG, CAT))):
        prompts = tmp_path / f"prompts{i}.txt"
        prompts.write_text("\n".join(order) + "\n")
        argv = record(store, "--prompts", str(prompts), "--seeds", "0")
        children.append(server.start(argv, hook=RUN_METADATA, root=store))
    for child in children:
        child.release()  # from their first run's metadata on, both sweeps run at once
    for child in children:
        assert child.wait().rc == 0, child.output
    runs = analysis.list_runs(store)
    # Each claimed its first prompt before laying down a run, and left the other's to it.
    assert [r.name for r in runs] == [sf.run_name(i) for i in range(2)]
    prompts = sorted(assert_run_matches(store, r.name, references) for r in runs)
    assert prompts == sorted([CAT, DOG])
    assert verify(store).ok


def test_a_killed_sweep_worker_s_run_is_taken_over_and_each_job_recorded_once(
    server, references, tmp_path
):
    store = tmp_path / "shared.zarr"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{CAT}\n{DOG}\n")
    # A long lease: the killed worker is known dead at once (its process is gone from this
    # machine), and a busy CI box must not make a living worker's heartbeat look late.
    argv = record(store, "--prompts", str(prompts), "--seeds", "0,1", "--lease", "120")
    jobs = {(CAT, 0), (CAT, 1), (DOG, 0), (DOG, 1)}
    # The first worker claims (CAT, 0) and dies inside its step 1.
    dead = server.start(argv, hook={"key": r"run-\d+/txt2img/c/1/.*"}, root=store)
    assert dead.paused, dead.output
    [abandoned] = analysis.list_runs(store)
    dead.kill()
    # Two more workers split the rest, and one of them takes (CAT, 0) over.
    workers = [server.start(argv, hook=RUN_METADATA, root=store) for _ in range(2)]
    for worker in workers:
        assert worker.paused, worker.output
        worker.release()
    for worker in workers:
        assert worker.wait().rc == 0, worker.output
    runs = {r.name: r for r in analysis.list_runs(store)}
    assert runs[abandoned.name].status == sf.failed("abandoned")
    complete = [r for r in runs.values() if r.is_complete]
    recorded = sorted((r.attrs["prompt"], r.attrs["seed"]) for r in complete)
    assert recorded == sorted(jobs)  # each exactly once
    for run in complete:
        if run.attrs["seed"] == 0:
            assert_run_matches(store, run.name, references)
    assert "was abandoned; recording it again" in "".join(w.output for w in workers)
    assert verify(store).ok


def test_a_second_new_store_at_the_same_path_is_refused(server, references, tmp_path, capsys):
    store = tmp_path / "new.zarr"
    first = server.start(record(store, "--prompt", CAT), hook=RUN_METADATA, root=store)
    assert first.paused
    second = server.start(record(store, "--prompt", DOG))
    assert second.rc == 2
    assert "already exists; pass --append to add a run to it or --overwrite" in second.output
    assert "Traceback" not in second.output
    assert first.resume().rc == 0, first.output
    [run] = analysis.list_runs(store)
    assert assert_run_matches(store, run.name, references) == CAT


def test_a_reader_during_a_recording_sees_only_complete_steps(server, references, tmp_path, capsys):
    store = tmp_path / "live.zarr"
    # Paused inside step 2: its txt2img shard is on disk, its img2txt shard not, nothing listed.
    hook = {"key": "run-0000/img2txt/c/2/0/0/0/0/0"}
    child = server.start(record(store, "--prompt", CAT), hook=hook, root=store)
    assert child.paused, child.output
    wait_until_listed(store, "run-0000", [0, 1])
    reference = references[CAT]

    plain = xr.open_zarr(store, group="run-0000", consolidated=False)
    assert not np.isnan(plain.txt2img.sel(step=2).values).any()  # there, but not yet listed
    with pytest.warns(analysis.PartialRunWarning, match=r"still recording.*steps 2, 3"):
        ds = analysis.open_trace(store, tokens=True)
    assert ds.step.values.tolist() == [0, 1]
    for name in sf.DIRECTIONS:
        np.testing.assert_array_equal(ds[name].values, reference[name].sel(step=[0, 1]).values)
    assert "image" not in ds
    assert main(["info", str(store)]) == 0
    assert "1/4" not in capsys.readouterr().out  # two of four steps complete, not one
    report = verify(store)
    assert report.ok, format_report(report)

    assert child.resume().rc == 0, child.output
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = analysis.open_trace(store, tokens=True)
    assert ds.step.values.tolist() == ALL
    for name in (*sf.DIRECTIONS, "image"):
        np.testing.assert_array_equal(ds[name].values, reference[name].values)


def test_a_reader_of_one_run_is_undisturbed_by_another_being_appended(server, references, tmp_path):
    store = tmp_path / "growing.zarr"
    assert server.start(record(store, "--prompt", CAT)).rc == 0
    hook = {"key": "run-0001/txt2img/c/1/0/0/0/0/0"}
    child = server.start(record(store, "--append", "--prompt", DOG), hook=hook, root=store)
    assert child.paused
    wait_until_listed(store, "run-0001", [0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = analysis.open_trace(store, run=0, tokens=True)
    np.testing.assert_array_equal(ds.txt2img.values, references[CAT].txt2img.values)
    statuses = [(r.name, r.status, list(r.steps_complete)) for r in analysis.list_runs(store)]
    assert statuses == [("run-0000", "complete", ALL), ("run-0001", "recording", [0])]
    assert child.resume().rc == 0
    assert assert_run_matches(store, "run-0001", references) == DOG
