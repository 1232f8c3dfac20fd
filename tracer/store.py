"""Creating trace stores and run groups (the writer fills them step by step)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr
import zarr
from zarr.errors import ContainsArrayError, ContainsGroupError

from analysis import store_format as fmt


def open_store(path: str) -> zarr.Group:
    """The root group of the trace store at `path`, created if missing; never a foreign store."""
    root = zarr.open_group(path, mode="a", zarr_format=3)
    attrs = dict(root.attrs)
    if fmt.FORMAT_ATTR in attrs:
        fmt.check_version(attrs, where=path)
        return root
    if attrs or next(iter(root.keys()), None) is not None:
        raise fmt.FormatError(
            f"{path} holds a Zarr group that is not an attnscope trace (no {fmt.FORMAT_ATTR!r} "
            f"attribute); attnscope will not write into it. Choose another path."
        )
    root.attrs.update({fmt.FORMAT_ATTR: fmt.FORMAT_VERSION})
    return root


def _next_index(root: zarr.Group) -> int:
    indices = [fmt.run_index(name) for name in root.group_keys()]
    return max((i for i in indices if i is not None), default=-1) + 1


def create_run(
    path: str,
    coords: Mapping[str, Any],
    attrs: Mapping[str, Any],
    directions: Sequence[str],
    keepbits: int | None,
) -> tuple[str, zarr.Group]:
    """Lay down a new run group (metadata and coordinates) and return its name and group."""
    dataset, encoding = fmt.run_skeleton(coords, attrs, directions, keepbits)
    root = open_store(path)
    index = _next_index(root)
    while True:
        name = fmt.run_name(index)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr")
                dataset.to_zarr(
                    path,
                    group=name,
                    mode="w-",
                    compute=False,
                    encoding=encoding,
                    zarr_format=3,
                    consolidated=False,
                )
            break
        except (ContainsGroupError, ContainsArrayError, FileExistsError):
            # Another recorder took this name first: take the next one.
            index += 1
    return name, zarr.open_group(path, path=name, mode="r+")


def write_variable(run: zarr.Group, name: str, variable: xr.DataArray) -> None:
    """Add a whole variable (the image, entity masks) and its coordinates to an existing run.

    Written with zarr, not `xarray.to_zarr(mode="a")`, which would replace the run's attributes.
    """
    for coord_name, coord in variable.coords.items():
        if coord_name not in run:
            _put_array(run, str(coord_name), coord.values, coord.dims)
    _put_array(run, name, variable.values, variable.dims)


def _put_array(run: zarr.Group, name: str, values: np.ndarray, dims: Sequence[str]) -> None:
    is_text = values.dtype.kind in "OUT"
    array = run.create_array(
        name,
        shape=values.shape,
        dtype=str if is_text else values.dtype,
        chunks=values.shape,
        dimension_names=list(dims),
        **({} if is_text else fmt.image_encoding()),
    )
    array[...] = values
