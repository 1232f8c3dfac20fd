"""Which worker records which (prompt, seed) of a shared sweep: claims in the store itself.

N recorders started on one prompt list and one store (N GPUs, or N times on one box) split the
work with no coordinator. Before recording a job, a worker creates the job's claim, a small JSON
object `claims/<job>.<attempt>.json` beside the runs, exclusively: a local exclusive create, or
on an object store a conditional write (`If-None-Match: *`), through fsspec for both. Whoever
creates attempt n of a job records it; the others go on to the next job.

While it records, the owner rewrites its claim every `lease / 4` seconds (a heartbeat), and
releases it when the job ends, done or failed (its heartbeat set to 0). A claim whose heartbeat
is older than `lease`, or whose holder ran on this machine and is no longer running, belongs to
a worker that died (or let it go): another worker claims the next attempt (again
exclusively, so one taker wins), marks the dead worker's run of the job (status still
`recording`) `failed: abandoned`, and records the job again. The lease must exceed the longest
pause of a living worker (clocks of different machines are compared, so allow for their skew
too).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec

from analysis import store_format as fmt

DEFAULT_LEASE_SECONDS = 300.0


@dataclass(frozen=True)
class Claim:
    """A job's claim as stored: which attempt, who holds it, when it was last renewed."""

    attempt: int
    worker: str
    heartbeat: float  # seconds since the epoch


def job_key(prompt: str, seed: int) -> str:
    """The name of a (prompt, seed) job among the claims: a digest, stable across machines."""
    return hashlib.sha256(json.dumps([prompt, seed]).encode()).hexdigest()[:24]


class Claims:
    """The claims of the store at `path` (a local folder or an fsspec URL)."""

    def __init__(self, path: str, lease: float = DEFAULT_LEASE_SECONDS) -> None:
        if not lease > 0:
            raise ValueError(f"lease must be > 0 seconds, got {lease}")
        self.fs, root = fsspec.core.url_to_fs(str(path))
        self.folder = f"{root.rstrip('/')}/{fmt.CLAIMS}"
        self.lease = lease
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.fs.makedirs(self.folder, exist_ok=True)

    def latest(self, prompt: str, seed: int) -> Claim | None:
        """The job's newest claim, or None if nobody has claimed it."""
        key = job_key(prompt, seed)
        self.fs.invalidate_cache(self.folder)
        try:
            names = self.fs.ls(self.folder, detail=False)
        except FileNotFoundError:
            names = []  # an object store has no empty folders: no claim made yet
        attempts = sorted(
            int(name.rsplit("/", 1)[-1].split(".")[1])
            for name in names
            if name.rsplit("/", 1)[-1].startswith(f"{key}.") and name.endswith(".json")
        )
        if not attempts:
            return None
        try:
            document = json.loads(self.fs.cat_file(self._path(key, attempts[-1])))
        except (json.JSONDecodeError, FileNotFoundError):
            # Caught mid-renewal on a local disk: its holder is alive.
            return Claim(attempts[-1], "", time.time())
        return Claim(attempts[-1], document["worker"], document["heartbeat"])

    def expired(self, claim: Claim) -> bool:
        """Whether the claim's holder is gone: it has not renewed the claim for longer than the
        lease, or it ran on this machine and its process has ended (a sweep rerun after a crash
        need not wait for the lease)."""
        if time.time() - claim.heartbeat > self.lease:
            return True
        host, _, rest = claim.worker.partition(":")
        pid = rest.partition(":")[0]
        return host == socket.gethostname() and pid.isdigit() and not _alive(int(pid))

    def take(self, prompt: str, seed: int) -> tuple[Claim, Claim | None] | None:
        """Claim the job if nobody holds it or its holder's lease ran out: (our claim, the
        expired one it replaces, if any). None if another worker holds it or won the race."""
        latest = self.latest(prompt, seed)
        if latest is not None and not self.expired(latest):
            return None
        attempt = 0 if latest is None else latest.attempt + 1
        mine = Claim(attempt, self.worker, time.time())
        try:
            self._write(prompt, seed, mine, mode="create")
        except FileExistsError:
            return None  # another worker claimed this attempt first
        return mine, latest

    @contextlib.contextmanager
    def heartbeat(self, prompt: str, seed: int, claim: Claim) -> Iterator[None]:
        """Renew the claim every lease / 4 seconds, from a thread, while the block runs; then
        release it (however the block ended): a job done or failed holds nobody up."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.lease / 4):
                renewed = Claim(claim.attempt, claim.worker, time.time())
                with contextlib.suppress(OSError):  # a missed beat is retried at the next one
                    self._write(prompt, seed, renewed, mode="overwrite")

        thread = threading.Thread(target=beat, name="attnscope-claim", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            with contextlib.suppress(OSError):  # unreleased, it expires with the lease
                self._write(prompt, seed, Claim(claim.attempt, claim.worker, 0.0), "overwrite")

    def _path(self, key: str, attempt: int) -> str:
        return f"{self.folder}/{key}.{attempt}.json"

    def _write(self, prompt: str, seed: int, claim: Claim, mode: str) -> None:
        document: dict[str, Any] = {
            "prompt": prompt,
            "seed": seed,
            "worker": claim.worker,
            "heartbeat": claim.heartbeat,
            "heartbeat_utc": dt.datetime.fromtimestamp(claim.heartbeat, dt.timezone.utc).isoformat(
                timespec="seconds"
            ),
        }
        path = self._path(job_key(prompt, seed), claim.attempt)
        self.fs.pipe_file(path, json.dumps(document).encode(), mode=mode)


def _alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, as another user's
    return True
