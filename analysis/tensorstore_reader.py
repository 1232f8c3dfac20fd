"""Reads of a local store's attention maps through TensorStore: every chunk checked, in C++.

zarr-python's own codec pipeline decodes a shard's chunks one at a time under asyncio, with a
thread hand-off per chunk: on the project's benchmark machine a mean over a FLUX.1-dev-sized
store ran at 465 MB/s decoded through it (`docs/benchmarks.md`). TensorStore (Google's C++ Zarr
v3 library) decodes a box's chunks outside the GIL, so dask's threads read side by side, and
checks each chunk's CRC32C, partial reads of a shard included (zarrs 0.2.3, which writes the
maps, skips that check there). It reads the format's own codecs (Zarr v3 spec codecs only),
and NumPy arrays come back.

Local folders only (zarr's LocalStore), and reads of more than one stored chunk
(`trust.CheckedArray`): a token row's map of one step and layer, as the viewer reads while
scrubbing, reads as fast through zarr-python, without TensorStore's import. Stores behind
fsspec URLs (S3, ...) and arrays TensorStore does not open (stores written before the format
stated its bit rounding as an attribute carry a `numcodecs.bitround` filter) read through
zarr-python, which checks them too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from zarr.storage import LocalStore

_context: Any = None  # one TensorStore context per process: its thread pools are shared


def _shared_context() -> Any:
    global _context
    if _context is None:
        import tensorstore  # on the first read: imports stay off a cold start
        from dask.system import CPU_COUNT

        # A decoding thread per core, as dask has workers: with one, every read waited on it
        # (in a 6 s mean over the benchmark's FLUX.1-dev-sized store on two cores, reads were
        # in progress 3.9 s and both workers waited on it 0.8 s), and the mean ran at 772
        # MB/s against 829 with two (medians, alternating in one process). Each decoding
        # thread keeps a malloc arena of freed blocks: the out-of-core test's mean peaked at
        # 260-276 MiB on two loaded cores against 235-276 MiB with one (its limit is 400).
        _context = tensorstore.Context({"data_copy_concurrency": {"limit": CPU_COUNT}})
    return _context


class TensorStoreReader:
    """Reads boxes of one array of a local store; picklable (a dask worker reopens it)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._array: Any = None
        self._opens: bool | None = None  # not tried yet

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])

    def opens(self) -> bool:
        """Whether TensorStore reads this array's metadata (opened on the first call)."""
        if self._opens is None:
            import tensorstore

            spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": self.path}}
            try:
                self._array = tensorstore.open(spec, read=True, context=_shared_context()).result()
                self._opens = True
            except ValueError:  # TensorStore's error for metadata it does not read
                self._opens = False
        return self._opens

    def read(self, box: Sequence[slice]) -> np.ndarray:
        """The values in `box` (one slice of step 1 per dim, within the array's shape); call
        only where `opens()`."""
        return self._array[tuple(box)].read().result()


def reader_for(array: Any) -> TensorStoreReader | None:
    """A TensorStore reader of zarr `array` where it is in a local folder (opened on first
    use); None where zarr-python reads it."""
    store = getattr(array, "store", None)
    if not isinstance(store, LocalStore):
        return None
    return TensorStoreReader(os.path.join(os.fspath(store.root), array.path, ""))
