"""Many runs of one store as one lazy dataset, along a `run` dimension (prompt and seed sweeps).

    sweep = analysis.open_sweep("sweep.zarr")
    sweep.txt2img.sel(span="cat").mean(["run", "step", "layer"])   # per head, over every prompt

Each run is opened as `open_trace` opens it (checked, lazy, its spans as views), then the runs
are aligned by label: spans by name, steps and layers by value. A span, step or layer that a run
does not have reads NaN there, so reductions over `run` (which skip NaN) average the runs that
have it. Nothing is read beyond metadata until a reduction asks.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import xarray as xr

from . import store_format as sf
from .open import PathLike, RunInfo, list_runs, location, open_trace, pick_run
from .selection import SelectionError
from .spans import Spans


def open_sweep(
    path: PathLike,
    runs: Sequence[str | int] | None = None,
    *,
    spans: Spans | None = None,
    storage_options: Mapping[str, Any] | None = None,
    chunks: Mapping[str, int] | None = None,
) -> xr.Dataset:
    """The runs of a store as one lazy `xarray.Dataset` with a leading `run` dimension.

    `runs` names them (`"run-0003"`) or counts them (`3`); by default every run with at least
    one complete step. `spans` is asked of every run, as in `open_trace` (default: each run's
    stored spans). The `run` coordinate holds the run names, with `prompt` and `seed` beside
    it. Only complete steps are kept (a partial run warns, naming its missing steps). All runs
    must share one latent grid; SelectionError names the runs that differ.
    """
    where = location(path)
    infos = list_runs(path, storage_options)
    chosen = _choose(infos, runs, where)
    opened = [
        open_trace(path, info.name, storage_options=storage_options, chunks=chunks, spans=spans)
        for info in chosen
    ]
    grids = {
        info.name: (ds.sizes["y"], ds.sizes["x"]) for info, ds in zip(chosen, opened, strict=True)
    }
    if len(set(grids.values())) > 1:
        first = grids[chosen[0].name]
        raise SelectionError(
            f"the runs of {where} have different latent grids (y, x): {grids}; a sweep needs "
            f"one grid, e.g. runs={[name for name, grid in grids.items() if grid == first]}"
        )
    labelled = [_labelled(info, ds) for info, ds in zip(chosen, opened, strict=True)]
    sweep = xr.concat(
        labelled,
        dim="run",
        join="outer",
        coords="different",
        compat="equals",
        combine_attrs="drop",
    )
    sweep.attrs.update(store=where, runs=[info.name for info in chosen])
    return sweep


def _choose(infos: list[RunInfo], runs: Sequence[str | int] | None, where: str) -> list[RunInfo]:
    if runs is None:
        chosen = [info for info in infos if info.steps_complete]
        if not chosen:
            raise SelectionError(f"no run of {where} has a complete step yet")
        return chosen
    if isinstance(runs, (str, int)):
        runs = [runs]
    chosen = [pick_run(infos, run, where) for run in runs]
    names = Counter(info.name for info in chosen)
    repeated = sorted(name for name, count in names.items() if count > 1)
    if repeated:
        raise SelectionError(f"runs {repeated} are asked for more than once")
    return chosen


def _labelled(info: RunInfo, ds: xr.Dataset) -> xr.Dataset:
    """The run's attention views with a `run` dim of one, its prompt and seed beside it."""
    maps = ds[[name for name in sf.DIRECTIONS if name in ds.data_vars]]
    return maps.expand_dims(run=[info.name]).assign_coords(
        prompt=("run", [str(info.attrs.get(sf.PROMPT, ""))]),
        seed=("run", [info.attrs.get(sf.SEED)]),
    )
