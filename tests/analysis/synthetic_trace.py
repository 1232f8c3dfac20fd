"""Synthetic trace stores written without the tracer, through the format module and zarr.

The maps are known NumPy arrays, so tests compute their expected values from the same arrays
with NumPy, independently of `analysis`. A version-2 store holds one row per token of TOKENS
and one summed row for PADDING padding tokens; `write_store` returns each named span's maps as
NumPy computes them from the stored rows in float64 (mean for txt2img, sum for img2txt).
A version-1 store (spans stored directly) is written with plain xarray.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import xarray as xr
import zarr
from numcodecs import BitRound
from zarr.codecs.numcodecs import BitRound as NumcodecsBitRound

from analysis import store_format as sf

DOUBLE = ("transformer_blocks.0", "transformer_blocks.1")
SINGLE = tuple(f"single_transformer_blocks.{i}" for i in range(3))
TOKENS = ["a", "cat", "on", "a", "mat", "."]
PADDING = 4  # padding positions after TOKENS, stored as one summed row


def token_rows() -> list[sf.TokenRow]:
    rows = [sf.TokenRow(i, 1, t, "prompt") for i, t in enumerate(TOKENS)]
    return [*rows, sf.TokenRow(len(TOKENS), PADDING, "<pad>", "prompt", padding=True)]


@dataclass
class Run:
    """One run to write. `written`: steps whose maps are stored (default: `complete`)."""

    steps: int = 4
    layers: tuple[str, ...] = DOUBLE + SINGLE
    heads: int = 3
    spans: dict[str, list[int]] = field(
        default_factory=lambda: {"prompt": [0, 1, 2, 3, 4, 5], "cat": [1], "mat": [4]}
    )
    grid: tuple[int, int] = (6, 10)
    frames: int | None = None  # latent frames of a video run (maps gain a frame dim before y)
    status: str = sf.COMPLETE
    complete: list[int] | None = None
    written: list[int] | None = None
    directions: tuple[str, ...] = sf.DIRECTIONS
    image_scale: int | None = 8
    entities: dict[str, tuple[slice, slice] | np.ndarray] | None = None  # on the image
    keepbits: int | None = None
    prompt: str = "a cat on a mat."
    seed: int = 0
    scene: bool = False  # maps and image of a drawn scene (for the docs' pictures)

    def __post_init__(self) -> None:
        # As in the tracer's stores, every entity is also a span (EliGen entity prompts are).
        extra = {name: [2] for name in self.entities or {} if name not in self.spans}
        self.spans = {**self.spans, **extra}


def layer_kind(name: str) -> str:
    return "single" if name.startswith("single_") else "double"


def synthetic_maps(run: Run, n_span: int) -> np.ndarray:
    """Positive maps (step, layer, head, row, y, x): per-head blobs that settle over steps."""
    rng = np.random.default_rng(run.seed)
    n_step, n_layer = run.steps, len(run.layers)
    ny, nx = run.grid
    yy, xx = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    out = np.empty((n_step, n_layer, run.heads, n_span, ny, nx), dtype=np.float32)
    final = rng.uniform([0, 0], [ny - 1, nx - 1], size=(n_layer, run.heads, n_span, 2))
    start = rng.uniform([0, 0], [ny - 1, nx - 1], size=(n_layer, run.heads, n_span, 2))
    width = rng.uniform(0.8, 2.5, size=(n_layer, run.heads, n_span))
    for s in range(n_step):
        w = s / max(n_step - 1, 1)
        centre = (1 - w) * start + w * final
        d2 = (yy - centre[..., 0, None, None]) ** 2 + (xx - centre[..., 1, None, None]) ** 2
        blob = np.exp(-d2 / (2 * width[..., None, None] ** 2))
        noise = rng.gamma(2.0, 0.05, size=blob.shape)
        maps = blob + noise
        out[s] = maps / maps.sum(axis=(-2, -1), keepdims=True)
    return out


def _scene_shapes(ny: int, nx: int) -> dict[str, np.ndarray]:
    """Soft masks of the scene's cat (an ellipse) and mat (a band below it) on a ny × nx grid."""
    yy, xx = np.meshgrid((np.arange(ny) + 0.5) / ny, (np.arange(nx) + 0.5) / nx, indexing="ij")
    cat = ((yy - 0.48) / 0.2) ** 2 + ((xx - 0.38) / 0.15) ** 2 <= 1
    mat = (yy > 0.7) & (yy < 0.9) & (xx > 0.12) & (xx < 0.88)
    return {"cat": cat, "mat": mat}


def scene_maps(run: Run, n_span: int) -> np.ndarray:
    """Maps that find the scene's objects: sharp in the first heads, settling over the steps."""
    rng = np.random.default_rng(run.seed)
    ny, nx = run.grid
    shapes = _scene_shapes(ny, nx)
    yy, xx = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    out = np.empty((run.steps, len(run.layers), run.heads, n_span, ny, nx), np.float32)
    names = [*TOKENS, "<pad>"] if n_span == len(TOKENS) + 1 else list(run.spans)
    for k, span in enumerate(names):
        target = shapes.get(span, shapes["cat"] | shapes["mat"]).astype(np.float64)
        for h in range(run.heads):
            focus = 1.0 - h / max(run.heads - 1, 1)
            for layer in range(len(run.layers)):
                start = rng.uniform([0, 0], [ny, nx])
                blob = np.exp(-((yy - start[0]) ** 2 + (xx - start[1]) ** 2) / (0.02 * ny * nx))
                for step in range(run.steps):
                    w = (step / max(run.steps - 1, 1)) ** 0.7
                    found = w * focus * target + (1 - w) * 0.6 * blob
                    noisy = found + 0.15 * rng.gamma(2.0, 0.5, size=(ny, nx)) * (1.2 - focus)
                    out[step, layer, h, k] = noisy / noisy.sum()
    return out


def scene_image(run: Run) -> np.ndarray:
    ny, nx = run.grid
    h, w = ny * run.image_scale, nx * run.image_scale
    yy = np.broadcast_to(np.linspace(0, 1, h)[:, None], (h, w))
    image = np.stack([150 + 60 * yy, 190 + 30 * yy, 235 - 40 * yy], axis=-1)
    big = _scene_shapes(h, w)
    image[big["mat"]] = (170, 40, 50)
    image[big["cat"]] = (230, 140, 40)
    return image.astype(np.uint8)


def synthetic_image(run: Run) -> np.ndarray:
    ny, nx = run.grid
    h, w = ny * run.image_scale, nx * run.image_scale
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    image = np.stack([yy * 200 + 30, xx * 180 + 40, (1 - yy) * 120 + 60], axis=-1)
    return image.astype(np.uint8)


def _coords(run: Run, steps: list[int]) -> dict:
    """The coordinates of a run, through the format module."""
    return sf.run_coords(
        steps=steps,
        timesteps=[1000.0 * (1 - s / run.steps) for s in steps],
        sigmas=[1.0 - s / run.steps for s in steps],
        layers=run.layers,
        layer_kinds=[layer_kind(layer) for layer in run.layers],
        heads=list(range(run.heads)),
        tokens=token_rows(),
        grid=run.grid if run.frames is None else (run.frames, *run.grid),
    )


def _v1_coords(run: Run, steps: list[int]) -> dict:
    """The coordinates of a version-1 run (spans where version 2 has token rows)."""
    coords = _coords(run, steps)
    for name in ("token", *sf.TOKEN_COORDS):
        coords.pop(name)
    return coords | {"span": np.array(list(run.spans), dtype=object)}


def span_values(rows: np.ndarray, run: Run, direction: str) -> np.ndarray:
    """Each named span's maps from the stored token rows in float64: NumPy's own reference."""
    counts = np.array([row.count for row in token_rows()], dtype=np.float64)
    out = []
    for positions in run.spans.values():
        picked = [i for i, row in enumerate(token_rows()) if set(row.positions) & set(positions)]
        block = rows[:, :, :, picked].astype(np.float64)
        if direction == "txt2img":
            weighted = block * counts[picked].reshape(-1, *[1] * (block.ndim - 4))
            out.append(weighted.sum(axis=3) / counts[picked].sum())
        else:
            out.append(block.sum(axis=3))
    # The view holds float32, as the stored rows do: the float64 result rounded once.
    return np.stack(out, axis=3).astype(np.float32)


def write_store(
    path: str | Path, runs: list[Run], version: int = sf.FORMAT_VERSION
) -> dict[str, dict[str, np.ndarray]]:
    """Write `runs` into a new store at `path`; return each run's span maps (NaN unwritten)."""
    path = str(path)
    root = zarr.open_group(path, mode="w")
    root.attrs[sf.FORMAT_ATTR] = version
    expected: dict[str, dict[str, np.ndarray]] = {}
    for index, run in enumerate(runs):
        name = sf.run_name(index)
        steps = list(range(run.steps))
        complete = steps if run.complete is None else run.complete
        written = complete if run.written is None else run.written
        v1 = version == 1
        if v1:
            coords = _v1_coords(run, steps)
            rows = len(run.spans)
        else:
            coords = _coords(run, steps)
            rows = len(token_rows())
        ds, encoding = _skeleton(coords, run, rows, v1)
        if run.image_scale:
            draw = scene_image if run.scene else synthetic_image
            ds["image"] = sf.image_variable(draw(run))
            encoding["image"] = sf.image_encoding()
            encoding["rgb"] = sf.checksum_encoding()
        if run.entities:
            ny, nx = run.grid
            scale = run.image_scale
            masks = np.zeros((len(run.entities), ny * scale, nx * scale))
            for i, where in enumerate(run.entities.values()):
                masks[i][where] = 1
            if v1:  # on the image's pixels
                ds["entity_mask"] = xr.DataArray(
                    masks.astype(np.uint8),
                    dims=("entity", "image_y", "image_x"),
                    coords={"entity": np.array(list(run.entities), dtype=object)},
                )
            else:  # on the token grid: a cell is inside when half its pixels are
                cells = masks.reshape(len(masks), ny, scale, nx, scale).mean(axis=(2, 4)) >= 0.5
                ds["entity_mask"] = sf.entity_mask_variable(cells, list(run.entities))
            encoding["entity_mask"] = sf.image_encoding()
            encoding["entity"] = sf.checksum_encoding()
        ds.to_zarr(path, group=name, encoding=encoding, compute=False, consolidated=False)
        group = zarr.open_group(path, path=name, mode="r+")
        expected[name] = {}
        for offset, direction in enumerate(run.directions):
            make = scene_maps if run.scene else synthetic_maps
            maps = make(replace(run, seed=run.seed * 10 + offset + 1), rows)
            if run.frames is not None:  # each frame's maps from a seed of its own
                maps = np.stack(
                    [maps]
                    + [
                        make(replace(run, seed=run.seed * 10 + offset + 100 * f), rows)
                        for f in range(1, run.frames)
                    ],
                    axis=4,
                )
            if run.keepbits is not None and not v1:
                # As the tracer does, before the codecs (version 1 rounded in a codec).
                maps = BitRound(keepbits=run.keepbits).encode(maps).view(np.float32)
                maps = maps.reshape(group[direction].shape)
            for step in written:
                group[direction][step] = maps[step]
            # The stored values, read back through zarr alone (bit rounding included).
            stored = group[direction][...]
            expected[name][direction] = stored if v1 else span_values(stored, run, direction)
        group.attrs.update(
            {
                sf.STATUS: run.status,
                sf.STEPS_COMPLETE: complete,
                sf.SPANS: run.spans,
                sf.SPAN_TOKENS: {k: [TOKENS[i] for i in v] for k, v in run.spans.items()},
                sf.TEXT_LEN: len(TOKENS) + PADDING,
                sf.SEGMENTS: {"prompt": [0, len(TOKENS) + PADDING]},
                sf.WORDS: [
                    {"segment": "prompt", "word": t, "tokens": [i]}
                    for i, t in enumerate(TOKENS)
                    if t.isalnum()
                ],
                "prompt": run.prompt,
                "seed": run.seed,
                "model": "synthetic",
                "error_bound": sf.relative_error_bound(run.keepbits),
            }
        )
    return expected


def _skeleton(coords: dict, run: Run, rows: int, v1: bool) -> tuple[xr.Dataset, dict]:
    if not v1:
        return sf.run_skeleton(coords, {}, run.directions, run.keepbits)
    import dask.array as da

    ny, nx = run.grid
    shape = (run.steps, len(run.layers), run.heads, rows, ny, nx)
    data = {
        d: (sf.SPAN_DIMS, da.full(shape, np.nan, dtype=np.float32, chunks=(1, *shape[1:])))
        for d in run.directions
    }
    rounding = [] if run.keepbits is None else [NumcodecsBitRound(keepbits=run.keepbits)]
    encoding = {d: sf.attention_encoding(shape) | {"filters": rounding} for d in run.directions}
    ds = xr.Dataset(data, coords=coords)
    return ds, encoding | {name: sf.checksum_encoding() for name in ds.coords}


def open_plain(path: str | Path, run: str) -> xr.Dataset:
    """A run opened with plain xarray, as the format page says any user can."""
    return xr.open_zarr(str(path), group=run, consolidated=False)


def demo_store(path: str | Path) -> None:
    """The trace behind docs/analysis.md's pictures: a drawn cat on a mat, 8 heads, 10 steps."""
    run = Run(
        steps=10,
        layers=("transformer_blocks.0", "transformer_blocks.1", *SINGLE),
        heads=8,
        grid=(32, 48),
        image_scale=16,
        scene=True,
        keepbits=9,
        seed=3,
    )
    cat = _scene_shapes(32 * 16, 48 * 16)["cat"]
    write_store(path, [replace(run, entities={"cat": cat})])
