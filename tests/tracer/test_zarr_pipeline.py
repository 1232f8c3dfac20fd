"""The zarrs pipeline reads and writes the same bytes as zarr-python's own."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from zarr.storage import LocalStore, MemoryStore

from analysis import store_format as sf
from tracer.zarr_pipeline import ENV, ZARRS, pipeline_for, uses_zarrs


def make_array(store, pipeline: str) -> zarr.Array:
    with zarr.config.set({"codec_pipeline.path": pipeline}):
        return zarr.create_array(
            store,
            shape=(2, 3, 4, 5, 16, 16),
            chunks=(1, 1, 4, 1, 16, 16),
            shards=(1, 3, 4, 5, 16, 16),
            dtype="float32",
            fill_value=np.float32("nan"),
            **sf.codecs(),
        )


def attention_like(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = rng.lognormal(-8, 1, size=(3, 4, 5, 16, 16)).astype(np.float32)
    return values


@pytest.mark.parametrize(
    ("writer", "reader"),
    [(ZARRS, "zarr.core.codec_pipeline.BatchedCodecPipeline"), (None, ZARRS)],
    ids=["zarrs-writes", "zarrs-reads"],
)
def test_either_pipeline_reads_what_the_other_wrote(tmp_path, writer, reader):
    default = "zarr.core.codec_pipeline.BatchedCodecPipeline"
    path = tmp_path / "a.zarr"
    written = make_array(LocalStore(path), writer or default)
    values = attention_like(0)
    written[1] = values
    with zarr.config.set({"codec_pipeline.path": reader}):
        read = zarr.open_array(LocalStore(path), mode="r")
        assert type(read._async_array.codec_pipeline).__name__ == reader.rsplit(".", 1)[1]
        np.testing.assert_array_equal(read[1], values)
        assert np.isnan(read[0]).all()


def test_pipeline_for_a_local_store_opens_arrays_with_zarrs(tmp_path):
    store = LocalStore(tmp_path / "a.zarr")
    with pipeline_for(store):
        array = make_array(store, zarr.config.get("codec_pipeline.path"))
    assert type(array._async_array.codec_pipeline).__name__ == "ZarrsCodecPipeline"


def test_other_stores_and_the_switch_keep_zarrs_own_pipeline(tmp_path, monkeypatch):
    assert uses_zarrs(LocalStore(tmp_path / "a.zarr"))
    assert not uses_zarrs(MemoryStore())
    monkeypatch.setenv(ENV, "zarr")
    store = LocalStore(tmp_path / "b.zarr")
    assert not uses_zarrs(store)
    with pipeline_for(store):
        array = make_array(store, zarr.config.get("codec_pipeline.path"))
    assert type(array._async_array.codec_pipeline).__name__ == "BatchedCodecPipeline"
