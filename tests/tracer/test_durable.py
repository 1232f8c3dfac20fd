"""Staged step shards: renamed into place whole, synced, readable by plain zarr; a run's
attributes written without zarr's thread pool."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from zarr.core.sync import sync
from zarr.storage import LocalStore, MemoryStore

from analysis import store_format as sf
from tracer.durable import (
    DIRECT_IO_ENV,
    StagedShards,
    disk_sync_rate,
    takes_direct_io,
    unwritten_bytes_allowed,
    write_attributes,
)

SHAPE = (3, 2, 4, 2, 8, 8)  # step, layer, head, token, y, x


def make_array(path: Path) -> zarr.Array:
    root = zarr.open_group(LocalStore(path), mode="w", zarr_format=3)
    return root.create_array(
        "txt2img",
        shape=SHAPE,
        chunks=(1, 1, SHAPE[2], 1, 8, 8),
        shards=(1, *SHAPE[1:]),
        dtype="float32",
        fill_value=np.float32("nan"),
        dimension_names=list(sf.DIMS),
        **sf.codecs(),
    )


def test_a_staged_step_reads_back_through_plain_zarr_and_xarray(tmp_path):
    array = make_array(tmp_path / "s.zarr")
    staged = StagedShards(array)
    values = np.random.default_rng(0).random(SHAPE[1:], dtype=np.float32)
    staged.write(1, values)
    plain = zarr.open_array(LocalStore(tmp_path / "s.zarr"), path="txt2img", mode="r")
    np.testing.assert_array_equal(plain[1], values)
    assert np.isnan(plain[0]).all() and np.isnan(plain[2]).all()
    # The staging folder sits inside the array's folder, where no reader looks.
    opened = xr.open_zarr(tmp_path / "s.zarr", consolidated=False)
    np.testing.assert_array_equal(opened.txt2img.isel(step=1).values, values)
    leftovers = [p.name for p in (tmp_path / "s.zarr" / "txt2img").iterdir()]
    assert any(name.endswith(".partial") for name in leftovers)
    staged.close()
    assert sorted(p.name for p in (tmp_path / "s.zarr" / "txt2img").iterdir()) == [
        "c",
        "zarr.json",
    ]


@pytest.fixture
def synced(monkeypatch) -> list[str]:
    """The paths os.fsync is called on from now, in order (each still synced)."""
    paths: list[str] = []
    real_fsync = os.fsync

    def fsync(descriptor: int) -> None:
        paths.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    return paths


def test_the_shard_and_every_folder_made_for_it_are_synced(tmp_path, synced):
    array = make_array(tmp_path / "s.zarr")
    staged = StagedShards(array)
    staged.write(2, np.ones(SHAPE[1:], dtype=np.float32))
    folder = tmp_path / "s.zarr" / "txt2img"
    shard = folder / array.metadata.encode_chunk_key((2, 0, 0, 0, 0, 0))
    # The bytes before the rename (under their staging name: one file, no folders of its own),
    # then each new folder's parent.
    assert synced[0].endswith(".partial/c.2.0.0.0.0.0")
    expected = {str(p) for p in list(shard.parents)[:7]}  # from c/2/0/0/0/0 up to txt2img
    assert str(folder) in expected
    assert set(synced[1:]) == expected
    # Nothing left of the step in the staging folder but its array's metadata.
    [staging] = folder.glob("*.partial")
    assert [p.name for p in staging.iterdir()] == ["zarr.json"]


def test_without_fsync_nothing_is_synced(tmp_path, monkeypatch):
    staged = StagedShards(make_array(tmp_path / "s.zarr"), fsync=False)
    monkeypatch.setattr(os, "fsync", lambda d: pytest.fail("fsync called"))
    staged.write(0, np.ones(SHAPE[1:], dtype=np.float32))


def test_an_all_nan_step_stores_no_shard(tmp_path):
    array = make_array(tmp_path / "s.zarr")
    StagedShards(array).write(0, np.full(SHAPE[1:], np.nan, dtype=np.float32))
    assert not (tmp_path / "s.zarr" / "txt2img" / "c").exists()
    assert array.nchunks_initialized == 0


def test_a_store_that_is_not_a_local_folder_is_refused():
    root = zarr.open_group(MemoryStore(), mode="w", zarr_format=3)
    array = root.create_array("a", shape=(1,), dtype="float32")
    with pytest.raises(TypeError, match="need a local store, got MemoryStore"):
        StagedShards(array)


def _refuse_o_direct(monkeypatch):
    """A file system that does not take O_DIRECT (some FUSE and network ones): open fails."""
    real_open = os.open

    def open_(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            raise OSError(22, "Invalid argument", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)


@pytest.mark.parametrize("disk", ["direct", "refuses O_DIRECT", "switched off", "no fsync"])
def test_synced_shards_go_past_the_page_cache_where_the_disk_takes_it(tmp_path, monkeypatch, disk):
    if disk == "refuses O_DIRECT":
        _refuse_o_direct(monkeypatch)
    if disk == "switched off":
        monkeypatch.setenv(DIRECT_IO_ENV, "0")
    array = make_array(tmp_path / "s.zarr")
    staged = StagedShards(array, fsync=disk != "no fsync")
    assert staged.direct_io == (disk == "direct" and takes_direct_io(tmp_path))
    # A shard whose size is no multiple of a page, as almost every one is: O_DIRECT pads it
    # to whole pages, and the file is cut back to its size.
    values = np.random.default_rng(1).random(SHAPE[1:], dtype=np.float32)
    staged.write(0, values)
    staged.write(2, values * 2)
    staged.close()
    plain = zarr.open_array(LocalStore(tmp_path / "s.zarr"), path="txt2img", mode="r")
    np.testing.assert_array_equal(plain[0], values)
    np.testing.assert_array_equal(plain[2], values * 2)
    assert np.isnan(plain[1]).all()


def test_the_direct_io_probe_leaves_nothing_and_says_no_where_refused(tmp_path, monkeypatch):
    assert takes_direct_io(tmp_path) == hasattr(os, "O_DIRECT")  # ext4 and tmpfs take it
    _refuse_o_direct(monkeypatch)
    assert takes_direct_io(tmp_path) is False
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("disk", ["direct", "refuses O_DIRECT"])
def test_the_disk_rate_probe_writes_and_syncs_what_it_says_and_leaves_nothing(
    tmp_path, monkeypatch, synced, disk
):
    if disk == "refuses O_DIRECT":
        _refuse_o_direct(monkeypatch)
    written: dict[str, int] = {}
    real_write = os.write

    def write(descriptor: int, data) -> int:
        path = os.readlink(f"/proc/self/fd/{descriptor}")
        written[path] = written.get(path, 0) + real_write(descriptor, data)
        return len(data)

    monkeypatch.setattr(os, "write", write)
    rate = disk_sync_rate(tmp_path, 8 * 2**20, files=4, block_bytes=2**20)
    assert rate > 0
    # Four files of 2 MiB each (beside the page that asked the disk about O_DIRECT), every
    # one synced once it was written, none left behind.
    written = {path: n for path, n in written.items() if "direct-io." not in path}
    assert sorted(written.values()) == [2 * 2**20] * 4
    assert sorted(synced) == sorted(written)
    assert all(Path(p).parent == tmp_path and p.endswith(".partial") for p in written)
    assert list(tmp_path.iterdir()) == []


def test_attributes_are_written_while_zarrs_thread_pool_is_held(tmp_path, synced):
    root = zarr.open_group(LocalStore(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    group = root.create_group("run-0000", attributes={"status": "recording", "text_len": 7})
    # Hold every thread of zarr's pool (the one its store writes and zarrs' encodes run on), as
    # the shard writes of later steps may while a step is listed.
    release = threading.Event()

    async def hold() -> None:
        await asyncio.gather(*(asyncio.to_thread(release.wait, 30) for _ in range(64)))

    holder = threading.Thread(target=sync, args=(hold(),), daemon=True)
    holder.start()
    try:
        writing = threading.Thread(
            target=write_attributes,
            args=(group, {"steps_complete": [0, 2]}),
            kwargs={"fsync": True},
        )
        writing.start()
        writing.join(10)
        assert not writing.is_alive(), "the attributes waited for zarr's thread pool"
    finally:
        release.set()
        holder.join(30)
    document = tmp_path / "s.zarr" / "run-0000" / "zarr.json"
    assert synced == [str(document), str(document.parent)]
    plain = zarr.open_group(LocalStore(tmp_path / "s.zarr"), path="run-0000", mode="r")
    expected = {"status": "recording", "text_len": 7, "steps_complete": [0, 2]}
    assert dict(plain.attrs) == expected
    assert dict(group.attrs) == expected  # the group object holds them too, for later writes
    assert sorted(p.name for p in document.parent.iterdir()) == ["zarr.json"]


def fake_proc(root: Path, vm: dict[str, int], meminfo_kib: dict[str, int]) -> Path:
    (root / "sys/vm").mkdir(parents=True)
    for name, value in vm.items():
        (root / "sys/vm" / name).write_text(f"{value}\n")
    lines = [f"{name}:{value:>16} kB" for name, value in meminfo_kib.items()]
    (root / "meminfo").write_text("\n".join(["MemTotal: 99999999 kB", *lines]) + "\n")
    return root


GIB_KIB = 2**20  # a GiB in /proc/meminfo's kB


@pytest.mark.parametrize(
    ("vm", "expected"),
    [
        # Ratios of the free and file-cache memory (12 GiB): throttling starts halfway between
        # 10% and 20%.
        ({"dirty_ratio": 20, "dirty_background_ratio": 10}, 0.15 * 12 * 2**30),
        # Set in bytes, which take precedence.
        ({"dirty_bytes": 4 * 10**9, "dirty_background_bytes": 10**9}, 2.5 * 10**9),
        # A background limit at or over the foreground one is taken as half of it.
        ({"dirty_ratio": 10, "dirty_background_ratio": 20}, 0.075 * 12 * 2**30),
    ],
)
def test_the_unwritten_bytes_allowed_are_the_kernels_throttle_point(tmp_path, vm, expected):
    vm = {
        "dirty_bytes": 0,
        "dirty_ratio": 20,
        "dirty_background_bytes": 0,
        "dirty_background_ratio": 10,
    } | vm
    meminfo = {
        "MemFree": 10 * GIB_KIB,
        "Active(file)": GIB_KIB,
        "Inactive(file)": GIB_KIB,
        "MemAvailable": 11 * GIB_KIB,
    }
    proc = fake_proc(tmp_path / "proc", vm, meminfo)
    assert unwritten_bytes_allowed(proc) == pytest.approx(expected, abs=2)
    assert unwritten_bytes_allowed(tmp_path / "no-proc") is None
