"""Open trace stores read-only: list runs, check the format version and partial runs.

Paths may be local directories, fsspec URLs (`memory://`, `file://`, `s3://` with s3fs, ...), or
an already built zarr `Store`. Opening reads metadata and the small coordinate arrays only; the
attention maps stay in the store as dask arrays over its chunks until a reduction asks for them.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import dask.base
import numpy as np
import xarray as xr
import zarr
from zarr.abc.store import Store
from zarr.errors import ContainsArrayError, GroupNotFoundError
from zarr.storage import FsspecStore, LocalStore

from . import store_format as sf
from . import tensorstore_reader, trust
from .consistency import run_findings
from .errors import SpanError
from .selection import SelectionError, describe_values
from .spans import RowReader, Spans, span_view

PathLike = str | os.PathLike | Store


class PartialRunWarning(UserWarning):
    """A run that is still recording, failed, or misses steps: only its complete steps are used."""


@dataclass(frozen=True)
class RunInfo:
    """What the store says about one run, read from metadata only."""

    name: str
    status: str
    steps: tuple[int, ...]
    steps_complete: tuple[int, ...]
    attrs: Mapping[str, Any]

    @property
    def steps_missing(self) -> tuple[int, ...]:
        """Steps of the run's step coordinate that are not listed complete."""
        done = set(self.steps_complete)
        return tuple(s for s in self.steps if s not in done)

    @property
    def is_complete(self) -> bool:
        """Whether the run finished and every step is durable."""
        return self.status == sf.COMPLETE and not self.steps_missing


def location(path: PathLike) -> str:
    """How messages name the store at `path`."""
    return repr(path) if isinstance(path, Store) else str(path)


def read_only_store(path: PathLike, storage_options: Mapping[str, Any] | None = None) -> Store:
    """The zarr store at a path, URL or store, read-only; FileNotFoundError for no local path."""
    if isinstance(path, Store):
        return path if path.read_only else path.with_read_only(True)
    text = os.fspath(path)
    if "://" in text:
        store = FsspecStore.from_url(text, read_only=True, storage_options=storage_options)
        # fsspec reuses file system instances and their cached listings; a store is read as it
        # is now (a recorder may have added runs since this process last looked).
        store.fs.invalidate_cache()
        return store
    if storage_options:
        raise ValueError(f"storage_options apply to fsspec URLs only, not to the path {text!r}")
    if not os.path.exists(text):
        raise FileNotFoundError(f"no trace store at {text!r}: the path does not exist")
    if not os.path.isdir(text):
        raise sf.FormatError(
            f"{text} is a file, not a trace store (a trace store is a folder with a zarr.json)"
        )
    return LocalStore(text, read_only=True)


def open_store(path: PathLike, storage_options: Mapping[str, Any] | None = None) -> zarr.Group:
    """The root group of a trace store, opened read-only, with its format version checked.

    Raises FormatError when `path` is no Zarr group or not an attnscope trace of a version this
    code reads, and FileNotFoundError when a local path does not exist.
    """
    where = location(path)
    store = read_only_store(path, storage_options)
    # Untrusted metadata is checked as plain JSON before zarr builds anything from it.
    trust.check_root(store, where)
    try:
        root = zarr.open_group(store, mode="r", zarr_format=3, use_consolidated=False)
    except (GroupNotFoundError, ContainsArrayError) as exc:
        raise sf.FormatError(
            f"{where} is not an attnscope trace: there is no Zarr group there ({exc})"
        ) from None
    sf.check_version(dict(root.attrs), where=where)
    return root


def _small(group: zarr.Group, name: str, where: str) -> np.ndarray:
    """A small coordinate array read whole; a damaged chunk raises CorruptChunkError naming it."""
    array = group[name]
    return trust.CheckedArray(array, f"{group.path}/{name} in {where}")[...]


def _run_info(name: str, group: zarr.Group, where: str) -> RunInfo:
    attrs = dict(group.attrs)
    steps = tuple(int(s) for s in _small(group, "step", where)) if "step" in group else ()
    complete = tuple(int(s) for s in attrs.get(sf.STEPS_COMPLETE, []))
    return RunInfo(
        name=name,
        status=str(attrs.get(sf.STATUS, "unknown")),
        steps=steps,
        steps_complete=complete,
        attrs=attrs,
    )


def list_runs(
    path: PathLike | zarr.Group, storage_options: Mapping[str, Any] | None = None
) -> list[RunInfo]:
    """The runs of a store in the order they were started, from metadata only."""
    if isinstance(path, zarr.Group):
        return _list_runs(path, repr(path.store))
    return _list_runs(open_store(path, storage_options), location(path))


def _list_runs(root: zarr.Group, where: str) -> list[RunInfo]:
    # Runs are found by listing, and each one's metadata is checked as plain JSON before zarr
    # parses it; other children are never parsed at all.
    prefix = f"{root.path}/" if root.path else ""
    entries = trust.list_dir(root.store, prefix)
    infos = []
    for name in sorted((e for e in entries if sf.run_index(e) is not None), key=sf.run_index):
        meta = trust.read_json(root.store, f"{prefix}{name}/zarr.json", where)
        if meta is None:
            continue  # a run name claimed by a recorder that never wrote it: not a run
        # Only the run's attributes and step coordinate are read here: check those first.
        trust.check_run(root.store, f"{prefix}{name}", where, arrays=["step"], meta=meta)
        with sf.quiet_zarr():
            infos.append(_run_info(name, root[name], where))
    if not infos:
        nodes = [
            e
            for e in entries
            if not e.endswith(".partial") and trust.exists(root.store, f"{prefix}{e}/zarr.json")
        ]
        raise sf.FormatError(
            f"{where} holds no runs: no {sf.RUN_PREFIX}NNNN groups (groups found: "
            f"{nodes or 'none'})"
        )
    return infos


def pick_run(infos: list[RunInfo], run: str | int | None, where: str) -> RunInfo:
    """The run named (`"run-0003"`) or counted (`3`) among `infos`; None: the latest."""
    if run is None:
        return infos[-1]
    if isinstance(run, (int, np.integer)) or (isinstance(run, str) and run.isdigit()):
        name = sf.run_name(int(run))
    else:
        name = run
    for info in infos:
        if info.name == name:
            return info
    listing = ", ".join(f"{i.name} ({i.status})" for i in infos)
    raise SelectionError(f"unknown run {run!r} in {where}; runs: {listing}")


def _partial_message(info: RunInfo, where: str, complete_only: bool) -> str | None:
    missing = info.steps_missing
    if info.status == sf.COMPLETE and not missing:
        return None
    if sf.is_failed(info.status):
        state = f"failed ({info.status})"
    elif info.status == sf.RECORDING:
        state = "is still recording"
    else:
        state = f"has status {info.status!r}"
    head = f"{info.name} in {where} {state}"
    if not missing:
        return f"{head}; all its {len(info.steps)} steps are written"
    if not complete_only:
        return (
            f"{head}: steps {describe_values(missing)} are not complete (unwritten maps read NaN)"
        )
    done = [s for s in info.steps if s in set(info.steps_complete)]
    return (
        f"{head}: steps {describe_values(missing)} are missing; using the {len(done)} complete "
        f"steps {describe_values(done) or 'none'}"
    )


# Bytes of one dask chunk by default: large enough that a reduction over a FLUX run is a few
# hundred tasks rather than tens of thousands, small enough that a laptop's threads each holding
# a couple of chunks (and a span's float64 sum of one) stay within a few hundred MB.
CHUNK_BYTES = 16 * 2**20
# A token row's own chunks (span views, `_row_reader`): 24 MiB holds a FLUX.1-dev row's 57 layers
# of a step (22.4 MB). Measured on the benchmark's store (two cores, TensorStore decoding on
# both), alternating in one process: the mean of every span, medians 696, 835 and 875 MB/s with
# 8, 16 and 32 MiB chunks; the steps' whole rows in separate processes 838-1084 MB/s, peak RSS
# 662 MiB, against 660-797 MB/s and 387 MiB with 8 MiB; one word's span 0.47 s against 0.91 s.
# Fewer, larger tasks: each task's scheduling holds the GIL that the reads and sums wait on.
ROW_CHUNK_BYTES = 24 * 2**20


def _default_chunks(group: zarr.Group) -> dict[str, int]:
    """Dask chunks of whole stored maps: one step, all heads, as many layers as fit; all token
    rows at once (version 2: every span is read from the same chunks, each chunk once; a
    video's rows as many as fit) or one span (version 1). Over the network (fsspec URLs) one
    layer a chunk, so a question about one map fetches that layer's rows, not the step's."""
    arrays = [group[name] for name in sf.DIRECTIONS if name in group]
    if not arrays:
        return {}
    _, n_layer, n_head, n_rows, *cells = arrays[0].shape
    per_map = n_head * math.prod(cells) * arrays[0].dtype.itemsize  # one row of one layer
    if arrays[0].metadata.dimension_names[3] == "span":
        return {"step": 1, "layer": max(1, min(n_layer, CHUNK_BYTES // per_map)), "span": 1}
    layers = max(1, min(n_layer, CHUNK_BYTES // (per_map * n_rows)))
    if not isinstance(group.store, LocalStore):
        layers = 1
    # A video's rows can outgrow a chunk on their own (Wan at 480p: 5 MB a row of 40 heads).
    rows = -1 if per_map * n_rows <= CHUNK_BYTES else max(1, CHUNK_BYTES // per_map)
    return {"step": 1, "layer": layers, "token": rows}


def open_trace(
    path: PathLike,
    run: str | int | None = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
    chunks: Mapping[str, int] | None = None,
    complete_only: bool = True,
    spans: Spans | None = None,
    tokens: bool = False,
) -> xr.Dataset:
    """One run of a trace store as a lazy, dask-backed `xarray.Dataset`, its maps per span.

    `run` is a run name (`"run-0001"`) or index (`1`); by default the only or latest run.
    `spans` chooses the spans (default: those stored with the run): names, phrases of the
    prompt, token ranges `"3:7"` or `(3, 7)`, or a mapping of names to those
    (`analysis.spans.span_view`); `tokens=True` gives the stored token rows instead (dim
    `token`). Only metadata and coordinates are read. A partial or failed run warns
    (PartialRunWarning) naming its missing steps and keeps only its complete ones
    (`complete_only=False` keeps them all, NaN where unwritten). `chunks` overrides the dask
    chunks of the stored rows and of the spans' rows (default: one step, all token rows and
    heads, and as many layers as fit in CHUNK_BYTES, a whole number of stored chunks; a span
    reads each of its rows on its own, as many layers as fit in ROW_CHUNK_BYTES). A selection
    of token rows reads only the stored chunks it needs, a span only its rows' chunks, and a
    selection from a view of one span only the stored chunks it needs. `storage_options` go
    to fsspec for URLs.
    """
    where = location(path)
    root = open_store(path, storage_options)
    version = root.attrs[sf.FORMAT_ATTR]
    if version == 1 and tokens:
        raise SelectionError(
            f"{where} is a format-1 store: its runs hold the spans chosen when recording, not "
            f"token rows"
        )
    info = pick_run(_list_runs(root, where), run, where)
    arrays = trust.check_run(root.store, info.name, where)
    message = _partial_message(info, where, complete_only)
    if complete_only and info.steps and not set(info.steps) & set(info.steps_complete):
        raise SelectionError(
            f"{info.name} in {where} has no complete step yet (status {info.status!r}); "
            f"open it with complete_only=False to see its unwritten (NaN) maps"
        )
    group = root[info.name]
    _refuse_inconsistent(group, info, arrays, where)
    # Opened with zarr-python's own codec pipeline, which checks every chunk's CRC32C, partial
    # reads of a shard included; the maps of a local store are read through TensorStore, which
    # checks them as well. zarrs (0.2.3), which writes the maps, skips that check when it reads
    # part of a shard, and most reads are: a damaged chunk would be drawn.
    # Span views read each token row in chunks of their own, unless the caller chose chunks.
    row_chunks = chunks is None
    chunks = _default_chunks(group) if chunks is None else chunks
    with sf.quiet_zarr():
        try:
            # Opened without dask: xarray decodes the run lazily, the small non-index
            # coordinates (timestep, sigma, layer_kind, token_text, ...) are read here, one read
            # each, and the maps become dask arrays of their own (_checked_variables). Chunked
            # by xarray, each 1-D coordinate would be read in the maps' chunks: 77 reads, not 8,
            # on the benchmark's store (one step a chunk), 115-130 ms of a 300 ms opening.
            ds = xr.open_zarr(
                root.store, group=info.name, consolidated=False, chunks=None, zarr_format=3
            )
            names = [name for name in ds.coords if name not in ds.indexes]
            ds = ds.assign_coords({name: ds.coords[name].variable.compute() for name in names})
        except Exception:
            # Name the damaged coordinate chunk, if that is what failed.
            _diagnose(group, arrays, info.name, where)
            raise
        ds, dropped, sources = _checked_variables(ds, group, info, where, chunks)
    read_row = _row_reader(ds, sources, own_chunks=row_chunks)
    ds.attrs.update(run=info.name, store=where)
    if dropped:
        extra = f"; its {' and '.join(dropped)} was never written"
        message = (message or f"{info.name} in {where} has status {info.status!r}") + extra
    if message is not None:
        warnings.warn(message, PartialRunWarning, stacklevel=2)
        if complete_only and info.steps_missing:
            done = set(info.steps_complete)
            ds = ds.sel(step=[s for s in info.steps if s in done])
    if version == 1:
        return ds if spans is None else _stored_spans(ds, spans, where)
    return ds if tokens else span_view(ds, spans, read_row=read_row)


def _stored_spans(ds: xr.Dataset, spans: Spans, where: str) -> xr.Dataset:
    """The named spans of a format-1 run (its only ones)."""
    names = [spans] if isinstance(spans, str) else list(spans)
    stored = [str(s) for s in ds.span.values]
    unknown = [n for n in names if not isinstance(n, str) or n not in stored]
    if unknown:
        raise SpanError(
            f"unknown span {unknown[0]!r}: {where} is a format-1 store, whose runs hold only "
            f"the spans chosen when recording: {', '.join(stored)}"
        )
    return ds.sel(span=names)


def _refuse_inconsistent(
    group: zarr.Group, info: RunInfo, arrays: Mapping[str, Any], where: str
) -> None:
    """Raise FormatError for the first finding of `run_findings` that stops a reader."""
    coords = {}
    for name, meta in arrays.items():
        if len(meta["shape"]) > 1:
            continue
        array = group[name]  # each a metadata read: once
        if array.nchunks_initialized == array.nchunks:
            label = f"{info.name}/{name} in {where}"
            coords[name] = np.asarray(trust.CheckedArray(array, label, dims=meta["dims"])[...])
    with sf.quiet_zarr():
        keepbits = {d: sf.keepbits_of(group[d]) for d in sf.DIRECTIONS if d in arrays}
    for finding in run_findings(info.name, info.attrs, arrays, coords, keepbits):
        if finding.blocks_reading:
            damaged = ": the store is damaged" if finding.level == "error" else ""
            raise sf.FormatError(
                f"{info.name} in {where} {finding.message}{damaged}; `attnscope verify` lists "
                f"every problem"
            )


def _diagnose(group: zarr.Group, arrays: Mapping[str, Any], run: str, where: str) -> None:
    """Raise CorruptChunkError for the first small array of `group` that cannot be decoded."""
    for name, meta in arrays.items():
        if len(meta["shape"]) > 1:
            continue
        label = f"{run}/{name} in {where}"
        trust.CheckedArray(group[name], label, dims=meta["dims"])[...]


def _checked_variables(
    ds: xr.Dataset, group: zarr.Group, info: RunInfo, where: str, chunks: Mapping[str, Any]
) -> tuple[xr.Dataset, list[str], dict[str, trust.CheckedArray]]:
    """Read every data variable through trust.CheckedArray, in dask chunks of `chunks` (see
    `_dask_chunks`); drop what was never written. Also return the CheckedArray of each variable
    read through one.

    The image and entity masks are written whole, at the end and the start of a run: when a
    run that is not complete lacks their object they are dropped (never drawn as zeros); when a
    complete run lacks it, reading it raises.
    """
    labels = {
        dim: [v.item() if isinstance(v, np.generic) else v for v in ds[dim].values]
        for dim in ("step", "layer", "head", "span", "token")
        if dim in ds.coords
    }
    done = set(info.steps_complete)
    listed = [i for i, step in enumerate(info.steps) if step in done]
    skipped = sf.skipped_positions(info.attrs, info.steps, labels.get("layer", []))
    replaced, dropped, sources = {}, [], {}
    for name, var in ds.data_vars.items():
        var_chunks = _dask_chunks(var.variable, chunks)
        array = group.get(name)
        if array is None or var.dtype != array.dtype or var.shape != array.shape:
            # xarray decoded it (never this format's variables): read by xarray, same chunks
            replaced[name] = var.chunk(dict(zip(var.dims, var_chunks, strict=True)))
            continue
        label = f"{info.name}/{name} in {where}"
        missing = None
        if name not in sf.DIRECTIONS and array.nchunks_initialized < array.nchunks:
            if not info.is_complete:
                dropped.append(str(name))
                continue
            missing = (
                f"{label}: the run is complete but the object "
                f"{trust.object_key(array, (0,) * array.ndim)} holding its {name} is missing; "
                f"the store is damaged"
            )
        checked = trust.CheckedArray(
            array,
            label,
            listed=listed if name in sf.DIRECTIONS else (),
            labels=labels,
            dims=[str(d) for d in var.dims],
            missing=missing,
            skipped=skipped if name in sf.DIRECTIONS else (),
            reader=tensorstore_reader.reader_for(array) if name in sf.DIRECTIONS else None,
        )
        token = dask.base.tokenize(where, info.name, name, var_chunks, listed, missing, skipped)
        data = _dask_array(checked, var_chunks, f"attnscope-{name}-{token}")
        replaced[name] = var.copy(data=data)
        sources[name] = checked
    ds = ds.drop_vars(dropped).assign(replaced)
    if "step" in ds.dims and "layer" in ds.dims:
        computed = np.ones((ds.sizes["step"], ds.sizes["layer"]), dtype=bool)
        for step, layer in skipped:
            computed[step, layer] = False
        ds = ds.assign_coords(computed=(("step", "layer"), computed))
    return ds, dropped, sources


def _dask_chunks(var: xr.Variable, chunks: Mapping[str, Any]) -> tuple[tuple[int, ...], ...]:
    """Dask chunks of `var` as `xarray.open_zarr(chunks=chunks)` gives them: `chunks` for the
    dims it names, the stored chunks for the others."""
    stored = var.encoding.get("preferred_chunks", {})
    preferred = tuple(stored.get(d, n) for d, n in zip(var.dims, var.shape, strict=True))
    wanted = tuple(chunks.get(d) or p for d, p in zip(var.dims, preferred, strict=True))
    return da.core.normalize_chunks(
        wanted, shape=var.shape, dtype=var.dtype, previous_chunks=preferred
    )


def _dask_array(array: Any, chunks: Any, name: str) -> da.Array:
    """`array` (a CheckedArray, or a RowView of one) as a dask array read chunk by chunk.

    The fancy getter: dask fuses the first selection after a read into it (lists of positions
    included), so a selection reads only the stored chunks it asks for."""
    return da.from_array(
        array,
        chunks=chunks,
        name=name,
        asarray=False,
        fancy=True,
        meta=np.empty((0,) * array.ndim, dtype=array.dtype),
    )


def _row_reader(
    ds: xr.Dataset, sources: Mapping[str, trust.CheckedArray], *, own_chunks: bool
) -> RowReader:
    """Each token row of the maps in `ds` as a dask array of its own, read from the store
    (trust.RowView): a span reads only its rows, and in a view of one span a selection from it
    later (a step, a layer, a head) is fused into the reads. A row is the same dask array
    wherever it is asked for (a word's span and the prompt's share the word's row: it is read
    once). `own_chunks`: chunked by `_row_chunks`, else as the token rows are."""

    def read(maps: xr.DataArray, index: int) -> xr.DataArray:
        name = str(maps.name)
        if name not in sources:
            return maps.isel(token=slice(index, index + 1))
        whole = ds[name].isel(token=slice(index, index + 1))
        view = trust.RowView(sources[name], whole.dims.index("token"), index, index + 1)
        chunks = _row_chunks(whole) if own_chunks else whole.data.chunks
        token = dask.base.tokenize(ds[name].data.name, index, chunks)
        row = whole.copy(data=_dask_array(view, chunks, f"attnscope-{name}-row-{token}"))
        # open_trace may have kept only some steps (the complete ones): those, as `maps` has.
        if row.sizes["step"] != maps.sizes["step"]:
            row = row.sel(step=maps.step)
        return row

    return read


def _row_chunks(row: xr.DataArray) -> tuple[tuple[int, ...], ...]:
    """Dask chunks of one token row's maps: those of the token rows, with as many layers as
    fit in ROW_CHUNK_BYTES. Over the network too, where the token rows hold one layer a chunk:
    through a file:// URL, with one layer, the mean of every span took 37 s against 13 s (and
    16.6 s for the token rows' own chunks), one word's span 7.0 s against 1.8 s."""
    chunks = list(row.data.chunks)
    if "layer" in row.dims:
        axis = row.dims.index("layer")
        chunks[axis] = da.core.normalize_chunks(row_layers(row), (row.sizes["layer"],))[0]
    return tuple(chunks)


def row_layers(maps: xr.DataArray) -> int:
    """How many layers of one step of one token row of `maps` (a direction's token rows, or
    one of them) a dask chunk of a span's row holds: as many as fit in ROW_CHUNK_BYTES, at
    least one, at most all."""
    per_layer = maps.dtype.itemsize * math.prod(
        n for d, n in maps.sizes.items() if d not in ("step", "layer", "token")
    )
    return max(1, min(maps.sizes["layer"], ROW_CHUNK_BYTES // per_layer))


def _tokens(group: zarr.Group, arrays: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    """The token rows of a format-2 run: position, count, text, segment, padding."""
    names = ("token", *sf.TOKEN_COORDS)
    if not all(name in arrays for name in names):
        return []
    rows = sf.token_rows({name: _small(group, name, where) for name in names})
    return [
        {
            "position": r.position,
            "count": r.count,
            "text": r.text,
            "segment": r.segment,
            "padding": r.padding,
        }
        for r in rows
    ]


def _stored(array: zarr.Array) -> tuple[int, int]:
    """(bytes on disk, bytes of the chunks written once decoded) of one array."""
    written = array.nchunks_initialized * int(np.prod(array.chunks)) * array.dtype.itemsize
    return array.nbytes_stored(), written


@sf.quiet_zarr()
def trace_info(
    path: PathLike,
    run: str | int | None = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A JSON-able summary of a store and one run (default the latest), from metadata only.

    Keys: `store`, `format`, `runs` (name, status, steps, steps_complete, prompt) and `run`:
    its name, status, missing steps, prompt, spans with their token indices and strings, the
    text segments with their positions, the token rows (position, count, text, segment), dims,
    layer kinds, variables with their bytes on disk, bytes written and compression ratio, the
    image and entity masks if present, the stated error bound and other attributes.
    """
    where = location(path)
    root = open_store(path, storage_options)
    infos = _list_runs(root, where)
    info = pick_run(infos, run, where)
    trust.check_run(root.store, info.name, where)
    group = root[info.name]
    with sf.quiet_zarr():
        arrays = dict(group.arrays())
    variables = {}
    for name in sf.DIRECTIONS:
        if name in arrays:
            disk, written = _stored(arrays[name])
            variables[name] = {
                "dtype": str(arrays[name].dtype),
                "shape": list(arrays[name].shape),
                "bytes_on_disk": disk,
                "bytes_written": written,
                "compression_ratio": written / disk if disk else None,
            }
    dims = {}
    layout = next((arrays[d].metadata.dimension_names for d in sf.DIRECTIONS if d in arrays), ())
    for dim in layout or sf.DIMS:
        if dim in arrays:
            dims[dim] = int(arrays[dim].shape[0])
    kinds = [str(k) for k in _small(group, "layer_kind", where)] if "layer_kind" in arrays else []
    attrs = info.attrs
    spans = attrs.get(sf.SPANS, {})
    tokens = attrs.get(sf.SPAN_TOKENS, {})
    span_names = [str(s) for s in _small(group, "span", where)] if "span" in arrays else list(spans)
    return {
        "store": where,
        "format": root.attrs[sf.FORMAT_ATTR],
        "runs": [
            {
                "name": i.name,
                "status": i.status,
                "steps": len(i.steps),
                "steps_complete": len(set(i.steps) & set(i.steps_complete)),
                "prompt": i.attrs.get("prompt"),
            }
            for i in infos
        ],
        "run": {
            "name": info.name,
            "status": info.status,
            "steps_missing": list(info.steps_missing),
            "prompt": attrs.get("prompt"),
            "spans": {
                name: {"tokens": spans.get(name, []), "strings": tokens.get(name, [])}
                for name in span_names
            },
            "segments": attrs.get(sf.SEGMENTS, {}),
            "skipped": len(attrs.get(sf.SKIPPED) or []),
            "tokens": _tokens(group, arrays, where),
            "dims": dims,
            "layer_kinds": {kind: kinds.count(kind) for kind in sf.LAYER_KINDS if kind in kinds},
            "steps": list(info.steps),
            "variables": variables,
            "image": list(arrays["image"].shape) if "image" in arrays else None,
            "entities": (
                [str(e) for e in _small(group, "entity", where)] if "entity_mask" in arrays else []
            ),
            "bytes_on_disk": sum(a.nbytes_stored() for a in arrays.values()),
            "attrs": {
                key: value
                for key, value in attrs.items()
                if key
                not in (
                    sf.SPANS,
                    sf.SPAN_TOKENS,
                    sf.WORDS,
                    sf.SEGMENTS,
                    sf.SKIPPED,
                    sf.STEPS_COMPLETE,
                )
            },
        },
    }
