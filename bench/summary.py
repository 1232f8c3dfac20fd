"""Figures the report's tables and its notes both draw from a results file."""

from __future__ import annotations

from typing import Any

from bench.common import median

# What docs/benchmarks.md holds each figure to (the issues' targets).
TARGETS = {
    "overhead_cpu": 1.15,
    "overhead_gpu": 1.10,
    "extra_memory": 0.10,
    "analysis_mb_s": 1000.0,
    "analysis_rss": 1e9,
    "first_heatmap_s": 3.0,
    "writer_mb_s_per_core": 600.0,
    "writer_scaling": 1.8,
    "writer_projected_ratio": 1.10,
    "run_fixed_ms": 50.0,
}


def bytes_per_value(gpu_box: dict[str, Any]) -> float:
    """Bytes on disk per float32 value a GPU box's traced generation recorded."""
    return gpu_box["bytes_written"] / (gpu_box["decoded_bytes"] / 4)


def memory_summary(r: dict[str, Any], allocator: str = "fixed") -> dict[str, dict[str, Any]]:
    """Per variant: median peak RSS over its processes, extra over untraced, every peak."""
    main = "quick" if r["quick"] else "flux-cpu"
    peaks: dict[str, list[int]] = {}
    for run in r["memory"][main]:
        if run["allocator"] == allocator:
            peaks.setdefault(run["variant"], []).append(run["peak"])
    if not peaks:
        return {}
    base = median(peaks["untraced"])
    return {
        v: {
            "peak": median(p),
            "peaks": p,
            "extra": median(p) - base,
            "extra_fraction": (median(p) - base) / base,
        }
        for v, p in peaks.items()
    }


def growth_summary(r: dict[str, Any]) -> dict[Any, float]:
    """Extra peak RSS of attnscope (median over processes) at 2 and 8 steps, and the peak."""
    peaks: dict[tuple[str, int], list[int]] = {}
    for x in r["growth"]["runs"]:
        peaks.setdefault((x["variant"], x["steps"]), []).append(x["peak"])
    m = {key: median(p) for key, p in peaks.items()}
    return {
        2: m[("attnscope", 2)] - m[("untraced", 2)],
        8: m[("attnscope", 8)] - m[("untraced", 8)],
        "peak": m[("untraced", 8)],
        "medians": m,
    }
