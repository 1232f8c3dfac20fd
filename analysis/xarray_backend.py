"""`xr.open_dataset(path, engine="attnscope", group="run-0000")`: a trace read by plain xarray.

The backend is `open_trace` behind xarray's entrypoint, trust checks included, so users who live
in xarray never need attnscope's own API. `group` names the run (default: the latest).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import xarray as xr
from xarray.backends import BackendEntrypoint


class AttnscopeBackend(BackendEntrypoint):
    """Opens one run of an attnscope trace store, lazily, with its format and checksums checked."""

    description = "attnscope attention trace stores (Zarr v3), one run per group"
    open_dataset_parameters = ("filename_or_obj", "drop_variables", "group", "complete_only")

    def open_dataset(
        self,
        filename_or_obj: Any,
        *,
        drop_variables: str | Iterable[str] | None = None,
        group: str | None = None,
        complete_only: bool = True,
        storage_options: dict[str, Any] | None = None,
    ) -> xr.Dataset:
        """The run `group` of the store (see `analysis.open_trace`)."""
        from .open import open_trace

        ds = open_trace(
            filename_or_obj,
            group,
            storage_options=storage_options,
            complete_only=complete_only,
        )
        if drop_variables is not None:
            names = [drop_variables] if isinstance(drop_variables, str) else list(drop_variables)
            ds = ds.drop_vars(names)
        return ds

    def guess_can_open(self, filename_or_obj: Any) -> bool:
        """Only a folder whose root `zarr.json` carries the attnscope format attribute."""
        from . import store_format as sf

        try:
            path = os.fspath(filename_or_obj)
        except TypeError:
            return False
        meta = os.path.join(path, "zarr.json")
        if not os.path.isfile(meta):
            return False
        with open(meta, encoding="utf-8") as file:
            return sf.FORMAT_ATTR in file.read(4096)
