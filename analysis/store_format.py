"""The attnscope store format: the one contract between `tracer/` and `analysis/`.

Everything a writer or a reader needs to agree on lives here, and nowhere else: names, dims,
attribute keys, codecs, chunking and the format version. It imports no torch, so the tracer
imports it from the analysis side. `docs/store-format.md` describes the same thing in prose;
change both, and `FORMAT_VERSION`, together.

Layout (version 2)::

    store.zarr/                 root group, attrs {"attnscope_format": FORMAT_VERSION}
      run-0000/                 one group per generation (xarray Dataset)
        txt2img, img2txt        float32 (step, layer, head, token, y, x): one row per text token,
                                one per run of padding tokens (their mean / sum, see TOKEN_COUNT)
        image                   uint8 (image_y, image_x, rgb), the decoded image
        entity_mask             uint8 (entity, y, x), EliGen masks as the model applied them
        step, timestep, sigma, layer, layer_kind, head, y, x, branch   coordinates
        token, token_text, token_segment, token_count, token_padding   coordinates of the rows
      run-0001/ ...

Spans are views computed when reading (`analysis.spans`): txt2img of a span is the mean of its
tokens' rows, img2txt the sum. Version 1 stored span rows (dim `span`) instead; it is still read.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import xarray as xr

from .errors import FormatError, UsageError

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
FORMAT_ATTR = "attnscope_format"

DIMS = ("step", "layer", "head", "token", "y", "x")
# A video model's maps add a latent `frame` dim before y (a later addition, same version):
# readers take the dims from each array's metadata, never from their position.
VIDEO_DIMS = ("step", "layer", "head", "token", "frame", "y", "x")
SPAN_DIMS = ("step", "layer", "head", "span", "y", "x")  # version 1 stores; span views
TOKEN_COORDS = ("token_text", "token_segment", "token_count", "token_padding")
DIRECTIONS = ("txt2img", "img2txt")
IMAGE_DIMS = ("image_y", "image_x", "rgb")
ENTITY_MASK_DIMS = ("entity", "y", "x")  # on the latent token grid, as the model applied it
LAYER_KINDS = ("double", "single", "cross")
BRANCHES = ("cond", "uncond")

# Zarr v3 data types by kind, as `zarr.json` names them.
INT_TYPES = frozenset({"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"})
FLOAT_TYPES = frozenset({"float16", "float32", "float64"})
STRING_TYPES = frozenset({"string", "fixed_length_utf32"})
BOOL_TYPES = frozenset({"bool"})

# Every variable and coordinate of a run: its dims and the data types it may have.
VARIABLES: dict[str, tuple[tuple[str, ...], frozenset[str]]] = {
    **{name: (DIMS, frozenset({"float32"})) for name in DIRECTIONS},
    "step": (("step",), INT_TYPES),
    "timestep": (("step",), FLOAT_TYPES),
    "sigma": (("step",), FLOAT_TYPES),
    "layer": (("layer",), STRING_TYPES),
    "layer_kind": (("layer",), STRING_TYPES),
    "head": (("head",), INT_TYPES),
    "token": (("token",), INT_TYPES),  # the row's (first) position in the joint text sequence
    "token_text": (("token",), STRING_TYPES),
    "token_segment": (("token",), STRING_TYPES),  # prompt, entity0, ...: the text it belongs to
    "token_count": (("token",), INT_TYPES),  # positions the row covers: 1, or a padding run
    "token_padding": (("token",), BOOL_TYPES),
    "frame": (("frame",), INT_TYPES),  # video runs only: the latent frame's index
    "y": (("y",), INT_TYPES),
    "x": (("x",), INT_TYPES),
    "branch": ((), STRING_TYPES),
    "image": (IMAGE_DIMS, frozenset({"uint8"})),
    "rgb": (("rgb",), STRING_TYPES),
    "entity_mask": (ENTITY_MASK_DIMS, frozenset({"uint8"})),
    "entity": (("entity",), STRING_TYPES),
}
# What version 1 stored instead (read, never written).
V1_VARIABLES: dict[str, tuple[tuple[str, ...], frozenset[str]]] = {
    **{name: (SPAN_DIMS, frozenset({"float32"})) for name in DIRECTIONS},
    "span": (("span",), STRING_TYPES),
    "entity_mask": (("entity", "image_y", "image_x"), frozenset({"uint8"})),
}

# Run status values (run attribute "status"); a failure reads "failed: <reason>".
RECORDING = "recording"
COMPLETE = "complete"
FAILED_PREFIX = "failed: "

# Run attribute keys: the tracer writes them, readers rely on them; nowhere else spells them.
STATUS = "status"
STEPS_COMPLETE = "steps_complete"
SPANS = "spans"  # named spans: name -> their positions in the joint text sequence
SPAN_TOKENS = "span_tokens"  # name -> the token strings of those positions
WORDS = "words"  # every word of every segment: [{segment, word, tokens: [positions]}] in order
SEGMENTS = "segments"  # segment name -> [first, stop) positions in the joint text sequence
SKIPPED = "skipped"  # [[step, layer], ...] maps a cache hook left uncomputed (they read NaN)
TEXT_LEN = "text_len"  # text tokens of the joint sequence, wherever the family puts them
ERROR_BOUND = "error_bound"  # largest relative error of a stored map value (0.0: lossless)
CAPTURE = "capture"  # what was asked to be recorded: a `Capture` as a dict
CREATED = "created"  # ISO 8601 UTC time the run was laid down
ENTITY_PROMPTS = "entity_prompts"  # EliGen entity prompts, in entity order
# Optional: direction -> why the model's attention has no such maps (Sana: cross-attention has no
# txt2img). A direction absent for this reason is not a narrowed capture nor lost data.
DIRECTIONS_ABSENT = "directions_absent"
PROMPT = "prompt"
SEED = "seed"
NUM_STEPS = "num_inference_steps"
GUIDANCE = "guidance_scale"
MODEL = "model"  # model id or path, or the class of a model built in code
PIPELINE = "pipeline"  # the pipeline's class name
BACKEND = "backend"  # the library that ran it: diffusers or diffsynth
LSE_USED = "lse_used"  # traced calls by where their normalisers came from: kernel, recompute
# Video runs: how many video frames one latent frame covers (the autoencoder's temporal factor;
# the first latent frame covers the first video frame alone), and the video frames generated.
TEMPORAL_COMPRESSION = "temporal_compression"
NUM_FRAMES = "num_frames"

# Keys of the `capture` attribute.
DIRECTIONS_KEY = "directions"
LAYERS = "layers"
HEADS = "heads"
STEPS = "steps"
CHUNK_SIZE = "chunk_size"
KEEPBITS = "keepbits"
KEEP_TOKENS = "keep_tokens"  # [start, stop) padding positions kept as rows of their own, or null
LSE = "lse"  # where img2txt's softmax normalisers came from: one of LSE_SOURCES
BRANCH = "branch"
BATCH_INDEX = "batch_index"

# `kernel`: the model's attention kernel returned them where it could (others recomputed);
# `recompute`: always recomputed by attnscope.
LSE_SOURCES = ("kernel", "recompute")

RUN_PREFIX = "run-"
# The root folder of a shared sweep's job claims (tracer.claims): JSON objects, no Zarr node.
CLAIMS = "claims"
_RUN_NAME = re.compile(r"^run-(\d{4,})$")

# Mantissa bits kept by the bit-rounding filter: relative error <= 2**-(keepbits + 1).
DEFAULT_KEEPBITS = 9


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
        raise UsageError(
            f"keepbits must be an integer in 1..23 (float32 mantissa bits kept) or None for "
            f"lossless, got {keepbits!r}"
        )
    return keepbits


def check_version(
    root_attrs: Mapping[str, Any],
    where: str = "store",
    accepted: Sequence[int] = READABLE_VERSIONS,
) -> int:
    """Return the store's format version, or raise FormatError unless it is one of `accepted`."""
    if FORMAT_ATTR not in root_attrs:
        raise FormatError(
            f"{where} is not an attnscope trace: its root has no {FORMAT_ATTR!r} attribute "
            f"(attributes found: {sorted(root_attrs) or 'none'})"
        )
    version = root_attrs[FORMAT_ATTR]
    if version not in accepted:
        if isinstance(version, int) and version in READABLE_VERSIONS:
            raise FormatError(
                f"{where} has attnscope format version {version}, which this attnscope reads "
                f"but no longer writes (it writes version {FORMAT_VERSION}); record into a new "
                f"store"
            )
        known = " or ".join(map(str, accepted))
        raise FormatError(
            f"{where} has attnscope format version {version!r}; this attnscope reads version "
            f"{known} only. Upgrade attnscope to read it."
        )
    return version


def check_directions(directions: Sequence[str] | str) -> tuple[str, ...]:
    """Validate which maps to record: a non-empty selection of DIRECTIONS, each named once."""
    wanted = (directions,) if isinstance(directions, str) else tuple(directions)
    unknown = [d for d in wanted if d not in DIRECTIONS]
    if unknown or not wanted or len(set(wanted)) != len(wanted):
        raise UsageError(
            f"directions must name each of {list(DIRECTIONS)} at most once, and at least one; "
            f"got {list(wanted)}" + (f" ({unknown} unknown)" if unknown else "")
        )
    return wanted


def is_failed(status: str) -> bool:
    """Whether a run status says the run failed."""
    return status.startswith(FAILED_PREFIX)


def failed(reason: str) -> str:
    """The status string of a run that failed for `reason`."""
    return f"{FAILED_PREFIX}{reason}"


@contextlib.contextmanager
def quiet_zarr() -> Iterator[None]:
    """Silence, for the block only, what zarr says of every attnscope store it touches.

    Stores written before bit rounding moved to the tracer carry it as a numcodecs codec, which
    zarr warns is outside the Zarr v3 spec on every array it opens; a write killed mid-way
    leaves zarr's temporary `*.partial` file next to an object, which zarr warns about on every
    listing (readers skip it, `verify` notes it).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3")
        warnings.filterwarnings(
            "ignore", message=r"Object at .* is not recognized as a component of a Zarr hierarchy"
        )
        yield


@dataclass(frozen=True)
class Capture:
    """The run attribute `capture`: what the tracer was asked to record, and how."""

    directions: tuple[str, ...]
    layers: tuple[str, ...]
    heads: tuple[int, ...]
    steps: tuple[int, ...]
    chunk_size: int
    keepbits: int | None
    lse: str = "kernel"
    branch: str = "cond"
    batch_index: int = 0
    keep_tokens: tuple[int, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The attribute's JSON value."""
        return {key: list(v) if isinstance(v, tuple) else v for key, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> Capture:
        """Read the attribute back; FormatError naming the first field that is not valid."""
        if not isinstance(value, Mapping):
            raise FormatError(f"the {CAPTURE!r} attribute is not an object: {value!r:.80}")
        fields = {}
        for name, kind in (
            (DIRECTIONS_KEY, str),
            (LAYERS, str),
            (HEADS, int),
            (STEPS, int),
        ):
            items = value.get(name)
            if not isinstance(items, list) or not all(isinstance(v, kind) for v in items):
                raise FormatError(
                    f"capture {name!r} is not a list of {kind.__name__}: {items!r:.80}"
                )
            fields[name] = tuple(items)
        try:
            keepbits = check_keepbits(value.get(KEEPBITS))
        except UsageError as exc:
            raise FormatError(f"capture {KEEPBITS!r}: {exc}") from None
        return cls(
            **fields,
            chunk_size=int(value.get(CHUNK_SIZE, 0)),
            keepbits=keepbits,
            lse=str(value.get(LSE, "kernel")),
            branch=str(value.get(BRANCH, "cond")),
            batch_index=int(value.get(BATCH_INDEX, 0)),
            keep_tokens=_keep_tokens(value.get(KEEP_TOKENS)),
        )


def _keep_tokens(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise FormatError(f"capture {KEEP_TOKENS!r} is not [start, stop] or null: {value!r:.80}")
    return value[0], value[1]


def keepbits_of(array: Any) -> int | None:
    """The bit rounding an attention array's values carry (None: lossless), from its metadata:
    its `keepbits` attribute, or the numcodecs BitRound codec older stores rounded with."""
    attributes = dict(array.attrs)
    if KEEPBITS in attributes:
        return attributes[KEEPBITS]
    from zarr.codecs.numcodecs import BitRound

    pending = list(array.metadata.codecs)
    while pending:
        codec = pending.pop()
        if isinstance(codec, BitRound):
            return int(codec.codec_config["keepbits"])
        pending.extend(getattr(codec, "codecs", ()))
    return None


def skipped_positions(
    attrs: Mapping[str, Any], steps: Sequence[int], layers: Sequence[str]
) -> list[tuple[int, int]]:
    """(step, layer) array positions of the maps the run's `skipped` attribute says a cache
    hook left uncomputed; entries naming no stored step or layer are left out."""
    step_at = {int(s): i for i, s in enumerate(steps)}
    layer_at = {str(name): i for i, name in enumerate(layers)}
    found = []
    for entry in attrs.get(SKIPPED) or []:
        if isinstance(entry, list) and len(entry) == 2:
            step, layer = entry
            if step in step_at and layer in layer_at:
                found.append((step_at[step], layer_at[layer]))
    return found


def _strings(values: Sequence[str]) -> np.ndarray:
    # object dtype: zarr 3 stores it as variable-length UTF-8, which has a spec, unlike fixed "<U".
    return np.array(list(values), dtype=object)


@dataclass(frozen=True)
class TokenRow:
    """One row of the attention variables: a text token, or a run of padding tokens."""

    position: int  # first position in the joint text sequence
    count: int  # positions it covers: 1, or the padding tokens it sums
    text: str
    segment: str
    padding: bool = False

    @property
    def positions(self) -> range:
        """The positions of the joint text sequence this row covers."""
        return range(self.position, self.position + self.count)


def token_coords(rows: Sequence[TokenRow]) -> dict[str, Any]:
    """The `token` coordinate and its labels, checked: rows in order, covering without overlap."""
    if not rows:
        raise ValueError("a run needs at least one token row")
    for before, after in itertools.pairwise(rows):
        if after.position < before.position + before.count:
            raise ValueError(f"token rows must be in order without overlap: {before} then {after}")
    if any(row.count < 1 for row in rows):
        raise ValueError("every token row covers at least one position")
    return {
        "token": np.asarray([row.position for row in rows], dtype=np.int64),
        "token_text": ("token", _strings([row.text for row in rows])),
        "token_segment": ("token", _strings([row.segment for row in rows])),
        "token_count": ("token", np.asarray([row.count for row in rows], dtype=np.int64)),
        "token_padding": ("token", np.asarray([row.padding for row in rows], dtype=bool)),
    }


def token_rows(coords: Mapping[str, Any]) -> list[TokenRow]:
    """The token rows of a run's coordinates (arrays or variables): `token_coords` inverted."""

    def values(name: str) -> list[Any]:
        return [v.item() if isinstance(v, np.generic) else v for v in np.asarray(coords[name])]

    return [
        TokenRow(int(p), int(c), str(t), str(g), bool(d))
        for p, c, t, g, d in zip(
            values("token"),
            values("token_count"),
            values("token_text"),
            values("token_segment"),
            values("token_padding"),
            strict=True,
        )
    ]


def run_coords(
    *,
    steps: Sequence[int],
    timesteps: Sequence[float],
    sigmas: Sequence[float],
    layers: Sequence[str],
    layer_kinds: Sequence[str],
    heads: Sequence[int],
    tokens: Sequence[TokenRow],
    grid: tuple[int, ...],
    branch: str = "cond",
) -> dict[str, Any]:
    """The coordinates of a run, checked for consistency.

    `grid` is the latent token grid: (y, x) for an image model, (frame, y, x) for a video one.
    """
    if not (len(steps) == len(timesteps) == len(sigmas)):
        raise ValueError("steps, timesteps and sigmas must have the same length")
    if len(layers) != len(layer_kinds):
        raise ValueError("layers and layer_kinds must have the same length")
    unknown = sorted(set(layer_kinds) - set(LAYER_KINDS))
    if unknown:
        raise ValueError(f"unknown layer kinds {unknown}; accepted: {list(LAYER_KINDS)}")
    if branch not in BRANCHES:
        raise ValueError(f"unknown branch {branch!r}; accepted: {list(BRANCHES)}")
    for name, values in (("step", steps), ("layer", layers), ("head", heads)):
        if len(values) == 0:
            raise ValueError(f"a run needs at least one {name}")
        if len(set(values)) != len(values):
            raise ValueError(f"{name} values must be unique, got {list(values)}")
    if len(grid) not in (2, 3) or min(grid) <= 0:
        raise ValueError(
            f"latent grid must be (y, x) or (frame, y, x) positive sizes, got {tuple(grid)}"
        )
    *frames, ny, nx = grid
    frame = {"frame": np.arange(frames[0], dtype=np.int64)} if frames else {}
    return {
        "step": np.asarray(steps, dtype=np.int64),
        "timestep": ("step", np.asarray(timesteps, dtype=np.float64)),
        "sigma": ("step", np.asarray(sigmas, dtype=np.float64)),
        "layer": _strings(layers),
        "layer_kind": ("layer", _strings(layer_kinds)),
        "head": np.asarray(heads, dtype=np.int64),
        **token_coords(tokens),
        **frame,
        "y": np.arange(ny, dtype=np.int64),
        "x": np.arange(nx, dtype=np.int64),
        "branch": np.array(branch, dtype=object),
    }


def codecs() -> dict[str, Any]:
    """Zarr v3 compressors of every map, mask and image: Zarr v3 spec codecs only.

    The tracer has already rounded the maps' low mantissa bits to zero (`tracer.rounding`, on
    the device), so bit-shuffled LZ4 packs them: on real maps it stores 2.6% more than Zstd-3
    and encodes three times as fast (docs/benchmarks.md, "Compressor choice"). A CRC32C on
    every chunk reports corruption instead of decoding it.
    """
    from zarr.codecs import BloscCodec, Crc32cCodec

    return {
        "filters": [],
        "compressors": [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"), Crc32cCodec()],
    }


def attention_dims(coords: Mapping[str, Any]) -> tuple[str, ...]:
    """The dims of a run's attention variables: VIDEO_DIMS where its coordinates have frames."""
    return VIDEO_DIMS if "frame" in coords else DIMS


def attention_encoding(shape: Sequence[int]) -> dict[str, Any]:
    """Zarr encoding of an attention variable of `shape` (dims DIMS or VIDEO_DIMS).

    A chunk is one (step, layer, token) map of all heads (and frames); a shard is one whole step,
    so one step of one run is one object per variable.
    """
    _, n_layer, n_head, n_token, *cells = shape
    return {
        "chunks": (1, 1, n_head, 1, *cells),
        "shards": (1, n_layer, n_head, n_token, *cells),
        "fill_value": np.float32("nan"),
        "dtype": "float32",
        **codecs(),
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

    directions = check_directions(directions)
    dims = attention_dims(coords)
    shape = tuple(len(coords[d]) for d in dims)
    data_vars = {
        name: (dims, da.full(shape, np.nan, dtype=np.float32, chunks=(1, *shape[1:])))
        for name in directions
    }
    dataset = xr.Dataset(data_vars, coords=dict(coords), attrs=dict(attrs))
    for name in directions:
        # The bit rounding the values carry, stated where a reader of the array finds it.
        dataset[name].attrs[KEEPBITS] = check_keepbits(keepbits)
    encoding = {name: attention_encoding(shape) for name in directions}
    encoding |= {name: checksum_encoding() for name in dataset.coords}
    return dataset, encoding


def checksum_encoding() -> dict[str, Any]:
    """Zarr encoding of a coordinate: a CRC32C only, so a flipped byte never reads back silently."""
    from zarr.codecs import Crc32cCodec

    return {"compressors": [Crc32cCodec()]}


def image_encoding() -> dict[str, Any]:
    """Zarr encoding of the `image` and `entity_mask` variables (lossless, checksummed)."""
    return codecs()


def image_variable(image: np.ndarray) -> xr.DataArray:
    """The decoded image (H, W, 3 uint8) as the run's `image` variable."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"image must be a (height, width, 3) uint8 array, got {image.shape} {image.dtype}"
        )
    return xr.DataArray(image, dims=IMAGE_DIMS, coords={"rgb": _strings(["r", "g", "b"])})


def entity_mask_variable(masks: np.ndarray, entities: Sequence[str]) -> xr.DataArray:
    """Entity masks (entity, y, x on the latent token grid, nonzero = inside) as the run's
    `entity_mask` variable."""
    masks = np.asarray(masks)
    if masks.ndim != 3 or masks.shape[0] != len(entities):
        raise ValueError(
            f"entity masks must be (entity, y, x) with one mask per entity "
            f"({len(entities)}), got shape {masks.shape}"
        )
    return xr.DataArray(
        (masks != 0).astype(np.uint8), dims=ENTITY_MASK_DIMS, coords={"entity": _strings(entities)}
    )
