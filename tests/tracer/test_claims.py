"""Job claims of shared sweeps, on a local folder and in a bucket (moto's S3 server)."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from typing import Any

import fsspec
import pytest

from analysis import store_format as sf
from tracer.claims import Claims, job_key


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "sweep.zarr")
    s3 = request.getfixturevalue("s3")
    return f"s3://{s3.bucket()}/sweep.zarr"


def claim_files(store: str) -> dict[str, dict[str, Any]]:
    """The claims as plain fsspec lists and reads them: {file name: document}."""
    fs, root = fsspec.core.url_to_fs(store)
    fs.invalidate_cache()
    folder = f"{root}/{sf.CLAIMS}"
    return {
        path.rsplit("/", 1)[-1]: json.loads(fs.cat_file(path))
        for path in fs.ls(folder, detail=False)
    }


def test_a_job_is_claimed_once_until_its_lease_ends(store):
    first, second = Claims(store, lease=60), Claims(store, lease=60)
    taken = first.take("a cat", 0)
    assert taken is not None and taken[1] is None
    assert second.take("a cat", 0) is None  # held, and alive
    assert second.take("a cat", 1) is not None  # another seed is another job
    [document] = [d for d in claim_files(store).values() if d["seed"] == 0]
    assert document["prompt"] == "a cat" and document["worker"] == first.worker
    assert f"{job_key('a cat', 0)}.0.json" in claim_files(store)


def test_an_expired_claim_is_taken_over_as_the_next_attempt(store):
    dead = Claims(store, lease=0.5)
    mine, _ = dead.take("a dog", 0)
    taker = Claims(store, lease=0.5)
    assert taker.take("a dog", 0) is None
    time.sleep(0.8)
    mine_now, replaced = taker.take("a dog", 0)
    assert replaced == mine and mine_now.attempt == 1
    assert Claims(store, lease=60).take("a dog", 0) is None  # the new holder's claim is fresh


def test_the_heartbeat_keeps_a_claim_alive_past_its_lease_then_releases_it(store):
    holder, other = Claims(store, lease=2.0), Claims(store, lease=60)
    mine, _ = holder.take("a fox", 0)
    with holder.heartbeat("a fox", 0, mine):  # a beat every 0.5 s
        time.sleep(3.0)
        assert Claims(store, lease=2.0).take("a fox", 0) is None
    # The job ended (done or failed): its claim is let go at once, whatever the lease.
    taken = other.take("a fox", 0)
    assert taken is not None and taken[1].attempt == 0


def _race(store: str, env: dict[str, str], start: Any, out: Any) -> None:
    os.environ.update(env)
    claims = Claims(store, lease=60)
    start.wait()
    out.put(claims.take("a race", 0) is not None)


def test_racing_processes_take_a_job_exactly_once(s3, tmp_path):
    for store in (str(tmp_path / "race.zarr"), f"s3://{s3.bucket()}/race.zarr"):
        context = multiprocessing.get_context("spawn")
        start, out = context.Event(), context.Queue()
        racers = [context.Process(target=_race, args=(store, s3.env, start, out)) for _ in range(4)]
        for racer in racers:
            racer.start()
        time.sleep(1.0)  # let every racer get ready at the line
        start.set()
        won = [out.get(timeout=60) for _ in racers]
        for racer in racers:
            racer.join(60)
        assert sorted(won) == [False, False, False, True], store


def test_a_lease_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="lease must be > 0 seconds, got 0"):
        Claims(str(tmp_path / "s.zarr"), lease=0)


def _take_and_exit(store: str, env: dict[str, str]) -> None:
    os.environ.update(env)
    assert Claims(store, lease=600).take("a ghost", 0) is not None


def test_a_claim_of_a_process_gone_from_this_machine_is_taken_at_once(store):
    context = multiprocessing.get_context("spawn")
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    holder = context.Process(target=_take_and_exit, args=(store, env))
    holder.start()
    holder.join(60)
    assert holder.exitcode == 0
    taken = Claims(store, lease=600).take("a ghost", 0)  # no waiting for the lease
    assert taken is not None and taken[1] is not None and taken[0].attempt == 1
    # A living process's claim, on the other hand, holds until its lease ends.
    assert Claims(store, lease=600).take("a ghost", 0) is None
