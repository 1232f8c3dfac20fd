"""attnscope analysis: open, select, reduce, compare and draw attention traces, without torch.

    import analysis
    ds = analysis.open_trace("cat.zarr")                      # lazy xarray.Dataset of one run
    sweep = analysis.open_sweep("sweep.zarr")                 # every run, along a `run` dim
    m = ds.txt2img.sel(span="cat").mean(["step", "layer"])
    analysis.heatmap(m.sel(head=3), path="cat-head3.png")

Names are loaded on first use, so `import analysis.store_format` (which the tracer does) pulls
in neither dask nor matplotlib.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "open": (
        "PartialRunWarning",
        "RunInfo",
        "list_runs",
        "open_store",
        "open_trace",
        "trace_info",
    ),
    "selection": ("REDUCTIONS", "SelectionError", "reduce", "resolve", "select"),
    "compare": (
        "concentration",
        "convergence",
        "entropy",
        "head_similarity",
        "mask_agreement",
        "mask_to_grid",
        "rank_heads",
        "similarity",
        "step_drift",
    ),
    "plot": (
        "animate",
        "describe",
        "drift_curve",
        "grid",
        "heatmap",
        "overlay",
        "similarity_matrix",
    ),
    "store_format": ("FORMAT_VERSION", "FormatError"),
    "sweep": ("open_sweep",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [
    "FORMAT_VERSION",
    "REDUCTIONS",
    "FormatError",
    "PartialRunWarning",
    "RunInfo",
    "SelectionError",
    "animate",
    "concentration",
    "convergence",
    "describe",
    "drift_curve",
    "entropy",
    "grid",
    "head_similarity",
    "heatmap",
    "list_runs",
    "mask_agreement",
    "mask_to_grid",
    "open_store",
    "open_sweep",
    "open_trace",
    "overlay",
    "rank_heads",
    "reduce",
    "resolve",
    "select",
    "similarity",
    "similarity_matrix",
    "step_drift",
    "trace_info",
]

if TYPE_CHECKING:
    from .compare import (
        concentration,
        convergence,
        entropy,
        head_similarity,
        mask_agreement,
        mask_to_grid,
        rank_heads,
        similarity,
        step_drift,
    )
    from .open import PartialRunWarning, RunInfo, list_runs, open_store, open_trace, trace_info
    from .plot import animate, describe, drift_curve, grid, heatmap, overlay, similarity_matrix
    from .selection import REDUCTIONS, SelectionError, reduce, resolve, select
    from .store_format import FORMAT_VERSION, FormatError
    from .sweep import open_sweep


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'analysis' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
