"""Figures of attention maps with seaborn and matplotlib: one map, grids, overlays, animations,
similarity matrices and drift curves.

Every function computes what it draws (one dask computation), returns the matplotlib `Figure`
and, given `path`, saves it there. Figures are built without pyplot, so drawing many never
accumulates open windows or global state. Maps are drawn on the trace's own latent grid with
square cells, whatever its aspect ratio.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import seaborn as sns
import xarray as xr
from matplotlib.animation import FFMpegWriter, FuncAnimation, PillowWriter
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from tqdm.auto import tqdm

from .compare import MAP_DIMS
from .errors import UsageError
from .selection import SelectionError

TITLE_DIMS = ("span", "layer", "head", "step", "frame")
VIDEO_ONLY = ("frame",)  # named in titles only where the maps have it: image runs have none
COLORBAR_LABELS = {
    "txt2img": "attention probability\n(span's text → image cell)",
    "img2txt": "attention mass on the span\n(image cell → text)",
}
DPI = 120
GIF_DPI = 80  # animations: many frames, so smaller ones


def _value(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic | np.ndarray) else value


def label(da: xr.DataArray, dim: str, value: Any = None) -> str:
    """`head 3`, `span 'cat'`, `step 5 (t=750)`: one label of `dim`, from `da`'s coordinates."""
    value = _value(da[dim].values if value is None else value)
    if dim == "span":
        return f"span {value!r}"
    if dim == "step" and "timestep" in da.coords:
        timestep = da["timestep"]
        if timestep.ndim:
            timestep = timestep.sel(step=value)
        return f"step {value} (t={float(timestep):.4g})"
    return f"{dim} {value}"


def describe(da: xr.DataArray, reduced: Mapping[str, str] | None = None) -> str:
    """A title naming the variable, span, layer, head and step of a map.

    The variable is `da.attrs["variable"]` (set by the comparisons) or `da.name`. A dim with one
    value shows it; a dim that is gone was reduced, and shows `reduced[dim]` or what
    `analysis.reduce` noted in `da.attrs["reduced"]` (e.g. "mean of 28"), else "reduced"; dims
    still present are left to the axes and panels.
    """
    name = da.attrs.get("variable", da.name)
    parts = [str(name)] if name is not None else []
    for dim in TITLE_DIMS:
        if dim in da.dims:
            continue
        if dim in da.coords:
            parts.append(label(da, dim))
        else:
            how = (reduced or {}).get(dim) or da.attrs.get("reduced", {}).get(dim)
            if how is None and dim in VIDEO_ONLY:
                continue
            parts.append(f"{dim}: {how or 'reduced'}")
    return " · ".join(parts)


def _pooled(result: xr.DataArray) -> dict[str, str]:
    """Title words for the dims a comparison pooled into its vectors (`over`, `over_sizes`)."""
    over = result.attrs.get("over", ())
    sizes = result.attrs.get("over_sizes", [None] * len(over))
    return {d: f"{n} pooled" if n else "pooled" for d, n in zip(over, sizes, strict=True)}


def _only(da: xr.DataArray, keep: Sequence[str], what: str) -> xr.DataArray:
    """`da` with its one-value dims squeezed, checked to have exactly the dims `keep`."""
    da = da.squeeze([d for d in da.dims if da.sizes[d] == 1 and d not in keep])
    extra = [d for d in da.dims if d not in keep]
    missing = [d for d in keep if d not in da.dims]
    if extra or missing:
        sizes = ", ".join(f"{d} ({da.sizes[d]})" for d in extra)
        raise SelectionError(
            f"{what} draws dims {list(keep)}; this selection "
            + (f"lacks {missing}" if missing else f"still has {sizes}")
            + ": select one value of each or reduce over them"
        )
    return da.transpose(*keep)


def _save(fig: Figure, path: str | os.PathLike | None) -> Figure:
    if path is not None:
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return fig


def _map_size(ny: int, nx: int, height: float = 4.5) -> tuple[float, float]:
    width = min(max(height * nx / ny, 2.5), 14.0)
    return width + 1.6, width * ny / nx + 0.9


def _ticks(n: int) -> int:
    return max(1, math.ceil(n / 8))


def _draw_map(
    ax: Axes,
    frame: xr.DataArray,
    *,
    cmap: str,
    vmin: float | None,
    vmax: float | None,
    cbar: bool,
    cbar_label: str,
    ticks: bool = True,
) -> None:
    ny, nx = frame.shape
    sns.heatmap(
        frame.to_pandas(),
        ax=ax,
        cmap=cmap,
        vmin=vmin,
        vmax=vmax,
        square=True,
        cbar=cbar,
        cbar_kws={"label": cbar_label, "shrink": 0.8} if cbar else None,
        xticklabels=_ticks(nx) if ticks else False,
        yticklabels=_ticks(ny) if ticks else False,
    )
    if ticks:
        ax.set_xlabel("x (latent column)")
        ax.set_ylabel("y (latent row)")
        ax.tick_params(axis="y", labelrotation=0)
    else:
        ax.set_xlabel("")
        ax.set_ylabel("")


def heatmap(
    da: xr.DataArray,
    path: str | os.PathLike | None = None,
    *,
    ax: Axes | None = None,
    title: str | None = None,
    cmap: str = "magma",
    vmin: float | None = None,
    vmax: float | None = None,
) -> Figure:
    """Draw one map (dims y, x; other dims of size one) as a seaborn heatmap on its latent grid.

    The title names the variable, span, layer, head and step (see `describe`).
    """
    frame = _only(da, MAP_DIMS, "heatmap").compute()
    if ax is None:
        fig = Figure(figsize=_map_size(*frame.shape), layout="constrained")
        ax = fig.add_subplot()
    _draw_map(
        ax,
        frame,
        cmap=cmap,
        vmin=vmin,
        vmax=vmax,
        cbar=True,
        cbar_label=COLORBAR_LABELS.get(str(da.name), str(da.name)),
    )
    ax.set_title(title if title is not None else describe(frame), fontsize=10)
    return _save(ax.figure, path)


def overlay(
    da: xr.DataArray,
    image: xr.DataArray | np.ndarray,
    path: str | os.PathLike | None = None,
    *,
    title: str | None = None,
    cmap: str = "magma",
    alpha: float = 0.5,
) -> Figure:
    """Draw one map over the run's image (e.g. `ds.image`), the map stretched to the image."""
    frame = _only(da, MAP_DIMS, "overlay").compute()
    pixels = np.asarray(image.values if isinstance(image, xr.DataArray) else image)
    height, width = pixels.shape[:2]
    fig = Figure(figsize=_map_size(height, width), layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(pixels, extent=(0, width, height, 0))
    shown = ax.imshow(
        frame.values, extent=(0, width, height, 0), cmap=cmap, alpha=alpha, interpolation="bilinear"
    )
    ax.set_xlabel("x (image pixel)")
    ax.set_ylabel("y (image pixel)")
    ax.set_title(title if title is not None else describe(frame), fontsize=10)
    fig.colorbar(
        ScalarMappable(shown.norm, cmap),
        ax=ax,
        shrink=0.8,
        label=COLORBAR_LABELS.get(str(da.name), str(da.name)),
    )
    return _save(fig, path)


def grid(
    da: xr.DataArray,
    col: str = "head",
    row: str | None = None,
    path: str | os.PathLike | None = None,
    *,
    col_wrap: int | None = None,
    title: str | None = None,
    cmap: str = "magma",
    vmin: float | None = None,
    vmax: float | None = None,
) -> Figure:
    """Draw a grid of maps, one per value of `col` (and `row`), on one shared colour scale.

    `da` must have dims y, x and the facet dims (e.g. `row="head", col="step"`); other dims of
    size one are fine. With no `row`, panels wrap into rows of at most `col_wrap` (default 6).
    """
    facets = [d for d in (row, col) if d is not None]
    values = _only(da, [*facets, *MAP_DIMS], "grid").compute()
    low = float(np.nanmin(values)) if vmin is None else vmin
    high = float(np.nanmax(values)) if vmax is None else vmax
    ny, nx = values.sizes["y"], values.sizes["x"]
    if row is None:
        count = values.sizes[col]
        nrows = math.ceil(count / (col_wrap or 6))
        ncols = math.ceil(count / nrows)  # balanced rows: 8 panels wrap as 4 + 4, not 6 + 2
        panels = [{col: v} for v in values[col].values]
    else:
        nrows, ncols = values.sizes[row], values.sizes[col]
        panels = [{row: r, col: c} for r in values[row].values for c in values[col].values]
    side = 1.9
    width = side * min(max(nx / ny, 0.4), 3.0)
    fig = Figure(figsize=(ncols * width + 1.4, nrows * side + 1.0), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, where in zip(axes.flat, panels, strict=False):
        panel = values.sel(where)
        _draw_map(ax, panel, cmap=cmap, vmin=low, vmax=high, cbar=False, cbar_label="", ticks=False)
        ax.set_title(label(values, col, where[col]), fontsize=8)
        if row is not None and where[col] == values[col].values[0]:
            ax.set_ylabel(label(values, row, where[row]), fontsize=8)
    for ax in axes.flat[len(panels) :]:
        ax.set_axis_off()
    fig.colorbar(
        ScalarMappable(Normalize(low, high), cmap),
        ax=axes,
        shrink=0.8,
        label=COLORBAR_LABELS.get(str(da.name), str(da.name)),
    )
    fig.suptitle(title if title is not None else describe(values), fontsize=10)
    return _save(fig, path)


def similarity_matrix(
    sim: xr.DataArray, path: str | os.PathLike | None = None, *, title: str | None = None
) -> Figure:
    """Draw a similarity matrix from `similarity` / `head_similarity` (annotated when small)."""
    dims = [d for d in sim.dims if sim.sizes[d] > 1] or list(sim.dims[-2:])
    values = _only(sim, dims[-2:], "similarity_matrix").compute()
    metric = sim.attrs.get("metric", "")
    n = max(values.shape)
    if metric == "js":
        style = {"cmap": "rocket_r", "vmin": 0.0}
    else:
        style = {"cmap": "vlag", "vmin": -1.0, "vmax": 1.0}
    fig = Figure(figsize=(min(2.0 + 0.45 * n, 14), min(1.5 + 0.45 * n, 13)), layout="constrained")
    ax = fig.add_subplot()
    sns.heatmap(
        values.to_pandas(),
        ax=ax,
        square=True,
        annot=n <= 12,
        fmt=".2f",
        annot_kws={"fontsize": 7},
        cbar_kws={"label": sim.attrs.get("long_name", metric), "shrink": 0.8},
        **style,
    )
    first, second = values.dims
    ax.set_ylabel(str(first))
    ax.set_xlabel(str(first) if str(second) == f"{first}2" else str(second))
    ax.tick_params(axis="y", labelrotation=0)
    pooled = _pooled(sim)
    default = f"{sim.attrs.get('long_name', metric)} · {describe(values, pooled)}"
    ax.set_title(title if title is not None else default, fontsize=10)
    return _save(fig, path)


def drift_curve(
    drift: xr.DataArray, path: str | os.PathLike | None = None, *, title: str | None = None
) -> Figure:
    """Draw `step_drift` over steps (one line per value of a second dim if it has one)."""
    drift = drift.squeeze([d for d in drift.dims if drift.sizes[d] == 1 and d != "step"])
    extra = [d for d in drift.dims if d != "step"]
    if len(extra) > 1 or "step" not in drift.dims:
        raise SelectionError(
            f"drift_curve draws step and at most one other dim, got dims {list(drift.dims)}"
        )
    values = drift.compute()
    name = str(values.name or "drift")
    table = values.to_dataframe(name=name).reset_index()
    fig = Figure(figsize=(6.5, 3.8), layout="constrained")
    ax = fig.add_subplot()
    sns.lineplot(table, x="step", y=name, hue=extra[0] if extra else None, marker="o", ax=ax)
    ax.set_ylabel(values.attrs.get("long_name", name))
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    if "timestep" in values.coords:
        top = ax.secondary_xaxis("top")
        steps = values["step"].values
        shown = steps[:: max(1, math.ceil(len(steps) / 8))]
        top.set_xticks(shown, [f"{float(values.timestep.sel(step=s)):.4g}" for s in shown])
        top.set_xlabel("timestep")
    pooled = _pooled(values)
    ax.set_title(title if title is not None else describe(values, pooled), fontsize=10)
    return _save(fig, path)


def animate(
    da: xr.DataArray,
    path: str | os.PathLike,
    *,
    dim: str = "step",
    fps: float = 4.0,
    title: str | None = None,
    cmap: str = "magma",
    progress: bool = True,
) -> Figure:
    """Write an animation of the maps of `da` over `dim` (default: steps) on one shared colour
    scale: a GIF, or an MP4 where `path` ends in .mp4 (through ffmpeg, see `ffmpeg`)."""
    values = _only(da, [dim, *MAP_DIMS], "animate").compute()
    low, high = float(np.nanmin(values)), float(np.nanmax(values))
    fig = Figure(figsize=_map_size(values.sizes["y"], values.sizes["x"]), layout="constrained")
    ax = fig.add_subplot()
    first = values.isel({dim: 0})
    _draw_map(
        ax,
        first,
        cmap=cmap,
        vmin=low,
        vmax=high,
        cbar=True,
        cbar_label=COLORBAR_LABELS.get(str(da.name), str(da.name)),
    )
    mesh = ax.collections[0]
    base = title if title is not None else describe(values)

    def show(i: int) -> None:
        mesh.set_array(values.isel({dim: i}).values)
        ax.set_title(f"{base}\n{label(values, dim, values[dim].values[i])}", fontsize=10)

    frames = values.sizes[dim]
    anim = FuncAnimation(fig, show, frames=frames, repeat=False)
    mp4 = Path(path).suffix.lower() == ".mp4"
    # H.264 in yuv420p: what browsers and players take; it needs even sides.
    writer = (
        FFMpegWriter(fps=fps, codec="libx264", extra_args=["-pix_fmt", "yuv420p", "-vf", EVEN])
        if mp4
        else PillowWriter(fps=fps)
    )
    settings = {"animation.ffmpeg_path": ffmpeg()} if mp4 else {}
    with (
        matplotlib.rc_context(settings),
        tqdm(total=frames, desc="frames", unit="frame", disable=not progress) as bar,
    ):
        anim.save(path, writer=writer, dpi=GIF_DPI, progress_callback=lambda i, n: bar.update())
    return fig


EVEN = "pad=ceil(iw/2)*2:ceil(ih/2)*2"  # ffmpeg filter: pad a frame to even sides


def ffmpeg() -> str:
    """The ffmpeg that writes MP4 animations: imageio-ffmpeg's (`attnscope[video]`), else one
    on the PATH; a UsageError saying how to get one otherwise."""
    try:
        import imageio_ffmpeg
    except ImportError:
        found = shutil.which("ffmpeg")
        if found is None:
            raise UsageError(
                "writing an MP4 needs ffmpeg: pip install 'attnscope[video]' (imageio-ffmpeg), "
                "or put ffmpeg on the PATH; a .gif needs nothing more"
            ) from None
        return found
    return imageio_ffmpeg.get_ffmpeg_exe()
