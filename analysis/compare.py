"""Comparisons of attention maps: head similarity, entropy and concentration, step drift and
convergence, agreement with a mask.

Every function takes an `xarray.DataArray` (any selection of a trace's variable) and returns a
lazy, dask-backed result over the dims it does not consume; call `.compute()` (or plot it) to
read the store. Computations run in float64; a NaN (an unwritten step) makes its result NaN
rather than being skipped.

What is compared. `similarity` and `step_drift` compare vectors: by default a vector is
everything but the compared dim (a head's maps over every step and layer left in the selection,
flattened); pass `over=("y", "x")` to compare map by map and keep the other dims in the result.
Distribution metrics (`js`, `tv`, entropy) first normalise each vector to sum to one; attention
maps are non-negative, so that is a distribution over the cells (and steps, layers) it spans.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
import xarray as xr
from dask.array import PerformanceWarning

from .selection import SelectionError

MAP_DIMS = ("y", "x")
SIMILARITIES = ("correlation", "cosine", "js")
DISTANCES = ("js", "tv", "cosine", "correlation")
AGREEMENTS = ("iou", "mass_inside", "pointing")

_LONG_NAMES = {
    "correlation": "Pearson correlation",
    "cosine": "cosine similarity",
    "js": "Jensen–Shannon divergence (bits)",
    "tv": "total variation distance",
}
_DRIFT_NAMES = {
    "js": "Jensen–Shannon divergence (bits)",
    "tv": "total variation distance",
    "cosine": "cosine distance (1 − cos)",
    "correlation": "correlation distance (1 − r)",
}


def _check_dims(da: xr.DataArray, dims: Sequence[str], role: str) -> None:
    missing = [d for d in dims if d not in da.dims]
    if missing:
        raise SelectionError(
            f"{role}: {missing} not among the dims of this selection {list(map(str, da.dims))}"
        )


def _vector_dims(da: xr.DataArray, over: Sequence[str] | None, dim: str) -> list[str]:
    if over is None:
        return [str(d) for d in da.dims if d != dim]
    over = [over] if isinstance(over, str) else list(over)
    _check_dims(da, over, "over")
    if dim in over:
        raise SelectionError(f"over must not contain the compared dim {dim!r}, got {over}")
    return over


def _drop_along(da: xr.DataArray, dim: str) -> xr.DataArray:
    """`da` without the non-index coordinates along `dim` (timestep, sigma, layer_kind)."""
    return da.drop_vars([c for c in da.coords if c != dim and dim in da[c].dims])


def _safe(p: xr.DataArray) -> xr.DataArray:
    # log2 of 1 where p is 0: 0·log 0 counts as 0 without numpy's divide warnings.
    return xr.where(p > 0, p, 1.0)


def _normalise(da: xr.DataArray, over: Sequence[str]) -> xr.DataArray:
    return da / da.sum(over, skipna=False)


def _compare(a: xr.DataArray, b: xr.DataArray, metric: str, over: Sequence[str]) -> xr.DataArray:
    """The metric between `a` and `b` over `over`, broadcasting every other dim."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    if metric == "correlation":
        a = a - a.mean(over, skipna=False)
        b = b - b.mean(over, skipna=False)
    if metric in ("correlation", "cosine"):
        norms = np.sqrt(xr.dot(a, a, dim=over) * xr.dot(b, b, dim=over))
        return xr.dot(a, b, dim=over) / norms
    p = _normalise(a, over)
    q = _normalise(b, over)
    if metric == "tv":
        return 0.5 * abs(p - q).sum(over, skipna=False)
    m = 0.5 * (p + q)
    safe_m = _safe(m)
    return 0.5 * (p * np.log2(_safe(p) / safe_m)).sum(over, skipna=False) + 0.5 * (
        q * np.log2(_safe(q) / safe_m)
    ).sum(over, skipna=False)


def similarity(
    da: xr.DataArray,
    dim: str,
    metric: str = "correlation",
    over: Sequence[str] | None = None,
) -> xr.DataArray:
    """Pairwise similarity of the entries of `dim` (dims `dim`, `dim + "2"`); lazy.

    `correlation` (Pearson) and `cosine` are similarities, 1 for identical vectors; `js` is the
    Jensen–Shannon divergence in bits, 0 for identical and at most 1. A vector with no variance
    (correlation) or no mass (cosine, js) gives NaN.
    """
    if metric not in SIMILARITIES:
        raise SelectionError(f"unknown similarity metric {metric!r}; accepted: {SIMILARITIES}")
    _check_dims(da, [dim], "similarity")
    over = _vector_dims(da, over, dim)
    other = f"{dim}2"
    b = _drop_along(da, dim).rename({dim: other})
    with warnings.catch_warnings():
        # Pairs of chunks along `dim` are the point of a pairwise comparison: dask's warning
        # that the outer product multiplies the chunks says nothing the caller can act on.
        warnings.simplefilter("ignore", PerformanceWarning)
        out = _compare(_drop_along(da, dim), b, metric, over).transpose(..., dim, other)
    out.name = f"{dim}_{metric}"
    out.attrs = {
        "metric": metric,
        "long_name": _LONG_NAMES[metric],
        "over": list(over),
        "over_sizes": [da.sizes[d] for d in over],
        "variable": str(da.name),
    }
    return out


def head_similarity(
    da: xr.DataArray, metric: str = "correlation", over: Sequence[str] | None = None
) -> xr.DataArray:
    """Head × head similarity (dims `head`, `head2`) of any selection that has a `head` dim.

    See `similarity` for the metrics and for `over`.
    """
    return similarity(da, "head", metric, over)


def step_drift(
    da: xr.DataArray,
    metric: str = "js",
    reference: str | int = "final",
    over: Sequence[str] | None = None,
) -> xr.DataArray:
    """How far each step is from a reference step, over `step`; lazy.

    `reference`: `"final"` (the selection's last step), `"previous"` (the step before, NaN at the
    first) or a step label. Metrics are distances, 0 for identical: `js` (Jensen–Shannon
    divergence, bits), `tv` (total variation of the normalised maps), `cosine` (1 − cosine
    similarity), `correlation` (1 − Pearson correlation).
    """
    if metric not in DISTANCES:
        raise SelectionError(f"unknown drift metric {metric!r}; accepted: {DISTANCES}")
    _check_dims(da, ["step"], "step_drift")
    over = _vector_dims(da, over, "step")
    if reference == "final":
        ref = _drop_along(da, "step").isel(step=-1, drop=True)
    elif reference == "previous":
        ref = da.shift(step=1)
    elif isinstance(reference, (int, np.integer)) and not isinstance(reference, bool):
        steps = [int(s) for s in da.step.values]
        if int(reference) not in steps:
            raise SelectionError(f"unknown reference step {reference}; the selection has {steps}")
        ref = _drop_along(da, "step").sel(step=reference, drop=True)
    else:
        raise SelectionError(
            f"unknown reference {reference!r}; accepted: 'final', 'previous' or a step label"
        )
    out = _compare(da, ref, metric, over)
    if metric in ("correlation", "cosine"):
        out = 1.0 - out
    out = out.transpose("step", ...)
    out.name = "drift"
    target = {"final": "the final step", "previous": "the previous step"}.get(
        str(reference), f"step {reference}"
    )
    out.attrs = {
        "metric": metric,
        "reference": str(reference),
        "long_name": f"{_DRIFT_NAMES[metric]} to {target}",
        "over": list(over),
        "over_sizes": [da.sizes[d] for d in over],
        "variable": str(da.name),
    }
    return out


def convergence(
    da: xr.DataArray,
    tol: float,
    metric: str = "js",
    over: Sequence[str] | None = None,
) -> xr.DataArray:
    """The first step from which the drift to the final step stays at or below `tol`; lazy.

    With `over=("y", "x")` this is per map: e.g. which layers or heads settle early. NaN where
    the drift is NaN up to the end (an empty final map).
    """
    if tol < 0:
        raise SelectionError(f"tol must be >= 0, got {tol}")
    drift = step_drift(da, metric, "final", over)
    below = (drift <= tol).astype(np.int8)
    settled = (
        below.isel(step=slice(None, None, -1)).cumprod("step").isel(step=slice(None, None, -1))
    )
    first = settled.idxmax("step").where(settled.any("step"))
    first.name = "convergence_step"
    first.attrs = {"metric": metric, "tol": tol}
    return first


def entropy(
    da: xr.DataArray, over: Sequence[str] = MAP_DIMS, normalized: bool = False
) -> xr.DataArray:
    """Shannon entropy (bits) of each map normalised to a distribution over `over`; lazy.

    `normalized=True` divides by log2 of the number of cells: 1 for a uniform map, 0 for a map
    on a single cell.
    """
    over = [over] if isinstance(over, str) else list(over)
    _check_dims(da, over, "entropy")
    p = _normalise(da.astype(np.float64), over)
    out = -(p * np.log2(_safe(p))).sum(over, skipna=False)
    if normalized:
        cells = math.prod(da.sizes[d] for d in over)
        if cells < 2:
            raise SelectionError(f"normalized entropy needs at least 2 cells over {over}")
        out = out / math.log2(cells)
    out.name = "entropy"
    out.attrs = {"units": "fraction of the maximum" if normalized else "bits", "over": over}
    return out


def concentration(
    da: xr.DataArray, top: float = 0.1, over: Sequence[str] = MAP_DIMS
) -> xr.DataArray:
    """Share of each map's mass held by its `top` fraction of cells (the ceil(top·N) largest).

    1 for a map on a handful of cells, `top` for a uniform map; lazy.
    """
    if not 0 < top <= 1:
        raise SelectionError(f"top must be a fraction in (0, 1], got {top}")
    over = [over] if isinstance(over, str) else list(over)
    _check_dims(da, over, "concentration")
    cells = math.prod(da.sizes[d] for d in over)
    k = max(1, math.ceil(top * cells))

    def top_share(values: np.ndarray) -> np.ndarray:
        flat = values.reshape(*values.shape[: values.ndim - len(over)], -1).astype(np.float64)
        largest = np.partition(flat, cells - k, axis=-1)[..., cells - k :]
        return largest.sum(-1) / flat.sum(-1)

    out = xr.apply_ufunc(
        top_share,
        da,
        input_core_dims=[over],
        dask="parallelized",
        output_dtypes=[np.float64],
        dask_gufunc_kwargs={"allow_rechunk": True},
    )
    out.name = "concentration"
    out.attrs = {"top": top, "cells": k, "over": over}
    return out


def mask_to_grid(mask: xr.DataArray | np.ndarray, like: xr.DataArray) -> xr.DataArray:
    """A mask on the latent grid of `like` (dims y, x), boolean.

    `mask` is on the latent grid already (dims y, x, or an array of that shape, such as a run's
    `entity_mask.sel(entity=...)`, the mask as the model applied it), or on the image (dims
    image_y, image_x, as version-1 stores kept it, or any other 2-D array): then a latent cell
    is inside when at least half of the pixels whose centres fall in it are.
    """
    _check_dims(like, list(MAP_DIMS), "mask_to_grid")
    ny, nx = like.sizes["y"], like.sizes["x"]
    coords = {"y": like["y"].values, "x": like["x"].values}
    values = np.asarray(mask.values if isinstance(mask, xr.DataArray) else mask)
    if values.ndim != 2:
        raise SelectionError(f"a mask must be 2-D (y, x or image_y, image_x), got {values.shape}")
    on_grid = (
        tuple(mask.dims) == MAP_DIMS if isinstance(mask, xr.DataArray) else values.shape == (ny, nx)
    )
    if on_grid:
        if values.shape != (ny, nx):
            raise SelectionError(
                f"mask on the latent grid has shape {values.shape}, not {(ny, nx)}"
            )
        return xr.DataArray(values != 0, dims=MAP_DIMS, coords=coords)
    height, width = values.shape
    # One-hot (cell, pixel) matrices: cell sums of the mask and pixel counts per cell.
    rows = np.floor((np.arange(height) + 0.5) * ny / height).astype(int)
    cols = np.floor((np.arange(width) + 0.5) * nx / width).astype(int)
    row_onehot = (rows[None, :] == np.arange(ny)[:, None]).astype(np.float64)
    col_onehot = (cols[:, None] == np.arange(nx)[None, :]).astype(np.float64)
    inside = row_onehot @ (values != 0).astype(np.float64) @ col_onehot
    count = row_onehot.sum(1)[:, None] * col_onehot.sum(0)[None, :]
    return xr.DataArray(inside >= 0.5 * count, dims=MAP_DIMS, coords=coords) & (count > 0)


def mask_agreement(
    da: xr.DataArray, mask: xr.DataArray | np.ndarray, threshold: float = 0.5
) -> xr.Dataset:
    """How well each map of `da` localises `mask`: a Dataset of `iou`, `mass_inside`, `pointing`.

    - `iou`: intersection over union of the mask and the cells whose min–max normalised value
      is at least `threshold`;
    - `mass_inside`: share of the map's mass inside the mask;
    - `pointing`: 1.0 when the map's maximum lies inside the mask, else 0.0 (its mean over
      maps is the pointing-game accuracy).

    Lazy, over every dim of `da` but y and x. `mask` as in `mask_to_grid`.
    """
    if not 0 <= threshold <= 1:
        raise SelectionError(f"threshold must be in [0, 1], got {threshold}")
    inside = mask_to_grid(mask, da)
    over = list(MAP_DIMS)
    a = da.astype(np.float64)
    lo, hi = a.min(over, skipna=False), a.max(over, skipna=False)
    written = hi.notnull()
    predicted = (a - lo) >= threshold * (hi - lo)
    iou = ((predicted & inside).sum(over) / (predicted | inside).sum(over)).where(written)
    mass = a.where(inside, 0.0).sum(over, skipna=False) / a.sum(over, skipna=False)
    pointing = (a.where(inside).max(over) >= hi).astype(np.float64).where(written)
    return xr.Dataset(
        {"iou": iou, "mass_inside": mass, "pointing": pointing},
        attrs={"threshold": threshold, "mask_cells": int(inside.sum())},
    )


def rank_heads(
    da: xr.DataArray,
    mask: xr.DataArray | np.ndarray,
    by: str = "mass_inside",
    threshold: float = 0.5,
) -> pd.DataFrame:
    """Heads (per layer when `da` has layers) ranked by how well they localise `mask`.

    Each score of `mask_agreement` is averaged over every other dim (steps, spans); the table
    is sorted by `by`, best first. This computes.
    """
    if by not in AGREEMENTS:
        raise SelectionError(f"unknown ranking score {by!r}; accepted: {AGREEMENTS}")
    _check_dims(da, ["head"], "rank_heads")
    scores = mask_agreement(da, mask, threshold)
    keep = [d for d in ("layer", "head") if d in scores.dims]
    rest = [d for d in scores.dims if d not in keep]
    table = scores.mean(rest).compute().to_dataframe(dim_order=keep)[list(AGREEMENTS)]
    return table.sort_values(by, ascending=False, kind="stable")
