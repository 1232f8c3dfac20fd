"""Durable step shards on a local disk: encode aside, sync, then rename into place.

A step of one direction is one shard, hundreds of MB at FLUX.1-dev's shape. zarrs encodes it on
all cores but writes it in place, so a kill mid-write would leave a torn shard under the step's
real key; and neither zarrs nor zarr's LocalStore calls fsync, so a power loss could lose a step
already listed complete. Here each shard is written into a staging copy of the array (a
`*.partial` folder inside the array's folder, which no Zarr reader looks into), synced, and
renamed to its key; the folders the rename made new are synced too. Only then does the writer
list the step. A crash leaves at worst the staging folder, which `attnscope verify` notes.

A shard that is synced at once gains nothing from the page cache: copying it there first cost
the writer about half its time per core on the project's benchmark machine. Where the file
system takes O_DIRECT, zarrs writes synced shards past it (`python -m bench rate` gives the
figures). ATTNSCOPE_DIRECT_IO=0 turns that off, as a fallback and for comparing.

The listing itself (the run's `zarr.json`, `write_attributes`) is written and synced on the
writer's own thread, so it never queues behind shard encodes in zarr's thread pool.
"""

from __future__ import annotations

import asyncio
import json
import mmap
import os
import shutil
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import LocalStore

from tracer.zarr_pipeline import pipeline_for

DIRECT_IO_ENV = "ATTNSCOPE_DIRECT_IO"


class StagedShards:
    """Writes whole-step shards of one attention array of a local store (LocalStore)."""

    def __init__(self, array: zarr.Array, *, fsync: bool = True) -> None:
        """`fsync=False` leaves the shards in the page cache, unsynced."""
        if not isinstance(array.store, LocalStore):
            raise TypeError(f"staged shards need a local store, got {type(array.store).__name__}")
        self._array = array
        self._fsync = fsync
        self._folder = Path(array.store.root) / array.path
        self._staging_folder = self._folder / f"staging.{uuid.uuid4().hex}.partial"
        # The staging array is a copy of the real one (same shape, chunks, shard and codecs), so
        # each step has its own staged key and several steps may be written at once. Its keys
        # are `.`-separated: a staged shard is one file in the staging folder, not a chain of
        # folders per step to make and remove again (each a metadata write, costly on network
        # file systems).
        metadata = array.metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"]
        document = json.loads(metadata.to_bytes())
        document["chunk_key_encoding"] = {"name": "default", "configuration": {"separator": "."}}
        self._staging_folder.mkdir()
        (self._staging_folder / "zarr.json").write_text(json.dumps(document))
        store = LocalStore(self._staging_folder)
        self.direct_io = fsync and _direct_io_wanted() and takes_direct_io(self._staging_folder)
        with pipeline_for(store, direct_io=self.direct_io):
            self._staging = zarr.open_array(store, mode="r+", zarr_format=3)
        self._store = store

    def write(self, step_pos: int, values: np.ndarray) -> None:
        """Store `values` (one whole step) as step position `step_pos`'s shard, durably. Calls
        for different steps may run at once, from different threads."""
        try:
            self._staging[step_pos] = values
        except Exception:
            if not self.direct_io:
                raise
            # O_DIRECT turns a short write (a full disk, a file size limit) into EINVAL on the
            # rest of it: through the page cache the same write names its cause, or succeeds.
            self._buffered()[step_pos] = values
        chunk = (step_pos,) + (0,) * (self._array.ndim - 1)
        staged = self._staging_folder / self._staging.metadata.encode_chunk_key(chunk)
        final = self._folder / self._array.metadata.encode_chunk_key(chunk)
        if not staged.exists():
            return  # every value was the fill value (NaN): zarr stores no shard, nor do we
        if self._fsync:
            _sync(staged)
        new_folders = _make_folders(final.parent)
        self._move_into_place(staged, final)
        if self._fsync:
            # The new name, and every folder made for it, recorded in its parent folder.
            for folder in {final.parent, *(f.parent for f in new_folders)}:
                _sync(folder)

    def _buffered(self) -> zarr.Array:
        """The staging array, opened to write through the page cache."""
        with pipeline_for(self._store):
            return zarr.open_array(self._store, mode="r+", zarr_format=3)

    def close(self) -> None:
        """Remove the staging folder (nothing in it is needed once every step is in place)."""
        shutil.rmtree(self._staging_folder, ignore_errors=True)

    @staticmethod
    def _move_into_place(staged: Path, final: Path) -> None:
        os.replace(staged, final)


def write_attributes(group: zarr.Group, attributes: Mapping[str, Any], *, fsync: bool) -> None:
    """Update the attributes of `group`, a group of a local store, as `group.update_attributes`
    does (written aside and renamed into place, by zarr's store), but on the calling thread:
    zarr's own thread pool is as large as the cores, and the shard writes of the steps after
    this one may hold every one of its threads for as long as a step takes to encode.
    `fsync`: make the new `zarr.json` reach the disk before returning."""
    group.metadata.attributes.update(attributes)
    document = group.metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"]
    key = f"{group.path}/zarr.json".lstrip("/")
    # The store's set() in an event loop of this thread's: its file write runs on that loop's
    # own thread, not in zarr's pool.
    asyncio.run(group.store.set(key, document))
    if fsync:
        sync_file(Path(group.store.root) / key)


def sync_file(path: Path) -> None:
    """Make `path`'s bytes and its entry in its folder reach the disk."""
    _sync(path)
    _sync(path.parent)


def _sync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _direct_io_wanted() -> bool:
    return os.environ.get(DIRECT_IO_ENV, "1") != "0"


def takes_direct_io(folder: Path) -> bool:
    """Whether a file in `folder` can be written with O_DIRECT (Linux, and not every file
    system): one page written and removed."""
    flag = getattr(os, "O_DIRECT", None)
    if flag is None:
        return False
    probe = folder / f"direct-io.{uuid.uuid4().hex}.partial"
    try:
        descriptor = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | flag, 0o600)
    except OSError:
        return False
    try:
        with mmap.mmap(-1, mmap.PAGESIZE) as page:  # page-aligned, as O_DIRECT asks
            os.write(descriptor, page)
        return True
    except OSError:
        return False
    finally:
        os.close(descriptor)
        probe.unlink(missing_ok=True)


def disk_sync_rate(folder: Path, nbytes: int, *, files: int = 1, block_bytes: int = 2**20) -> float:
    """Bytes per second the disk under `folder` takes and syncs, written as the writer writes
    its shards (past the page cache where the file system takes O_DIRECT, then fsync): the
    ceiling for durable steps there.

    `nbytes` in all, split over `files` written side by side (as several shards are in flight
    at once), in writes of `block_bytes`. The files are removed again.
    """
    direct = os.O_DIRECT if _direct_io_wanted() and takes_direct_io(folder) else 0
    block = mmap.mmap(-1, block_bytes)  # page-aligned, as O_DIRECT asks
    block.write(os.urandom(block_bytes))  # incompressible, should the file system compress
    writes = max(1, nbytes // block_bytes // files)
    probes = [folder / f"disk-rate.{uuid.uuid4().hex}.partial" for _ in range(files)]

    def write(path: Path) -> None:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | direct, 0o600)
        try:
            for _ in range(writes):
                os.write(descriptor, block)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)

    start = time.perf_counter()
    try:
        with ThreadPoolExecutor(files, thread_name_prefix="attnscope-disk-rate") as pool:
            list(pool.map(write, probes))
        seconds = time.perf_counter() - start
    finally:
        block.close()
        for path in probes:
            path.unlink(missing_ok=True)
    return files * writes * block_bytes / seconds


def unwritten_bytes_allowed(proc: Path = Path("/proc")) -> int | None:
    """Bytes of written but unsynced pages Linux lets writers leave before it makes them wait
    for the disk (its dirty-page throttling starts halfway between the background and the
    foreground limits, `vm.dirty_*`, taken of the free and file-cache memory); None elsewhere."""
    try:
        vm = {
            name: int((proc / "sys/vm" / name).read_text())
            for name in (
                "dirty_bytes",
                "dirty_ratio",
                "dirty_background_bytes",
                "dirty_background_ratio",
            )
        }
        meminfo = {
            line.split(":")[0]: int(line.split()[1]) * 1024
            for line in (proc / "meminfo").read_text().splitlines()
        }
        dirtyable = meminfo["MemFree"] + meminfo["Active(file)"] + meminfo["Inactive(file)"]
    except (OSError, KeyError, ValueError, IndexError):
        return None
    limit = vm["dirty_bytes"] or dirtyable * vm["dirty_ratio"] // 100
    background = vm["dirty_background_bytes"] or dirtyable * vm["dirty_background_ratio"] // 100
    if background >= limit:
        background = limit // 2  # as the kernel corrects it
    return (limit + background) // 2


def _make_folders(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; return those created, outermost first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
    return list(reversed(missing))
