"""Wall time of a whole generation, untraced and under each recorder, in one process.

Other people's jobs share the cores, so the load drifts by a factor of two or three within
minutes. Each measurement is therefore a *pair*: one untraced generation next to one recorded
generation, in alternating order, and its ratio is their quotient; figures are medians over
pairs. Pairs of the different recorders are interleaved. Process CPU time (all threads) is kept
beside wall time: it shows work that was added, where wall time also shows work that ran alone.
On CUDA, the peak device memory of each variant is measured here too
(`torch.cuda.max_memory_allocated`, reset before each run).
"""

from __future__ import annotations

import contextlib
import gc
import resource
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import Geometry, build_pipeline, du, log, median, scratch
from bench.variants import VARIANTS, decoded


def _schedule(pairs: dict[str, int]) -> list[str]:
    """Recorders in round-robin order, each as many times as its pairs."""
    order, left = [], dict(pairs)
    while any(left.values()):
        for name in pairs:
            if left[name]:
                order.append(name)
                left[name] -= 1
    return order


def measure(geometry: dict[str, Any], pairs: dict[str, int]) -> dict[str, Any]:
    """Run in a fresh interpreter (bench.common.isolated). `pairs`: recorder -> pair count."""
    import torch

    geo = Geometry(**geometry)
    pipe = build_pipeline(geo)

    def run(name: str, workdir: Path) -> dict[str, Any]:
        gc.collect()
        if geo.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        wall, cpu = time.perf_counter(), time.process_time()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        recorded = VARIANTS[name](pipe, geo, workdir)
        recorded |= {
            "wall": time.perf_counter() - wall,
            "cpu": time.process_time() - cpu,
            "page_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults,
        }
        if geo.device == "cuda":
            recorded["cuda_peak"] = torch.cuda.max_memory_allocated()
        recorded["bytes"] = du(workdir)
        if name.startswith("attnscope"):
            recorded |= decoded(recorded["path"])
        return recorded

    with scratch("warmup") as workdir:  # first-call costs (allocator, kernels) out of pair 1
        log(f"{geo.name}: warm-up generation {run('untraced', workdir)['wall']:.1f} s")

    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in ("untraced", *pairs)}
    ratios: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in pairs}
    outputs: dict[str, dict[str, Any]] = {}
    for index, name in enumerate(_schedule(pairs)):
        order = ("untraced", name) if index % 2 == 0 else (name, "untraced")
        got = {}
        for variant in order:
            with scratch(variant) as workdir:
                got[variant] = run(variant, workdir)
            samples[variant].append(got[variant])
        outputs[name] = got[name]
        for clock in ("wall", "cpu"):
            ratios[name][clock].append(got[name][clock] / got["untraced"][clock])
        log(
            f"{geo.name} pair {index + 1}: {name} {got[name]['wall']:.2f} s / untraced "
            f"{got['untraced']['wall']:.2f} s = {ratios[name]['wall'][-1]:.3f}"
        )

    breakdown = None
    if "attnscope" in pairs:
        with scratch("breakdown") as workdir, _timing_parts(geo.device) as parts:
            total = run("attnscope", workdir)["wall"]
        breakdown = {"wall": total, **parts}

    def medians(name: str, key: str) -> float:
        return median([s[key] for s in samples[name]])

    return {
        "geometry": geometry,
        "pairs": pairs,
        "median_wall": {name: medians(name, "wall") for name in samples},
        "median_cpu": {name: medians(name, "cpu") for name in samples},
        "ratio": {name: median(r["wall"]) for name, r in ratios.items()},
        "cpu_ratio": {name: median(r["cpu"]) for name, r in ratios.items()},
        "ratios": ratios,
        "outputs": outputs,
        "breakdown": breakdown,
        "cuda_peak": {
            name: max(s["cuda_peak"] for s in runs)
            for name, runs in samples.items()
            if runs and "cuda_peak" in runs[0]
        },
    }


@contextlib.contextmanager
def _timing_parts(device: str) -> Iterator[dict[str, float]]:
    """Seconds spent in the tracer's parts during one traced generation (wrapped functions).

    `start_run` (starting a run on the generation's thread: its name, the writer), `lay_down`
    (laying the run group down, on the writer's thread during the first step), `capture` (the
    capture math, on the generation's thread), `writer_put`, and `writer_step` (compressing and
    writing a step's shards, on the writer's store threads, in parallel with the generation:
    thread-seconds, summed). Those are the host's clock, which on a GPU sees only the launches;
    `capture_device` and `attention_device` are the seconds the capture and the model's own
    attention calls (the tap's kernel that returns the lse) kept the `device` busy: CUDA events
    around each call there, the host's clock on the CPU.
    """
    import tracer.durable as durable
    import tracer.session as session
    import tracer.tap as tap
    import tracer.writer as writer

    parts: dict[str, float] = {}
    targets = [
        (session.Recorder, "_start_run", "start_run"),
        (session, "lay_down_run", "lay_down"),
        (session, "attention_maps", "capture"),
        (writer.TraceWriter, "put", "writer_put"),
        (durable.StagedShards, "write", "writer_step"),
    ]
    on_device = [(session, "attention_maps", "capture"), (tap, "_run_with_lse", "attention")]
    originals = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in targets + on_device]
    clock = DeviceClock(device)

    def timed(function: Any, key: str) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                parts[key] = parts.get(key, 0.0) + time.perf_counter() - start

        return wrapper

    for owner, attr, key in targets:
        setattr(owner, attr, timed(getattr(owner, attr), key))
    for owner, attr, key in on_device:
        setattr(owner, attr, clock.timed(getattr(owner, attr), key))
    try:
        yield parts
        parts |= {f"{key}_device": seconds for key, seconds in clock.seconds().items()}
    finally:
        for owner, attr, function in originals:
            setattr(owner, attr, function)


class DeviceClock:
    """Seconds wrapped calls keep a device busy, summed per key. On CUDA a call returns once its
    kernels are queued, so each is bracketed by CUDA events on the current stream, read at the
    end (the stream's time between them: the call's kernels, and any wait for the host to queue
    them); on the CPU the call is its work, and the host's clock is the device's."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"
        self.spans: dict[str, list[Any]] = {}

    def timed(self, function: Any, key: str) -> Any:
        import torch

        spans = self.spans.setdefault(key, [])

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if self.cuda:
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                try:
                    return function(*args, **kwargs)
                finally:
                    end.record()
                    spans.append((start, end))
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spans.append(time.perf_counter() - start)

        return wrapper

    def calls(self, key: str) -> list[float]:
        """Seconds of each call of `key` so far, in order; waits for the device to finish."""
        spans = self.spans.get(key, [])
        if not self.cuda:
            return list(spans)
        import torch

        torch.cuda.synchronize()
        return [start.elapsed_time(end) / 1e3 for start, end in spans]

    def seconds(self) -> dict[str, float]:
        """Each key's seconds so far, summed over its calls."""
        return {key: sum(self.calls(key)) for key in self.spans}
