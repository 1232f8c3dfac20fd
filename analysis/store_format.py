"""The attnscope store format: the one contract between `tracer/` and `analysis/`.

Everything a writer or a reader needs to agree on lives here, and nowhere else: names, dims,
attribute keys, codecs, chunking and the format version. It imports no torch, so the tracer
imports it from the analysis side. `docs/store-format.md` describes the same thing in prose;
change both, and `FORMAT_VERSION`, together.

Layout::

    store.zarr/                 root group, attrs {"attnscope_format": FORMAT_VERSION}
      run-0000/                 one group per generation (xarray Dataset)
        txt2img, img2txt        float32 (step, layer, head, span, y, x)
        image                   uint8 (image_y, image_x, rgb), the decoded image
        entity_mask             uint8 (entity, image_y, image_x), EliGen masks when present
        step, timestep, sigma, layer, layer_kind, head, span, y, x, branch   coordinates
      run-0001/ ...
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

FORMAT_VERSION = 1
FORMAT_ATTR = "attnscope_format"

DIMS = ("step", "layer", "head", "span", "y", "x")
DIRECTIONS = ("txt2img", "img2txt")
IMAGE_DIMS = ("image_y", "image_x", "rgb")
ENTITY_MASK_DIMS = ("entity", "image_y", "image_x")
LAYER_KINDS = ("double", "single")
BRANCHES = ("cond", "uncond")

# Run status values (run attribute "status"); a failure reads "failed: <reason>".
RECORDING = "recording"
COMPLETE = "complete"
FAILED_PREFIX = "failed: "

# Run attribute keys other tools rely on.
STATUS = "status"
STEPS_COMPLETE = "steps_complete"
SPANS = "spans"
SPAN_TOKENS = "span_tokens"

RUN_PREFIX = "run-"
_RUN_NAME = re.compile(r"^run-(\d{4,})$")

# Mantissa bits kept by the bit-rounding filter: relative error <= 2**-(keepbits + 1).
DEFAULT_KEEPBITS = 9


class FormatError(ValueError):
    """A store that is not an attnscope trace, or one of a format version this code can't read."""


def run_name(index: int) -> str:
    """The group name of the run with this index (`run-0000`)."""
    if index < 0:
        raise ValueError(f"run index must be >= 0, got {index}")
    return f"{RUN_PREFIX}{index:04d}"


def run_index(name: str) -> int | None:
    """The index of a run group name, or None if `name` is not one."""
    match = _RUN_NAME.match(name)
    return int(match.group(1)) if match else None


def relative_error_bound(keepbits: int | None) -> float:
    """The largest relative error of a stored value for `keepbits` (0.0 when lossless)."""
    if keepbits is None:
        return 0.0
    return 2.0 ** -(keepbits + 1)


def check_keepbits(keepbits: int | None) -> int | None:
    """Validate a keepbits setting: None (lossless) or an int in 1..23 (float32 mantissa)."""
    if keepbits is None:
        return None
    if isinstance(keepbits, bool) or not isinstance(keepbits, int) or not 1 <= keepbits <= 23:
        raise ValueError(
            f"keepbits must be an integer in 1..23 (float32 mantissa bits kept) or None for "
            f"lossless, got {keepbits!r}"
        )
    return keepbits


def check_version(root_attrs: Mapping[str, Any], where: str = "store") -> int:
    """Return the store's format version, or raise FormatError naming what was found."""
    if FORMAT_ATTR not in root_attrs:
        raise FormatError(
            f"{where} is not an attnscope trace: its root has no {FORMAT_ATTR!r} attribute "
            f"(attributes found: {sorted(root_attrs) or 'none'})"
        )
    version = root_attrs[FORMAT_ATTR]
    if version != FORMAT_VERSION:
        raise FormatError(
            f"{where} has attnscope format version {version!r}; this attnscope reads version "
            f"{FORMAT_VERSION} only. Upgrade attnscope to read it."
        )
    return version


def is_failed(status: str) -> bool:
    """Whether a run status says the run failed."""
    return status.startswith(FAILED_PREFIX)


def failed(reason: str) -> str:
    """The status string of a run that failed for `reason`."""
    return f"{FAILED_PREFIX}{reason}"


def _strings(values: Sequence[str]) -> np.ndarray:
    # object dtype: zarr 3 stores it as variable-length UTF-8, which has a spec, unlike fixed "<U".
    return np.array(list(values), dtype=object)


def run_coords(
    *,
    steps: Sequence[int],
    timesteps: Sequence[float],
    sigmas: Sequence[float],
    layers: Sequence[str],
    layer_kinds: Sequence[str],
    heads: Sequence[int],
    spans: Sequence[str],
    grid: tuple[int, int],
    branch: str = "cond",
) -> dict[str, Any]:
    """The coordinates of a run, checked for consistency."""
    if not (len(steps) == len(timesteps) == len(sigmas)):
        raise ValueError("steps, timesteps and sigmas must have the same length")
    if len(layers) != len(layer_kinds):
        raise ValueError("layers and layer_kinds must have the same length")
    unknown = sorted(set(layer_kinds) - set(LAYER_KINDS))
    if unknown:
        raise ValueError(f"unknown layer kinds {unknown}; accepted: {list(LAYER_KINDS)}")
    if branch not in BRANCHES:
        raise ValueError(f"unknown branch {branch!r}; accepted: {list(BRANCHES)}")
    for name, values in (("step", steps), ("layer", layers), ("head", heads), ("span", spans)):
        if len(values) == 0:
            raise ValueError(f"a run needs at least one {name}")
        if len(set(values)) != len(values):
            raise ValueError(f"{name} values must be unique, got {list(values)}")
    ny, nx = grid
    if ny <= 0 or nx <= 0:
        raise ValueError(f"latent grid must be positive, got {grid}")
    return {
        "step": np.asarray(steps, dtype=np.int64),
        "timestep": ("step", np.asarray(timesteps, dtype=np.float64)),
        "sigma": ("step", np.asarray(sigmas, dtype=np.float64)),
        "layer": _strings(layers),
        "layer_kind": ("layer", _strings(layer_kinds)),
        "head": np.asarray(heads, dtype=np.int64),
        "span": _strings(spans),
        "y": np.arange(ny, dtype=np.int64),
        "x": np.arange(nx, dtype=np.int64),
        "branch": np.array(branch, dtype=object),
    }


def codecs(keepbits: int | None) -> dict[str, Any]:
    """Zarr v3 filters and compressors of an attention variable (lossless when keepbits is None).

    Bit rounding makes the low mantissa bits zero, bit-shuffled Zstd then packs them; a CRC32C
    on every chunk reports corruption instead of decoding it.
    """
    from zarr.codecs import BloscCodec, Crc32cCodec

    keepbits = check_keepbits(keepbits)
    filters = []
    if keepbits is not None:
        from zarr.codecs.numcodecs import BitRound

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr")
            filters = [BitRound(keepbits=keepbits)]
    return {
        "filters": filters,
        "compressors": [BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"), Crc32cCodec()],
    }


def attention_encoding(shape: Sequence[int], keepbits: int | None) -> dict[str, Any]:
    """Zarr encoding of an attention variable of `shape` (dims DIMS).

    A chunk is one (step, layer, span) map of all heads; a shard is one whole step, so one step
    of one run is one object per variable.
    """
    _, n_layer, n_head, n_span, ny, nx = shape
    return {
        "chunks": (1, 1, n_head, 1, ny, nx),
        "shards": (1, n_layer, n_head, n_span, ny, nx),
        "fill_value": np.float32("nan"),
        "dtype": "float32",
        **codecs(keepbits),
    }


def run_skeleton(
    coords: Mapping[str, Any],
    attrs: Mapping[str, Any],
    directions: Sequence[str] = DIRECTIONS,
    keepbits: int | None = DEFAULT_KEEPBITS,
) -> tuple[xr.Dataset, dict[str, dict[str, Any]]]:
    """An unwritten run (lazy, NaN-filled attention variables) and its zarr encoding.

    Writing it with `to_zarr(compute=False)` lays down metadata and coordinates only; the tracer
    then fills one step shard at a time.
    """
    import dask.array as da

    unknown = sorted(set(directions) - set(DIRECTIONS))
    if unknown or not directions:
        raise ValueError(
            f"directions must be a non-empty subset of {list(DIRECTIONS)}, got {list(directions)}"
        )
    sizes = {
        "step": len(coords["step"]),
        "layer": len(coords["layer"]),
        "head": len(coords["head"]),
        "span": len(coords["span"]),
        "y": len(coords["y"]),
        "x": len(coords["x"]),
    }
    shape = tuple(sizes[d] for d in DIMS)
    data_vars = {
        name: (DIMS, da.full(shape, np.nan, dtype=np.float32, chunks=(1, *shape[1:])))
        for name in directions
    }
    dataset = xr.Dataset(data_vars, coords=dict(coords), attrs=dict(attrs))
    encoding = {name: attention_encoding(shape, keepbits) for name in directions}
    encoding |= {name: checksum_encoding() for name in dataset.coords}
    return dataset, encoding


def checksum_encoding() -> dict[str, Any]:
    """Zarr encoding of a coordinate: a CRC32C only, so a flipped byte never reads back silently."""
    from zarr.codecs import Crc32cCodec

    return {"compressors": [Crc32cCodec()]}


def image_encoding() -> dict[str, Any]:
    """Zarr encoding of the `image` and `entity_mask` variables (lossless, checksummed)."""
    return codecs(None)


def image_variable(image: np.ndarray) -> xr.DataArray:
    """The decoded image (H, W, 3 uint8) as the run's `image` variable."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"image must be a (height, width, 3) uint8 array, got {image.shape} {image.dtype}"
        )
    return xr.DataArray(image, dims=IMAGE_DIMS, coords={"rgb": _strings(["r", "g", "b"])})


def entity_mask_variable(masks: np.ndarray, entities: Sequence[str]) -> xr.DataArray:
    """Entity masks (E, H, W, nonzero = inside) as the run's `entity_mask` variable."""
    masks = np.asarray(masks)
    if masks.ndim != 3 or masks.shape[0] != len(entities):
        raise ValueError(
            f"entity masks must be (entity, height, width) with one mask per entity "
            f"({len(entities)}), got shape {masks.shape}"
        )
    return xr.DataArray(
        (masks != 0).astype(np.uint8), dims=ENTITY_MASK_DIMS, coords={"entity": _strings(entities)}
    )
