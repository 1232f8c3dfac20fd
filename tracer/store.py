"""Creating trace stores and run groups (the writer fills them step by step).

Several recorders may append to one store at once (processes on one machine, one folder, or
many machines, one bucket): each run's name is claimed exclusively, so each recorder gets its
own run and none rewrites another's objects. On a local path the root's `zarr.json` is created
whole, format attribute included, with one exclusive link (never rewritten afterwards), and a
run name is claimed by creating its folder (`mkdir` fails if another recorder made it first).
On an object store (fsspec URL) a run name is claimed by creating the run's `zarr.json` with a
conditional write (`If-None-Match: *`, which S3 and the common S3-compatible servers honour):
it fails if another recorder wrote it first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# Laying a run down needs dask (store_format.run_skeleton imports it when called), on a
# writer's thread during the generation's first step: imported there, dask.array (0.1 s) would
# hold the GIL from the generation. Imported with the tracer, a first run pays nothing for it.
import dask.array  # noqa: F401
import numpy as np
import xarray as xr
import zarr
from zarr.abc.store import Store
from zarr.core.buffer import Buffer
from zarr.core.sync import sync
from zarr.storage import MemoryStore

from analysis import store_format as fmt


def _local(path: str) -> Path | None:
    """The folder of a local store path; None for a URL."""
    return None if "://" in str(path) else Path(path)


def folder_beside(path: str | os.PathLike[str]) -> Path | None:
    """The nearest existing folder above local store path `path`: where the disk the store is
    (or would be) on can be asked about without touching the store. None for a URL."""
    store = _local(os.fspath(path))
    if store is None:
        return None
    folder = store.absolute().parent
    while not folder.exists():
        folder = folder.parent
    return folder


def _group_json(attributes: Mapping[str, Any]) -> str:
    """A Zarr v3 group's zarr.json with these attributes, written whole in one create."""
    return json.dumps(
        {"attributes": dict(attributes), "zarr_format": 3, "node_type": "group"}, indent=2
    )


def _create_root(folder: Path) -> None:
    """Create the store's root group, format attribute included, unless it exists: exclusive."""
    if folder.exists() and not folder.is_dir():
        raise fmt.FormatError(f"{folder} is a file, not a trace store; choose another path")
    target = folder / "zarr.json"
    if target.exists():
        return
    if folder.exists():
        entries = [e.name for e in folder.iterdir() if not e.name.endswith(".partial")]
        if entries and not target.exists():
            raise fmt.FormatError(
                f"{folder} is a folder that is not a trace store (no zarr.json; it holds "
                f"{', '.join(sorted(entries)[:5])}{', ...' if len(entries) > 5 else ''}); "
                f"attnscope will not write into it. Choose another path."
            )
    folder.mkdir(parents=True, exist_ok=True)
    metadata = _group_json({fmt.FORMAT_ATTR: fmt.FORMAT_VERSION})
    temporary = folder / f"zarr.{uuid.uuid4().hex}.partial"
    temporary.write_text(metadata)
    try:
        os.link(temporary, target)  # atomic and exclusive: another recorder may have won
    except FileExistsError:
        pass
    except OSError:
        # A file system without hard links: an exclusive create, never clobbering another's.
        try:
            with open(target, "x", encoding="utf-8") as file:
                file.write(temporary.read_text())
        except FileExistsError:
            pass
    finally:
        temporary.unlink(missing_ok=True)


def _create_root_url(path: str) -> None:
    """The same as `_create_root`, on an object store: one conditional write of zarr.json."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    if fs.exists(f"{root}/zarr.json"):
        return
    if fs.exists(root) and fs.ls(root, detail=False):
        # A recorder creating the store writes zarr.json before anything else: look again.
        fs.invalidate_cache()
        if fs.exists(f"{root}/zarr.json"):
            return
        raise fmt.FormatError(
            f"{path} holds objects but no zarr.json: it is not a trace store, and attnscope "
            f"will not write into it. Choose another path."
        )
    metadata = _group_json({fmt.FORMAT_ATTR: fmt.FORMAT_VERSION})
    with contextlib.suppress(FileExistsError):  # another recorder created it first: fine
        fs.pipe_file(f"{root}/zarr.json", metadata.encode(), mode="create")


def open_store(path: str) -> zarr.Group:
    """The root group of the trace store at `path`, created if missing; never a foreign store."""
    folder = _local(path)
    if folder is not None:
        _create_root(folder)
    else:
        _create_root_url(path)
    root = zarr.open_group(path, mode="a", zarr_format=3)
    attrs = dict(root.attrs)
    if fmt.FORMAT_ATTR in attrs:
        fmt.check_version(attrs, where=path, accepted=(fmt.FORMAT_VERSION,))
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
    objects = _run_objects(coords, attrs, directions, keepbits)
    name = claim_run(path)
    return name, _put_run(path, name, objects)


def claim_run(path: str) -> str:
    """Claim the next free run name of the store at `path`, for `lay_down_run` to fill.

    Until the run is laid down, a reader sees no run there (local folder) or a run being recorded
    with no variables yet (object store).
    """
    root = open_store(path)
    folder = _local(path)
    index = _next_index(root)
    while True:
        name = fmt.run_name(index)
        try:
            if folder is not None:
                (folder / name).mkdir()  # the claim: fails if another recorder took the name
            else:
                _claim_url(path, name)
            return name
        except FileExistsError:
            # Another recorder took this name first: take the next one.
            index += 1


def lay_down_run(
    path: str,
    name: str,
    coords: Mapping[str, Any],
    attrs: Mapping[str, Any],
    directions: Sequence[str],
    keepbits: int | None,
) -> zarr.Group:
    """Write the metadata and coordinates of run `name` (claimed by `claim_run`); its group."""
    return _put_run(path, name, _run_objects(coords, attrs, directions, keepbits))


def _put_run(path: str, name: str, objects: Mapping[str, Buffer]) -> zarr.Group:
    root = zarr.open_group(path, mode="r+", zarr_format=3)
    sync(_put_objects(root.store, name, objects))
    return zarr.open_group(path, path=name, mode="r+")


def _run_objects(
    coords: Mapping[str, Any],
    attrs: Mapping[str, Any],
    directions: Sequence[str],
    keepbits: int | None,
) -> dict[str, Buffer]:
    """A run group's objects as xarray writes them (metadata, coordinates), keyed from the run.

    xarray lays them down in memory; the store then gets them in one concurrent batch rather
    than one round trip per object, which is most of a run's fixed cost on a local disk.
    """
    dataset, encoding = fmt.run_skeleton(coords, attrs, directions, keepbits)
    objects: dict[str, Buffer] = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr")
        dataset.to_zarr(
            MemoryStore(objects),
            mode="w-",
            compute=False,
            encoding=encoding,
            zarr_format=3,
            consolidated=False,
        )
    return objects


async def _put_objects(store: Store, name: str, objects: Mapping[str, Buffer]) -> None:
    """Write a run's objects under `name`, its group's zarr.json first: from then on a reader
    lists the run, as being recorded, whether or not the rest is there yet."""
    group = "zarr.json"
    await store.set(f"{name}/{group}", objects[group])
    await asyncio.gather(
        *(store.set(f"{name}/{key}", value) for key, value in objects.items() if key != group)
    )


def _claim_url(path: str, name: str) -> None:
    """Claim run `name` of the store at URL `path`: create its group's zarr.json, exclusively.

    Raises FileExistsError when another recorder created it first. The placeholder holds the
    run's attributes (status `recording`), so a reader meanwhile sees a run being laid down.
    """
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    metadata = _group_json({fmt.STATUS: fmt.RECORDING})
    fs.pipe_file(f"{root}/{name}/zarr.json", metadata.encode(), mode="create")


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
        **(fmt.checksum_encoding() if is_text else fmt.image_encoding()),
    )
    array[...] = values
