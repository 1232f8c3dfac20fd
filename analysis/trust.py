"""What a reader may believe of a store it did not write: metadata checked first, reads after.

A trace store may come from anywhere (a colleague, a bucket, a download). Opening one must run no
code and allocate nothing its metadata claims, and a damaged one must fail loudly rather than be
plotted. Two layers do that:

Before zarr, xarray or dask act on a node, `check_root` and `check_run` read its `zarr.json` as
plain JSON (at most MAX_METADATA_BYTES of it; no pickle, no eval) and refuse with a FormatError
naming the node:

- Zarr v2 nodes (`.zgroup`, `.zarray` where no zarr.json is): traces are Zarr v3, and v2's object
  codecs unpickle (readers open Zarr v3 only, so a v2 node is never decoded either way);
- a codec outside ALLOWED_CODECS (the format's own and the standard lossless Zarr v3 ones; no
  pickle, no value-changing filter but the format's bit rounding), a storage transformer, a data
  type outside ALLOWED_DATA_TYPES;
- shapes that are not lists of non-negative integers, a dim longer than MAX_LENGTH, an array of
  more than MAX_ELEMENTS values or MAX_CHUNKS chunks, chunk shapes that are not positive or hold
  more than MAX_CHUNK_ELEMENTS (MAX_SHARD_ELEMENTS for a shard);
- variables of the format with the wrong dims or data type, dims whose sizes disagree between
  arrays, CF attributes that would rescale or reinterpret values when decoded (`scale_factor`, ...);
- run attributes of the wrong type (`status`, `steps_complete`, `spans`, `span_tokens`).

After opening, `CheckedArray` sits between dask and each zarr array: a stored chunk that cannot be
read or decoded (a CRC32C mismatch, a truncated object) raises CorruptChunkError naming the run,
the variable, the chunk (its index and labels) and the object holding it; a step the run lists
complete that reads back as unwritten (NaN: its object lost, emptied or missing a chunk) raises
too. Both subclass FormatError, so the CLI reports them as errors.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from . import store_format as sf
from .errors import CorruptChunkError
from .tensorstore_reader import TensorStoreReader

# Limits far above any real trace (FLUX at 2048², 50 steps, 57 layers, 100 spans fits with room)
# and far below what would exhaust a laptop before anything was read.
MAX_METADATA_BYTES = 16 * 2**20  # one zarr.json
MAX_LENGTH = 2**20  # one dim
MAX_ELEMENTS = 2**40  # one array (dask and numpy never allocate it whole; a sanity bound)
MAX_CHUNKS = 2**24  # one array's chunks (dask builds a task per chunk)
MAX_CHUNK_ELEMENTS = 2**28  # one chunk, decoded in one piece
MAX_SHARD_ELEMENTS = 2**32  # one shard (its index and a whole-shard write)
MAX_STRING_BYTES = 2**16  # one fixed-length string element
MAX_NDIM = 32

ALLOWED_CODECS = frozenset(
    {
        "bytes",
        "blosc",
        "zstd",
        "gzip",
        "crc32c",
        "transpose",
        "sharding_indexed",
        "vlen-utf8",
        "vlen-bytes",
        "numcodecs.bitround",
    }
)
ALLOWED_DATA_TYPES = sf.INT_TYPES | sf.FLOAT_TYPES | sf.STRING_TYPES | {"bool"}

# Attributes xarray would act on when decoding: a store of this format never carries them.
CF_TRANSFORMS = frozenset(
    {"scale_factor", "add_offset", "_Unsigned", "missing_value", "units", "calendar", "dtype"}
)

# ---------------------------------------------------------------------------------- raw access


def _sync(coroutine: Any) -> Any:
    from zarr.core.sync import sync

    return sync(coroutine)


def read_json(store: Any, key: str, where: str) -> Any | None:
    """The JSON document at `key` (None when absent), refused when too large or not JSON."""
    from zarr.abc.store import RangeByteRequest
    from zarr.core.buffer import default_buffer_prototype

    buffer = _sync(
        store.get(
            key,
            prototype=default_buffer_prototype(),
            byte_range=RangeByteRequest(0, MAX_METADATA_BYTES + 1),
        )
    )
    if buffer is None:
        return None
    raw = buffer.to_bytes()
    if len(raw) > MAX_METADATA_BYTES:
        raise sf.FormatError(
            f"{where}: {key} is larger than {MAX_METADATA_BYTES // 2**20} MiB; a trace's "
            f"metadata never is. Refusing to parse it."
        )
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise sf.FormatError(
            f"{where}: {key} is not valid JSON ({type(exc).__name__}: {exc}); the object is "
            f"damaged or truncated"
        ) from None


async def _collect(keys: Any) -> list[str]:
    return [key async for key in keys]


def list_dir(store: Any, prefix: str) -> list[str]:
    """The names directly under `prefix` (files and folders), sorted."""
    return sorted(_sync(_collect(store.list_dir(prefix))))


def list_prefix(store: Any, prefix: str) -> list[str]:
    """Every key under `prefix` (relative to the store's root)."""
    return list(_sync(_collect(store.list_prefix(prefix))))


def exists(store: Any, key: str) -> bool:
    """Whether the store holds an object at `key`."""
    return bool(_sync(store.exists(key)))


# ------------------------------------------------------------------------------ metadata checks


def _refuse(where: str, node: str, problem: str) -> sf.FormatError:
    return sf.FormatError(f"{where}: {node} {problem}; refusing to open it (untrusted metadata)")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(v) for v in value)


def _check_v2(store: Any, prefix: str, where: str) -> None:
    for name in (".zgroup", ".zarray", ".zattrs"):
        if exists(store, f"{prefix}{name}"):
            raise sf.FormatError(
                f"{where}: {prefix or 'the root '}holds Zarr v2 metadata ({prefix}{name}); "
                f"attnscope traces are Zarr v3 (zarr.json) and v2 nodes are not opened"
            )


def _check_group_node(meta: Any, where: str, node: str) -> dict[str, Any]:
    if not isinstance(meta, dict) or meta.get("zarr_format") != 3:
        raise _refuse(where, node, "is not Zarr v3 metadata (zarr_format is not 3)")
    if meta.get("node_type") != "group":
        raise _refuse(where, node, f"is a {meta.get('node_type')!r} node, not a group")
    attrs = meta.get("attributes", {})
    if not isinstance(attrs, dict):
        raise _refuse(where, node, "has attributes that are not a JSON object")
    return attrs


def check_root(store: Any, where: str) -> dict[str, Any]:
    """The root group's attributes, its metadata checked; FormatError when it is not a v3 group."""
    meta = read_json(store, "zarr.json", where)
    if meta is None:
        _check_v2(store, "", where)
        raise sf.FormatError(
            f"{where} is not an attnscope trace: there is no Zarr group there (no zarr.json)"
        )
    if isinstance(meta, dict) and meta.get("node_type") == "array":
        raise sf.FormatError(
            f"{where} is not an attnscope trace: there is no Zarr group there (its root is an "
            f"array)"
        )
    # Consolidated metadata, if any, is never used: members are read from their own zarr.json.
    return _check_group_node(meta, where, "the store's root")


def check_run_attrs(attrs: Mapping[str, Any], where: str, node: str) -> None:
    """The run attributes other code relies on have the types the format says."""
    status = attrs.get(sf.STATUS, "")
    if not isinstance(status, str) or len(status) > 10_000:
        raise _refuse(where, node, f"has a {sf.STATUS!r} attribute that is not a short string")
    steps = attrs.get(sf.STEPS_COMPLETE, [])
    if not _int_list(steps) or len(steps) > MAX_LENGTH:
        raise _refuse(
            where, node, f"has a {sf.STEPS_COMPLETE!r} attribute that is not a list of ints"
        )
    spans = attrs.get(sf.SPANS, {})
    if not isinstance(spans, dict) or not all(_int_list(v) for v in spans.values()):
        raise _refuse(where, node, f"has a {sf.SPANS!r} attribute that is not name -> list of ints")
    tokens = attrs.get(sf.SPAN_TOKENS, {})
    if not isinstance(tokens, dict) or not all(
        isinstance(v, list) and all(isinstance(t, str) for t in v) for v in tokens.values()
    ):
        raise _refuse(
            where, node, f"has a {sf.SPAN_TOKENS!r} attribute that is not name -> list of strings"
        )
    words = attrs.get(sf.WORDS, [])
    if not isinstance(words, list) or not all(
        isinstance(w, dict)
        and isinstance(w.get("segment"), str)
        and isinstance(w.get("word"), str)
        and _int_list(w.get("tokens"))
        for w in words
    ):
        raise _refuse(
            where,
            node,
            f"has a {sf.WORDS!r} attribute that is not a list of {{segment, word, tokens}}",
        )
    segments = attrs.get(sf.SEGMENTS, {})
    if not isinstance(segments, dict) or not all(
        _int_list(v) and len(v) == 2 for v in segments.values()
    ):
        raise _refuse(
            where, node, f"has a {sf.SEGMENTS!r} attribute that is not name -> [first, stop]"
        )


def _data_type(meta: dict[str, Any], where: str, node: str) -> str:
    dtype = meta.get("data_type")
    config: Any = {}
    if isinstance(dtype, dict):
        dtype, config = dtype.get("name"), dtype.get("configuration", {})
    if not isinstance(dtype, str) or dtype not in ALLOWED_DATA_TYPES:
        raise _refuse(
            where,
            node,
            f"has data type {meta.get('data_type')!r}, not one of "
            f"{sorted(ALLOWED_DATA_TYPES)} (object and pickled types are never read)",
        )
    if dtype == "fixed_length_utf32":
        length = config.get("length_bytes") if isinstance(config, dict) else None
        if not _is_int(length) or not 0 < length <= MAX_STRING_BYTES:
            raise _refuse(where, node, f"has fixed-length strings of {length!r} bytes")
    return dtype


def _check_shape(shape: Any, where: str, node: str, what: str = "shape") -> list[int]:
    if not _int_list(shape) or len(shape) > MAX_NDIM:
        raise _refuse(where, node, f"has a {what} {shape!r} that is not a list of integers")
    if any(n < 0 for n in shape):
        raise _refuse(where, node, f"has a negative size in its {what} {shape}")
    if any(n > MAX_LENGTH for n in shape):
        raise _refuse(where, node, f"has a {what} {shape} with a dim longer than {MAX_LENGTH}")
    return shape


def _check_chunk_shape(chunks: Any, ndim: int, limit: int, where: str, node: str) -> list[int]:
    if not _int_list(chunks) or len(chunks) != ndim or any(c < 1 for c in chunks):
        raise _refuse(where, node, f"has chunk shape {chunks!r}: not {ndim} positive integers")
    if math.prod(chunks) > limit:
        raise _refuse(where, node, f"has chunks of {math.prod(chunks)} values (limit {limit})")
    return chunks


def _n_chunks(shape: Sequence[int], chunks: Sequence[int]) -> int:
    return math.prod(-(-n // c) for n, c in zip(shape, chunks, strict=True))


def _check_codecs(codecs: Any, ndim: int, shape: Sequence[int], where: str, node: str) -> None:
    if not isinstance(codecs, list) or not codecs:
        raise _refuse(where, node, "has no codec list")
    for codec in codecs:
        name = codec.get("name") if isinstance(codec, dict) else codec
        if not isinstance(name, str) or name not in ALLOWED_CODECS:
            raise _refuse(
                where,
                node,
                f"uses codec {name!r}, not one of {sorted(ALLOWED_CODECS)} "
                f"(no pickling or value-changing codecs are decoded)",
            )
        config = codec.get("configuration", {}) if isinstance(codec, dict) else {}
        if not isinstance(config, dict):
            raise _refuse(where, node, f"has a {name!r} codec whose configuration is no object")
        if name == "sharding_indexed":
            inner = _check_chunk_shape(
                config.get("chunk_shape"), ndim, MAX_CHUNK_ELEMENTS, where, node
            )
            if _n_chunks(shape, inner) > MAX_CHUNKS:
                raise _refuse(where, node, f"has more than {MAX_CHUNKS} chunks")
            _check_codecs(config.get("codecs"), ndim, shape, where, node)
            _check_codecs(config.get("index_codecs"), ndim, shape, where, node)


def check_array(meta: Any, where: str, node: str) -> dict[str, Any]:
    """Check one array's metadata; return {dims, shape, dtype, attributes} when it is sane."""
    if not isinstance(meta, dict) or meta.get("zarr_format") != 3:
        raise _refuse(where, node, "is not Zarr v3 metadata (zarr_format is not 3)")
    if meta.get("node_type") != "array":
        raise _refuse(where, node, f"is a {meta.get('node_type')!r} node, not an array")
    shape = _check_shape(meta.get("shape"), where, node)
    ndim = len(shape)
    if math.prod(shape) > MAX_ELEMENTS:
        raise _refuse(where, node, f"has shape {shape}: more than {MAX_ELEMENTS} values")
    dtype = _data_type(meta, where, node)
    grid = meta.get("chunk_grid")
    if not isinstance(grid, dict) or grid.get("name") != "regular":
        raise _refuse(where, node, f"has chunk grid {grid!r}, not a regular one")
    config = grid.get("configuration")
    chunks = config.get("chunk_shape") if isinstance(config, dict) else None
    sharded = any(
        isinstance(c, dict) and c.get("name") == "sharding_indexed"
        for c in meta.get("codecs") or []
    )
    limit = MAX_SHARD_ELEMENTS if sharded else MAX_CHUNK_ELEMENTS
    chunks = _check_chunk_shape(chunks, ndim, limit, where, node)
    if _n_chunks(shape, chunks) > MAX_CHUNKS:
        raise _refuse(where, node, f"has more than {MAX_CHUNKS} chunks")
    encoding = meta.get("chunk_key_encoding", {"name": "default"})
    if not isinstance(encoding, dict) or encoding.get("name") not in ("default", "v2"):
        raise _refuse(where, node, f"has chunk key encoding {encoding!r}")
    _check_codecs(meta.get("codecs"), ndim, shape, where, node)
    if meta.get("storage_transformers"):
        raise _refuse(where, node, "uses storage transformers")
    dims = meta.get("dimension_names", [] if ndim == 0 else None)
    if (
        not isinstance(dims, list)
        or len(dims) != ndim
        or not all(isinstance(d, str) and d for d in dims)
    ):
        raise _refuse(where, node, f"has dimension names {dims!r}, not {ndim} names")
    attrs = meta.get("attributes", {})
    if not isinstance(attrs, dict):
        raise _refuse(where, node, "has attributes that are not a JSON object")
    transforms = sorted(CF_TRANSFORMS & set(attrs))
    if transforms:
        raise _refuse(where, node, f"has attributes {transforms} that would change its values")
    return {
        "dims": tuple(dims),
        "shape": tuple(shape),
        "dtype": dtype,
        "attributes": attrs,
        "checksummed": _checksummed(meta.get("codecs")),
    }


def _checksummed(codecs: list[Any]) -> bool:
    """Whether every chunk of an array with these (checked) codecs carries a CRC32C."""
    names = [c.get("name") if isinstance(c, dict) else c for c in codecs]
    for codec in codecs:
        if isinstance(codec, dict) and codec.get("name") == "sharding_indexed":
            config = codec.get("configuration", {})
            return _checksummed(config.get("codecs") or []) and _checksummed(
                config.get("index_codecs") or []
            )
    return "crc32c" in names


def _check_known(name: str, info: Mapping[str, Any], where: str, node: str) -> None:
    if name not in sf.VARIABLES and name not in sf.V1_VARIABLES:
        return
    dims, dtypes = sf.VARIABLES.get(name) or sf.V1_VARIABLES[name]
    if name in sf.V1_VARIABLES and info["dims"] == sf.V1_VARIABLES[name][0]:
        dims = info["dims"]  # a version-1 layout, still read
    if name in sf.DIRECTIONS and info["dims"] == sf.VIDEO_DIMS:
        dims = info["dims"]
    if info["dims"] != dims:
        raise _refuse(where, node, f"has dims {list(info['dims'])}; the format says {list(dims)}")
    if info["dtype"] not in dtypes:
        raise _refuse(
            where, node, f"has data type {info['dtype']!r}; the format says one of {sorted(dtypes)}"
        )
    if name == "rgb" and info["shape"] != (3,):
        raise _refuse(where, node, f"has {info['shape']} values; the format says 3 (r, g, b)")


def check_run(
    store: Any,
    name: str,
    where: str,
    arrays: Sequence[str] | None = None,
    meta: Any = None,
) -> dict:
    """Check one run group's metadata and that of its arrays (all, or only `arrays`).

    `meta` is the run's zarr.json when already read. Returns {array name: checked info}.
    Raises FormatError naming the first problem.
    """
    check_run_group(store, name, where, meta)
    return check_run_arrays(store, name, where, arrays)


def check_run_group(store: Any, name: str, where: str, meta: Any = None) -> dict[str, Any]:
    """The attributes of run group `name`, its zarr.json (`meta`, when already read) checked."""
    node = f"run {name}"
    if meta is None:
        meta = read_json(store, f"{name}/zarr.json", where)
    if meta is None:
        _check_v2(store, f"{name}/", where)
        raise sf.FormatError(f"{where}: {name} has no zarr.json; it is not a run group")
    attrs = _check_group_node(meta, where, node)
    check_run_attrs(attrs, where, node)
    return attrs


def check_run_arrays(
    store: Any,
    name: str,
    where: str,
    arrays: Sequence[str] | None = None,
    on_problem: Callable[[str, sf.FormatError], None] | None = None,
) -> dict:
    """Check the metadata of run `name`'s arrays (all, or only `arrays`); {name: checked info}.

    Raises FormatError naming the first problem, or, given `on_problem(node, error)`, hands it
    each problem and leaves the array out.
    """

    def refused(node: str, error: sf.FormatError) -> None:
        if on_problem is None:
            raise error
        on_problem(node, error)

    names = list_dir(store, f"{name}/") if arrays is None else list(arrays)
    checked: dict[str, dict[str, Any]] = {}
    for child in names:
        if child == "zarr.json" or child.endswith(".partial"):
            continue
        child_node = f"{name}/{child}"
        try:
            child_meta = read_json(store, f"{child_node}/zarr.json", where)
            if child_meta is None:
                # Zarr v3 readers never open a v2 node; refuse one anyway, it has no place here.
                _check_v2(store, f"{child_node}/", where)
                continue  # a folder with no metadata (left by an interrupted write): not a node
            if isinstance(child_meta, dict) and child_meta.get("node_type") == "group":
                _check_group_node(child_meta, where, child_node)
                continue
            info = check_array(child_meta, where, child_node)
            _check_known(child, info, where, child_node)
        except sf.FormatError as error:
            refused(child_node, error)
            continue
        checked[child] = info
    sizes: dict[str, tuple[int, str]] = {}
    for array_name, info in list(checked.items()):
        for dim, size in zip(info["dims"], info["shape"], strict=True):
            if dim in sizes and sizes[dim][0] != size:
                other = sizes[dim][1]
                node = f"{name}/{array_name}"
                refused(
                    node,
                    _refuse(
                        where,
                        node,
                        f"has {size} values along {dim!r} but {name}/{other} has {sizes[dim][0]}",
                    ),
                )
                checked.pop(array_name)
                break
            sizes.setdefault(dim, (size, array_name))
    return checked


# ---------------------------------------------------------------------------------- checked reads


def _fancy(key: Any, shape: Sequence[int]) -> tuple[tuple, tuple] | None:
    """For a key of ints, slices and 1-D integer lists (at least one list), with a position for
    every dim: the basic key of the box it reads (no dim dropped) and the key selecting the same
    values from that box, with NumPy's meaning. None for any other key."""
    key = key if isinstance(key, tuple) else (key,)
    is_list = [
        isinstance(k, list | np.ndarray) and np.asarray(k).ndim == 1 and len(k) > 0 for k in key
    ]
    if not any(is_list) or len(key) != len(shape):
        return None
    box: list[slice] = []
    within: list[Any] = []
    for k, listed, n in zip(key, is_list, shape, strict=True):
        if listed:
            positions = np.asarray(k)
            if positions.dtype.kind not in "iu":
                return None
            positions = positions % n
            first = int(positions.min())
            box.append(slice(first, int(positions.max()) + 1))
            within.append(positions - first)
        elif isinstance(k, slice):
            box.append(k)
            within.append(slice(None))
        elif isinstance(k, int | np.integer) and not isinstance(k, bool):
            index = int(k) % n
            box.append(slice(index, index + 1))
            within.append(0)
        else:
            return None
    return tuple(box), tuple(within)


def _region(key: Any, shape: Sequence[int]) -> tuple[list[slice], list[bool]] | None:
    """The region a basic index covers (slices per dim) and which dims it drops (an int).

    None for anything but ints, slices and Ellipsis (then no region is inferred).
    """
    key = key if isinstance(key, tuple) else (key,)
    if sum(k is Ellipsis for k in key) > 1:
        return None
    region: list[slice] = []
    dropped: list[bool] = []
    for k in key:
        if k is Ellipsis:
            fill = len(shape) - (len(key) - 1)
            region += [slice(None)] * fill
            dropped += [False] * fill
        elif isinstance(k, slice):
            region.append(k)
            dropped.append(False)
        elif isinstance(k, (int, np.integer)) and not isinstance(k, bool):
            if len(region) >= len(shape):
                return None
            index = int(k) % shape[len(region)] if shape[len(region)] else int(k)
            region.append(slice(index, index + 1))
            dropped.append(True)
        else:
            return None
    if len(region) > len(shape):
        return None
    region += [slice(None)] * (len(shape) - len(region))
    dropped += [False] * (len(shape) - len(dropped))
    return [slice(*s.indices(n)) for s, n in zip(region, shape, strict=True)], dropped


class CheckedArray:
    """A zarr array as dask reads it: failures name their chunk, lost listed steps raise.

    `label` names the variable (`run-0000/txt2img in cat.zarr`); `listed` holds the positions
    along the first dim (steps) that the run lists complete, whose values are never NaN;
    `labels` maps dims to coordinate labels used in messages; `missing`, when set, is the message
    of every read (an object the run needs is not in the store); `skipped` holds the (step,
    layer) positions a cache hook left uncomputed, which read NaN in a listed step by design;
    `reader`, when given, reads boxes of the array faster than zarr-python does
    (`tensorstore_reader`), checked as well.
    """

    def __init__(
        self,
        array: Any,
        label: str,
        *,
        listed: Sequence[int] = (),
        labels: Mapping[str, Sequence[Any]] | None = None,
        dims: Sequence[str] = (),
        missing: str | None = None,
        skipped: Iterable[tuple[int, int]] = (),
        reader: TensorStoreReader | None = None,
    ) -> None:
        self.array = array
        self.reader = reader
        self.label = label
        self.listed = frozenset(int(p) for p in listed)
        self.labels = {k: list(v) for k, v in (labels or {}).items()}
        self.dims = tuple(dims)
        self.missing = missing
        self.skipped: dict[int, set[int]] = {}
        for step, layer in skipped:
            self.skipped.setdefault(int(step), set()).add(int(layer))
        self.shape = tuple(array.shape)
        self.dtype = array.dtype
        self.ndim = len(self.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        if self.missing is not None:
            raise CorruptChunkError(self.missing)
        fancy = _fancy(key, self.shape)
        if fancy is not None:
            # dask fuses a selection into the read (so only the stored chunks it needs are
            # read), lists of positions included: read their bounding box, checked as any read.
            box, within = fancy
            return self[box][within]
        found = _region(key, self.shape)
        region = found[0] if found else [slice(0, n) for n in self.shape]
        try:
            out = np.asarray(self._read(key, found))
        except Exception as exc:
            raise CorruptChunkError(self._failure(region, exc)) from exc
        if self.listed and found and out.dtype.kind == "f" and self.ndim:
            rows = range(*region[0].indices(self.shape[0]))
            step_dropped = found[1][0]
            for i, row in enumerate(rows):
                if row in self.listed:
                    values = out if step_dropped else out[i]
                    values = self._computed(values, row, region, found[1])
                    # min() is NaN when any value is: one pass, without a mask's copy.
                    if values.size and np.isnan(values.min()):
                        raise CorruptChunkError(self._lost(region, row))
        return out

    def _read(self, key: Any, found: tuple[list[slice], list[bool]] | None) -> Any:
        """The values at `key`: through the reader where the key is a box (slices of step 1,
        ints) of more than one stored chunk and the reader opens the array, else through zarr.

        One chunk (a token row's map of one step and layer, as the viewer reads while scrubbing)
        reads as fast through zarr, without importing the reader's library."""
        box = found[0] if found else None
        if (
            self.reader is None
            or box is None
            or any(s.step != 1 or s.start > s.stop for s in box)
            or self._within_one_chunk(box)
            or not self.reader.opens()
        ):
            return self.array[key]
        return self.reader.read(box)[tuple(0 if d else slice(None) for d in found[1])]

    def _within_one_chunk(self, box: Sequence[slice]) -> bool:
        return all(
            s.stop <= s.start or s.start // c == (s.stop - 1) // c
            for s, c in zip(box, self.chunk_grid(), strict=True)
        )

    def _computed(
        self, values: np.ndarray, row: int, region: Sequence[slice], dropped: Sequence[bool]
    ) -> np.ndarray:
        """The values of step `row` without the layers a cache hook skipped (NaN by design)."""
        skip = self.skipped.get(row)
        if not skip or self.ndim < 2:
            return values
        layers = range(*region[1].indices(self.shape[1]))
        if dropped[1]:
            return values[:0] if layers[0] in skip else values
        keep = [j for j, layer in enumerate(layers) if layer not in skip]
        return np.take(values, keep, axis=0)

    # -- messages ------------------------------------------------------------------------------
    def chunk_grid(self) -> tuple[int, ...]:
        return tuple(self.array.chunks)

    def chunks_in(self, region: Sequence[slice]) -> Iterator[tuple[int, ...]]:
        """Indices of the stored chunks a region touches."""
        ranges = [
            range(s.start // c, -(-s.stop // c)) if s.stop > s.start else range(0)
            for s, c in zip(region, self.chunk_grid(), strict=True)
        ]
        return itertools.product(*ranges)

    def describe(self, index: Sequence[int]) -> str:
        """`stored chunk (2, 0, 0, 1, 0, 0) [step 2, layer ..., span 'cat'] in object ...`."""
        chunks = self.chunk_grid()
        named = []
        for dim, i, c in zip(self.dims, index, chunks, strict=False):
            labels = self.labels.get(dim)
            if labels is not None and c == 1 and i < len(labels):
                label = labels[i]
                named.append(f"{dim} {label!r}" if isinstance(label, str) else f"{dim} {label}")
        where = f" [{', '.join(named)}]" if named else ""
        return f"stored chunk {tuple(index)}{where} in object {object_key(self.array, index)}"

    def read_chunk(self, index: Sequence[int]) -> np.ndarray:
        region = tuple(
            slice(i * c, min((i + 1) * c, n))
            for i, c, n in zip(index, self.chunk_grid(), self.shape, strict=True)
        )
        return np.asarray(self.array[region])

    def _failure(self, region: Sequence[slice], exc: Exception) -> str:
        bad = []
        for index in itertools.islice(self.chunks_in(region), 4096):
            try:
                self.read_chunk(index)
            except Exception as chunk_exc:
                bad.append((index, chunk_exc))
                if len(bad) > 3:
                    break
        if not bad:
            bad = [(next(iter(self.chunks_in(region)), ()), exc)]
        index, cause = bad[0]
        more = f" (and {len(bad) - 1} more chunks nearby)" if len(bad) > 1 else ""
        return (
            f"{self.label}: {self.describe(index)} cannot be read or decoded "
            f"({type(cause).__name__}: {short_reason(cause)}){more}; the store is damaged, nothing "
            f"from it is drawn. `attnscope verify` lists every damaged chunk."
        )

    def _lost(self, region: Sequence[slice], row: int) -> str:
        first = [slice(row, row + 1), *region[1:]]
        index = next(iter(self.chunks_in(first)))
        for candidate in self.chunks_in(first):  # pinpoint: a few small reads, on error only
            try:
                if np.isnan(self.read_chunk(candidate)).any():
                    index = candidate
                    break
            except Exception:
                index = candidate
                break
        step = self.labels.get(self.dims[0], [])[row] if self.dims else row
        return (
            f"{self.label}: step {step} is listed complete but its {self.describe(index)} "
            f"reads as never written (NaN): the object is missing, empty or lost chunks; the "
            f"store is damaged, nothing from it is drawn. `attnscope verify` lists every damaged "
            f"chunk."
        )


class RowView:
    """Positions ``[start, stop)`` along `axis` of a CheckedArray, itself an array dask can read.

    Each read is the parent's read of the same place, checked as any. A dask array of these rows
    reads only them, and dask fuses a selection from it (a step, a head) into its reads, which
    a slice of the parent's dask array would not give: dask 2026.7 fuses only the first of two
    successive selections, and none after a concatenation.
    """

    def __init__(self, parent: CheckedArray, axis: int, start: int, stop: int) -> None:
        self.parent, self.axis, self.start = parent, axis, start
        shape = list(parent.shape)
        shape[axis] = stop - start
        self.shape = tuple(shape)
        self.dtype = parent.dtype
        self.ndim = parent.ndim

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        ellipsis = [i for i, k in enumerate(key) if k is Ellipsis]
        if ellipsis:
            i = ellipsis[0]
            key = key[:i] + (slice(None),) * (self.ndim - len(key) + 1) + key[i + 1 :]
        key += (slice(None),) * (self.ndim - len(key))
        axis = self.axis
        return self.parent[(*key[:axis], self._moved(key[axis]), *key[axis + 1 :])]

    def _moved(self, k: Any) -> Any:
        """Index `k` along the view's axis as the same positions of the parent."""
        n = self.shape[self.axis]
        if isinstance(k, slice):
            first, last, step = k.indices(n)
            if step > 0:
                return slice(first + self.start, last + self.start, step)
            return np.arange(first, last, step) + self.start
        if isinstance(k, int | np.integer) and not isinstance(k, bool):
            if not -n <= k < n:
                raise IndexError(f"index {k} is out of bounds for {n} positions")
            return int(k) % n + self.start
        positions = np.asarray(k)
        if positions.dtype == bool:
            positions = np.flatnonzero(positions)
        return positions % n + self.start


def object_key(array: Any, index: Sequence[int]) -> str:
    """The store key of the object holding stored chunk `index` (its shard when sharded)."""
    shards = getattr(array, "shards", None)
    coords = tuple(index)
    if shards is not None:
        coords = tuple(i * c // s for i, c, s in zip(index, array.chunks, shards, strict=True))
    key = array.metadata.encode_chunk_key(coords)
    return f"{array.path}/{key}" if array.path else key


def short_reason(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, at most `limit` characters."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text if len(text) <= limit else text[: limit - 3] + "..."
