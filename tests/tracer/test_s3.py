"""Recording straight into an S3-compatible bucket (moto's server, a real HTTP server)."""

from __future__ import annotations

import multiprocessing
import os
from typing import Any

import numpy as np
import pytest
import s3fs
import xarray as xr

import analysis
from analysis import store_format as sf
from analysis.cli import main
from analysis.verify import verify

RECORD = ["record", "--demo", "--lossless", "--num-inference-steps", "2"]


def test_a_recording_into_a_bucket_equals_the_same_recording_on_disk(s3, tmp_path):
    url = f"s3://{s3.bucket()}/trace.zarr"
    local = tmp_path / "trace.zarr"
    assert main([*RECORD, "--out", url]) == 0
    assert main([*RECORD, "--out", str(local)]) == 0
    remote = xr.open_zarr(
        url, group="run-0000", consolidated=False, storage_options=s3.storage_options
    )
    plain = xr.open_zarr(local, group="run-0000", consolidated=False)
    for name in (*sf.DIRECTIONS, "image"):
        np.testing.assert_array_equal(remote[name].values, plain[name].values)
    [run] = analysis.list_runs(url, storage_options=s3.storage_options)
    assert run.status == sf.COMPLETE and list(run.steps_complete) == list(run.steps)
    assert verify(url, storage_options=s3.storage_options).ok


def test_an_existing_bucket_store_is_kept_unless_overwrite_or_append(s3, capsys):
    url = f"s3://{s3.bucket()}/trace.zarr"
    assert main([*RECORD, "--out", url]) == 0
    assert main([*RECORD, "--out", url]) == 2
    assert "already exists; pass --append to add a run to it or --overwrite" in (
        capsys.readouterr().err
    )
    assert main([*RECORD, "--out", url, "--append", "--seed", "1"]) == 0
    assert [r.name for r in analysis.list_runs(url)] == ["run-0000", "run-0001"]
    assert main([*RECORD, "--out", url, "--overwrite"]) == 0
    assert [r.name for r in analysis.list_runs(url)] == ["run-0000"]


def _claim(url: str, env: dict[str, str], start: Any, out: multiprocessing.Queue) -> None:
    """One recorder: lay down a run in the store at `url` once all are ready; report its name."""
    os.environ.update(env)
    from tracer.store import create_run

    coords = sf.run_coords(
        steps=[0],
        timesteps=[1000.0],
        sigmas=[1.0],
        layers=["transformer_blocks.0"],
        layer_kinds=["double"],
        heads=[0],
        tokens=[sf.TokenRow(0, 1, "a", "prompt")],
        grid=(2, 2),
    )
    attrs = {sf.STATUS: sf.RECORDING, sf.STEPS_COMPLETE: [], "prompt": str(os.getpid())}
    start.wait(timeout=120)  # every recorder has imported and built its run: go together
    name, _ = create_run(url, coords, attrs, sf.DIRECTIONS, None)
    out.put((name, str(os.getpid())))


def test_recorders_racing_for_a_run_name_in_a_bucket_never_share_one(s3):
    url = f"s3://{s3.bucket()}/shared.zarr"
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    start = context.Barrier(4)
    workers = [context.Process(target=_claim, args=(url, s3.env, start, results)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    claimed = dict(results.get(timeout=10) for _ in workers)
    assert sorted(claimed) == [sf.run_name(i) for i in range(4)]
    fs = s3fs.S3FileSystem(**s3.storage_options, skip_instance_cache=True)
    for name, pid in claimed.items():
        # Each run's metadata is its own recorder's: nobody wrote over another's run.
        attrs = xr.open_zarr(
            url, group=name, consolidated=False, storage_options=s3.storage_options
        ).attrs
        assert attrs["prompt"] == pid
        assert fs.exists(f"{url}/{name}/txt2img/zarr.json")


def test_a_claimed_name_is_not_taken_again(s3):
    from tracer.store import _claim_url

    url = f"s3://{s3.bucket()}/store.zarr"
    _claim_url(url, "run-0000")
    with pytest.raises(FileExistsError):
        _claim_url(url, "run-0000")
