"""Reading a trace straight from an S3-compatible bucket (moto's server): lazily, by the chunk."""

from __future__ import annotations

import numpy as np
import pytest
import s3fs
import xarray as xr
from synthetic_trace import Run, write_store

import analysis
from analysis.cli import main


@pytest.fixture
def bucket_store(s3, tmp_path):
    """A synthetic store written locally, uploaded to a bucket; (local path, URL, store bytes)."""
    local = tmp_path / "sweep.zarr"
    layers = tuple(f"transformer_blocks.{i}" for i in range(4))
    layers += tuple(f"single_transformer_blocks.{i}" for i in range(8))
    write_store(local, [Run(steps=16, layers=layers, heads=2, grid=(32, 32))])
    fs = s3fs.S3FileSystem(**s3.storage_options, skip_instance_cache=True)
    url = f"s3://{s3.bucket()}/sweep.zarr"
    fs.put(str(local), url, recursive=True)
    stored = sum(p.stat().st_size for p in local.rglob("*") if p.is_file())
    return local, url, stored


class Fetched:
    """Counts the bytes s3fs receives from the server (every read zarr makes goes through it)."""

    def __init__(self, monkeypatch):
        self.bytes = 0
        real_cat, real_ranges = s3fs.S3FileSystem._cat_file, s3fs.S3FileSystem._cat_ranges
        counter = self

        async def cat_file(self, *args, **kwargs):
            data = await real_cat(self, *args, **kwargs)
            counter.bytes += len(data)
            return data

        async def cat_ranges(self, *args, **kwargs):
            parts = await real_ranges(self, *args, **kwargs)
            counter.bytes += sum(len(p) for p in parts if isinstance(p, bytes))
            return parts

        monkeypatch.setattr(s3fs.S3FileSystem, "_cat_file", cat_file)
        monkeypatch.setattr(s3fs.S3FileSystem, "_cat_ranges", cat_ranges)


def test_a_bucket_store_reads_as_the_local_one(bucket_store, s3):
    local, url, _ = bucket_store
    remote = analysis.open_trace(url, storage_options=s3.storage_options)
    plain = xr.open_zarr(local, group="run-0000", consolidated=False)
    np.testing.assert_array_equal(
        remote.txt2img_tokens.values, plain.txt2img.values
    )  # the stored rows, byte for byte
    assert remote.attrs["store"] == url


def test_one_map_fetches_under_one_percent_of_the_store(bucket_store, s3, monkeypatch):
    _, url, stored = bucket_store
    fetched = Fetched(monkeypatch)
    ds = analysis.open_trace(url, storage_options=s3.storage_options)
    one = ds.txt2img.sel(span="cat").isel(step=5, layer=2, head=1).values
    assert one.shape == (32, 32) and np.isfinite(one).all()
    assert 0 < fetched.bytes < 0.01 * stored, (fetched.bytes, stored)


def test_the_cli_reads_a_bucket_through_the_standard_aws_variables(bucket_store, tmp_path):
    _, url, _ = bucket_store
    out = tmp_path / "cat.png"
    assert main(["heatmap", url, "--span", "cat", "--step", "5", "-o", str(out)]) == 0
    assert out.stat().st_size > 0
