"""Which zarr codec pipeline the recording writes a store's bytes with: zarrs, where installed.

zarr-python's own pipeline encodes and decodes a shard's chunks one at a time under asyncio, so
it gains little from a second core. zarrs (a Rust codec pipeline for zarr-python) runs them on
all cores without the GIL, reading and writing the same bytes: a store written through either is
read by the other, and by any Zarr v3 reader. The pipeline is chosen when an array is opened and
stays with that array, so only the opening is wrapped.

zarrs serves local folders only (zarr's LocalStore); stores behind fsspec URLs keep zarr's own
pipeline. Setting ATTNSCOPE_ZARR_PIPELINE=zarr turns zarrs off, as a fallback and for comparing.

Reading never goes through zarrs (analysis reads through TensorStore or zarr-python's own
pipeline): zarrs 0.2.3 strips a chunk's CRC32C without checking it when it reads part of a shard,
and a damaged chunk must be refused.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator

import zarr
from zarr.storage import LocalStore

ZARRS = "zarrs.ZarrsCodecPipeline"
ENV = "ATTNSCOPE_ZARR_PIPELINE"


def uses_zarrs(store: object) -> bool:
    """Whether arrays of `store` opened under `pipeline_for(store)` get the zarrs pipeline."""
    return (
        isinstance(store, LocalStore)
        and os.environ.get(ENV, "zarrs") != "zarr"
        and importlib.util.find_spec("zarrs") is not None
    )


@contextlib.contextmanager
def pipeline_for(
    store: object, threads: int | None = None, direct_io: bool = False
) -> Iterator[None]:
    """Open arrays of `store` inside this block to read and write them through zarrs.

    `threads` caps zarrs' worker threads (default: one per core this process may use);
    `direct_io` has zarrs write files with O_DIRECT, past the page cache (the caller checks
    that the file system takes it: zarrs does not fall back). Does nothing where zarrs does not
    apply (`uses_zarrs`).
    """
    if not uses_zarrs(store):
        yield
        return
    cores = threads or _usable_cores()
    settings = {"codec_pipeline.path": ZARRS, "threading.max_workers": cores}
    with zarr.config.set(settings | {"codec_pipeline.direct_io": direct_io}):
        yield


def _usable_cores() -> int:
    """Cores this process may run on (its affinity where the OS has one, as on Linux)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
