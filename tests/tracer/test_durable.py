"""Staged step shards: renamed into place whole, synced, readable by plain zarr."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from zarr.storage import LocalStore, MemoryStore

from analysis import store_format as sf
from tracer.durable import StagedShards

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


def test_the_shard_and_every_folder_made_for_it_are_synced(tmp_path, monkeypatch):
    array = make_array(tmp_path / "s.zarr")
    staged = StagedShards(array)
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(descriptor: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    staged.write(2, np.ones(SHAPE[1:], dtype=np.float32))
    folder = tmp_path / "s.zarr" / "txt2img"
    shard = folder / array.metadata.encode_chunk_key((2, 0, 0, 0, 0, 0))
    # The bytes before the rename (under their staging name), then each new folder's parent.
    assert synced[0].endswith(".partial/c/2/0/0/0/0/0")
    expected = {str(p) for p in list(shard.parents)[:7]}  # from c/2/0/0/0/0 up to txt2img
    assert str(folder) in expected
    assert set(synced[1:]) == expected


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
