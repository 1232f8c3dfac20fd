"""`python -m bench rate`: can the writer keep up with a GPU at FLUX.1-dev's shape?

On this machine the model is far slower than the writer, so the overhead benchmark cannot show
a writer that falls behind. This one leaves the model out: it feeds the real writer (`TraceWriter`
into a real store) with FLUX.1-dev-shaped steps (57 layers × 24 heads × the token rows of a
20-word prompt × 64×64, both directions), made of maps from a real recording of the demo model at
a 64×64 latent grid (real maps compress as maps do; random numbers do not), one step every
`--period` seconds (each layer's maps as a GPU makes them, spread over the period; a generation
held in put() resumes where it stopped), on 1 and then 2 host cores (`sched_setaffinity`), each
in a fresh process.

The maps arrive already rounded to what a recording of FLUX.1-dev (a bf16 model) keeps by default, 7
mantissa bits, as they leave a GPU (tracer.rounding rounds them there, before the copy), so the host
does here what it does on a GPU box: copy each layer into the step buffer, encode the step's shards
(zarrs, on every core; both directions and the pending steps side by side), sync them and rename
them into place (tracer.durable), list the step.

Each is measured twice: in a process as the library leaves it, and with glibc's allocator set as
`attnscope record` sets it (analysis.allocator: freed memory is reused, not faulted in afresh).

It reports, per core count: the decoded MB/s of the whole run (every step's bytes over the time
from the first put() to the last step durable) and the sustained rate (the steps after the first
WARM_UP_STEPS, from when each was listed durable), the warm-up of a process's first paced run
and of a later one (how much later than the sustained rate gives the first steps were durable:
buffers and zarrs' working memory faulted in, counted as `faulted_gb`), how long put()
made the generation wait (the backpressure: the writer never lets memory grow), the unthrottled
rate, the same without fsync (what durability costs) and on zarr-python's own codec pipeline (the
baseline), and the fixed costs: starting the run as the session does, on the generation's thread
(`start_seconds`: claiming its name and starting the writer, which lays the run down on its own
thread during the first step, `laid_down_seconds`), and the flush after the last put
(`close_seconds`).

The projection to an H100 host takes the sustained per-core rate sped up by Amdahl's law, with
the serial fraction its measured 1 -> 2 core scaling (at most 2) gives, keeps the warm-up
measured on 2 cores, and plays a 28-step generation through the writer's backpressure
(_simulated_ratio): traced / untraced is when its last step is durable over 28 H100 steps. For
later runs it is also measured (emulate): the real writer on 2 cores is fed a 28-step generation
whose period is stretched by how much longer a step takes to write here than projected on the
host, so it faces the host's load.

    python -m bench rate                     # prints the figures
    python -m bench rate --json rate.json    # and writes them as JSON
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import resource
import shutil
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import isolated, log, scratch

LAYERS, HEADS, GRID = 57, 24, (64, 64)
TOKEN_ROWS = 26  # a 20-word prompt: its tokens, </s> and the padding row
H100_STEP_SECONDS = 0.15  # FLUX.1-dev, 1024², bf16, one step
HOSTS = (8, 16)
BASELINE = "unthrottled, zarr-python's pipeline"
BUFFERED = "unthrottled, through the page cache"
PACED_LATER = "paced, later run"
LOOK_SECONDS = 0.005  # how often _Listings looks at the steps listed


def _demo_maps(path: Path) -> dict[str, Any]:
    """Maps of a real demo recording on a 64×64 grid, lossless: {direction: [rows, 4096]}."""
    import torch

    import analysis
    import tracer
    from tracer.demo import demo_pipeline

    pipe = demo_pipeline(seed=0, max_sequence_length=32)
    with tracer.trace(pipe, str(path), keepbits=None, progress=False):
        pipe(
            "a photo of a cat sitting on a red chair",
            num_inference_steps=2,
            height=1024,
            width=1024,
            max_sequence_length=32,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        )
    rows = analysis.open_trace(path, tokens=True)
    out = {}
    for direction in ("txt2img", "img2txt"):
        values = rows[f"{direction}"].isel(step=-1).values  # layer, head, token, y, x
        out[direction] = torch.from_numpy(values.reshape(-1, GRID[0] * GRID[1]).copy())
    return out


def layer_maps(demo: Any, layer: int) -> Any:
    """One layer's `[HEADS, TOKEN_ROWS, cells]` maps, cycling through the demo's rows (`[rows,
    cells]`): a chunk's heads are consecutive rows, so they differ as a real chunk's do. (With
    heads TOKEN_ROWS rows apart, a demo of 260 rows repeated every tenth inside a chunk, which
    compressed 2.3 times better than real maps and encoded faster.)"""
    import torch

    per_layer = HEADS * TOKEN_ROWS
    picked = [demo[(layer * per_layer + i) % len(demo)] for i in range(per_layer)]
    return torch.stack(picked).reshape(TOKEN_ROWS, HEADS, -1).transpose(0, 1).contiguous()


class _Listings:
    """When each step was listed durable, in seconds since `start`: the writer's
    steps_complete, looked at every LOOK_SECONDS on a thread of its own."""

    def __init__(self, writer: Any, start: float) -> None:
        self._writer, self._start = writer, start
        self._times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(LOOK_SECONDS):
            self._look()

    def _look(self) -> None:
        listed = len(self._writer.steps_complete)
        self._times += [time.perf_counter() - self._start] * (listed - len(self._times))

    def stop(self) -> list[float]:
        """Stop watching (once the writer is closed) and return the times, in step order."""
        self._stop.set()
        self._thread.join()
        self._look()
        return self._times


def touch_memory(gigabytes: float, huge_pages: bool = False) -> float:
    """Seconds per GB to touch `gigabytes` of memory this process never had. Fresh interpreter.

    In 4 KiB pages, as the writer's buffers are faulted in (neither glibc nor torch asks for
    more), or `huge_pages` madvised for transparent huge pages, as NumPy asks for its large arrays.
    """
    import numpy as np

    size = int(gigabytes * 2**30)
    start = time.perf_counter()
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge_pages:
        memory.madvise(mmap.MADV_HUGEPAGE)
    np.frombuffer(memory, dtype=np.float32).fill(1.0)
    return (time.perf_counter() - start) / gigabytes


def memory_cost() -> dict[str, float]:
    """What a page fault costs here, in 4 KiB pages and in huge pages: touching memory after a
    pause, and again at once.

    Where the machine is a virtual machine whose balloon hands the memory its guest frees back
    to the host (this one), memory touched after a pause may cost a fault on the host as well.
    """
    out = {}
    for pages, huge_pages in (("4k", False), ("huge", True)):
        time.sleep(5.0)  # Linux reports free pages to a balloon 2 s after they are freed
        for when in ("after_a_pause", "just_freed"):
            out[f"touch_seconds_per_gb_{pages}_pages_{when}"] = isolated(
                "bench.rate:touch_memory", gigabytes=2.0, huge_pages=huge_pages
            )
    return out


def measure(cores: int, steps: int, period: float, tuned: bool = False) -> dict[str, Any]:
    """Feed `steps` FLUX-shaped steps to the writer on `cores` host cores. Fresh interpreter.

    `tuned`: with the allocator set as `attnscope record` sets it (analysis.allocator), paced and
    unthrottled only.
    """
    from tracer.durable import DIRECT_IO_ENV, disk_sync_rate
    from tracer.zarr_pipeline import ENV

    _take_cores(cores, tuned)
    with scratch("rate") as workdir:
        load = Load(workdir, steps)
        results = {}
        # Paced twice: a process's first run faults its memory in, a later one reuses it. The
        # unthrottled run twice, the faster kept: other jobs on the shared cores only ever slow
        # a run down, and the 1 -> 2 core scaling compounds in the projection.
        variants = (
            ("paced", period, True),
            (PACED_LATER, period, True),
            ("unthrottled", 0.0, True),
            ("unthrottled", 0.0, True),
        )
        if not tuned:
            variants += (
                (BUFFERED, 0.0, True),
                ("unthrottled, no fsync", 0.0, False),
                (BASELINE, 0.0, True),
            )
        for name, pace, fsync in variants:
            # The baseline: the same writer on zarr-python's own codec pipeline.
            os.environ[ENV] = "zarr" if name == BASELINE else "zarrs"
            # Synced shards are written past the page cache (O_DIRECT) but here.
            os.environ[DIRECT_IO_ENV] = "0" if name == BUFFERED else "1"
            measured = feed(load, workdir / f"{name}.zarr", steps, pace, fsync)
            if name not in results or measured["seconds"] < results[name]["seconds"]:
                results[name] = measured
        disk = disk_sync_rate(workdir, 2**30) / 1e6
    return {
        "cores": cores,
        "steps": steps,
        "period": period,
        "step_bytes": load.step_bytes,
        "keepbits": load.keepbits,
        "disk_sync_mb_s": disk,
    } | results


def emulate(cores: int, seconds_per_step: dict[str, float]) -> dict[str, Any]:
    """Later runs of a FLUX_STEPS generation on `cores` cores, each at a host's load: its step
    period stretched by how much longer a step takes here than the `seconds_per_step` projected
    for that host. Allocator tuned. Fresh interpreter.

    Traced/untraced is then measured, not modelled: the writer's warm-up, its backpressure and
    the flush after the last step as they happen. Like the projection, it assumes all of a
    step's writing scales with the cores.
    """
    from tracer.durable import DIRECT_IO_ENV
    from tracer.zarr_pipeline import ENV

    _take_cores(cores, tuned=True)
    os.environ[ENV], os.environ[DIRECT_IO_ENV] = "zarrs", "1"
    with scratch("emulate") as workdir:
        load = Load(workdir, FLUX_STEPS)
        # This process's own step time, as a later run's: the shared cores are not equally fast
        # from one process to the next, and a process's first run faults its memory in. Twice,
        # the faster kept, as measure() does.
        here = min(
            (feed(load, workdir / "unthrottled.zarr", STEPS, 0.0) for _ in range(2)),
            key=lambda run: run["seconds"],
        )
        seconds_here = load.step_bytes / here["sustained_mb_s"] / 1e6
        out: dict[str, Any] = {"unthrottled": here}
        for host, seconds in seconds_per_step.items():
            period = H100_STEP_SECONDS * seconds_here / seconds
            run = feed(load, workdir / f"{host} cores.zarr", FLUX_STEPS, period)
            out[host] = run | {
                "period": period,
                "traced_over_untraced": run["seconds"] / (FLUX_STEPS * period),
            }
    return out


def _take_cores(cores: int, tuned: bool) -> None:
    """Run this process on the first `cores` cores; `tuned`: allocator as `attnscope record`."""
    os.sched_setaffinity(0, set(range(cores)))
    if tuned:
        from analysis.allocator import reuse_freed_memory

        reuse_freed_memory()
    import torch

    torch.set_num_threads(cores)


class Load:
    """FLUX.1-dev-shaped steps of real maps, rounded as from the GPU, and a run's coordinates
    for `steps` steps (of `layers` layers: FLUX.1-dev's 57 but for a smoke run)."""

    def __init__(self, workdir: Path, steps: int, layers: int = LAYERS) -> None:
        import torch

        from analysis import store_format as fmt
        from tracer.rounding import MODEL_PRECISION, bitround_, keepbits_for
        from tracer.write_probe import synthetic_coords

        # What a recording of FLUX.1-dev, which computes in bf16, keeps by default.
        self.keepbits = keepbits_for(MODEL_PRECISION, torch.bfloat16)
        demo = {
            d: bitround_(v, self.keepbits) for d, v in _demo_maps(workdir / "demo.zarr").items()
        }
        self.layers = layers
        self.maps = {d: [layer_maps(v, layer) for layer in range(layers)] for d, v in demo.items()}
        rows = [fmt.TokenRow(i, 1, f"t{i}", "prompt") for i in range(TOKEN_ROWS - 1)]
        rows.append(fmt.TokenRow(TOKEN_ROWS - 1, 512 - TOKEN_ROWS + 1, "<pad>", "prompt", True))
        self.coords = synthetic_coords(steps, layers, HEADS, rows, GRID)
        self.attrs = {fmt.STATUS: fmt.RECORDING, fmt.STEPS_COMPLETE: [], fmt.TEXT_LEN: 512}
        self.step_bytes = 2 * layers * HEADS * TOKEN_ROWS * GRID[0] * GRID[1] * 4


def feed(
    load: Load, store: Path, steps: int, pace: float, fsync: bool = True, max_pending: int = 2
) -> dict[str, Any]:
    """One run: the first `steps` of `load`'s steps fed to a new writer into `store`, a step
    every `pace` seconds (0: as fast as it takes them), `max_pending` steps in flight (the
    default's); what it measured."""
    from analysis import store_format as fmt
    from tracer.store import claim_run, lay_down_run
    from tracer.writer import RunPlan, TraceWriter

    shutil.rmtree(store, ignore_errors=True)
    created = time.perf_counter()
    run_name = claim_run(str(store))
    laid_down: list[float] = []

    def lay_down() -> Any:
        began = time.perf_counter()
        group = lay_down_run(str(store), run_name, load.coords, load.attrs, fmt.DIRECTIONS, None)
        laid_down.append(time.perf_counter() - began)
        return group

    # The maps arrive rounded, as from the GPU (rounded there before the copy), so the writer
    # is not asked to round them again on the host.
    writer = TraceWriter(
        RunPlan(load.coords, None, lay_down),
        directions=list(fmt.DIRECTIONS),
        n_layers=load.layers,
        max_pending=max_pending,
        fsync=fsync,
    )
    waited, start, cpu = 0.0, time.perf_counter(), time.process_time()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    listings = _Listings(writer, start)
    for step in range(steps):
        for layer in range(load.layers):
            # As a GPU makes them: each layer's maps when its block has run, the step's last at
            # the end of its period; a generation held in put() resumes where it stopped.
            due = start + waited + (step + (layer + 1) / load.layers) * pace
            time.sleep(max(0.0, due - time.perf_counter()))
            before = time.perf_counter()
            writer.put(step, layer, {d: load.maps[d][layer] for d in fmt.DIRECTIONS})
            waited += time.perf_counter() - before
    last_put = time.perf_counter()
    writer.close()
    elapsed = time.perf_counter() - start
    listed = listings.stop()
    measured = {
        "seconds": elapsed,
        "decoded_mb_s": steps * load.step_bytes / elapsed / 1e6,
        "listed_seconds": listed,
        "put_wait_seconds": waited,
        # Every thread of the process: the puts' copies, encoding, writing, syncing.
        "cpu_seconds": time.process_time() - cpu,
        "start_seconds": start - created,
        "laid_down_seconds": laid_down[0],
        "close_seconds": time.perf_counter() - last_put,
        "stored_bytes": sum(p.stat().st_size for p in store.rglob("*") if p.is_file()),
        # Pages this process faulted in meanwhile, every thread: the memory the run took from
        # the system rather than reused.
        "faulted_gb": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
        * mmap.PAGESIZE
        / 2**30,
    }
    return measured | _sustained(listed, load.step_bytes, pace)


def project(
    by_cores: dict[int, dict[str, Any]], emulated: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Per-core rate, 1 → 2 scaling and the projected traced/untraced ratio on H100 hosts;
    with `emulate()`'s runs, the later runs' ratio as they measured it too."""
    step_bytes = by_cores[1]["step_bytes"]
    out = {
        "needed_mb_s_at_h100": step_bytes / H100_STEP_SECONDS / 1e6,
        "fsync_cost": by_cores[2]["unthrottled, no fsync"]["decoded_mb_s"]
        / by_cores[2]["unthrottled"]["decoded_mb_s"],
        "start_run_ms": by_cores[2]["paced"]["start_seconds"] * 1e3,
        # What this disk allows: its fsync'd write rate times the compression ratio.
        "disk_ceiling_decoded_mb_s": by_cores[2]["disk_sync_mb_s"]
        * (step_bytes * by_cores[2]["steps"] / by_cores[2]["unthrottled"]["stored_bytes"]),
        "direct_io_over_page_cache": {
            cores: runs["unthrottled"]["decoded_mb_s"] / runs[BUFFERED]["decoded_mb_s"]
            for cores, runs in by_cores.items()
        },
        "zarrs_over_zarr_python": {
            cores: runs["unthrottled"]["decoded_mb_s"] / runs[BASELINE]["decoded_mb_s"]
            for cores, runs in by_cores.items()
        },
    }
    out |= _projected(by_cores[1], by_cores[2], step_bytes)
    out |= _by_cpu_time(by_cores[1], step_bytes)
    single = by_cores[1]["unthrottled"]
    stored_per_decoded = single["stored_bytes"] / (by_cores[1]["steps"] * step_bytes)
    out["disk_mb_s_needed_at_h100"] = out["needed_mb_s_at_h100"] * stored_per_decoded
    if all("tuned" in runs for runs in by_cores.values()):
        one, two = by_cores[1]["tuned"], by_cores[2]["tuned"]
        out["tuned"] = _projected(one, two, step_bytes) | _by_cpu_time(one, step_bytes)
        if emulated:
            out["tuned"] |= {
                f"projected_ratio_h100_{host}_cores_later_run_emulated": emulated[str(host)][
                    "traced_over_untraced"
                ]
                for host in HOSTS
            }
    return out


def _by_cpu_time(one_core: dict[str, Any], step_bytes: int) -> dict[str, float]:
    """Without the disk: the host CPU time a decoded GB costs (one core, unthrottled), so the
    cores that keep up with an H100 if they scale perfectly and the disk keeps up."""
    run = one_core["unthrottled"]
    cpu_per_mb = run["cpu_seconds"] / (one_core["steps"] * step_bytes / 1e6)
    cores_needed = cpu_per_mb * step_bytes / H100_STEP_SECONDS / 1e6
    return {
        "cpu_seconds_per_decoded_gb": cpu_per_mb * 1e3,
        "cores_needed_at_h100": cores_needed,
    } | {
        f"projected_ratio_h100_{host}_cores_by_cpu_time": max(1.0, cores_needed / host)
        for host in HOSTS
    }


def _projected(one: dict[str, Any], two: dict[str, Any], step_bytes: int) -> dict[str, float]:
    """From the runs on one and two cores: the sustained rate per core and its 1 -> 2 core
    scaling (and the same over whole runs), and traced/untraced at the H100's step rate on each
    of HOSTS: the rate sped up by Amdahl's law (_seconds_per_step), played (_simulated_ratio)."""
    per_core = one["unthrottled"]["sustained_mb_s"]
    scaling = two["unthrottled"]["sustained_mb_s"] / per_core
    # The warm-up of a process's first run (the paced one comes first), on the most cores here.
    # It is page faults and shrank about as the rate grew from 1 to 2 cores (1.8x), but whether
    # it goes on shrinking up to 16 cores is not measurable on this machine, so it is kept.
    first_run, later_run = two["paced"]["warm_up_seconds"], two[PACED_LATER]["warm_up_seconds"]
    out = {
        "decoded_mb_s_per_core": per_core,
        "scaling_1_to_2_cores": scaling,
        "whole_run_mb_s_per_core": one["unthrottled"]["decoded_mb_s"],
        "whole_run_scaling_1_to_2_cores": two["unthrottled"]["decoded_mb_s"]
        / one["unthrottled"]["decoded_mb_s"],
        "warm_up_seconds_first_run": first_run,
        "warm_up_seconds_later_run": later_run,
        "faulted_gb_first_run": two["paced"]["faulted_gb"],
        "faulted_gb_later_run": two[PACED_LATER]["faulted_gb"],
    }
    for host in HOSTS:
        seconds_per_step = _seconds_per_step(one, two, step_bytes, host)
        out[f"projected_ratio_h100_{host}_cores"] = _simulated_ratio(seconds_per_step, first_run)
        out[f"projected_ratio_h100_{host}_cores_later_run"] = _simulated_ratio(
            seconds_per_step, later_run
        )
    return out


def _seconds_per_step(
    one: dict[str, Any], two: dict[str, Any], step_bytes: int, host: int
) -> float:
    """A step's sustained writing time projected for `host` cores, from the runs on one and two
    cores: one core's rate sped up by Amdahl's law, with the serial fraction that gives the
    measured 1 -> 2 core scaling, and never less than this disk takes to sync the step's stored
    bytes (more cores do not make it faster)."""
    per_core = one["unthrottled"]["sustained_mb_s"]
    # A measured 1 -> 2 scaling above 2 is noise (the cores are shared): never project faster
    # than one core's rate times the cores; below 1, nothing scales.
    scaling = min(max(two["unthrottled"]["sustained_mb_s"] / per_core, 1.0), 2.0)
    serial = 2.0 / scaling - 1.0
    by_cores = step_bytes * (serial + (1.0 - serial) / host) / (per_core * 1e6)
    stored_per_step = two["unthrottled"]["stored_bytes"] / two["steps"]
    return max(by_cores, stored_per_step / (two["disk_sync_mb_s"] * 1e6))


# A writer's first steps are slower: its step buffers (TraceWriter's max_pending of them) and
# zarrs' working memory are faulted in while they are written.
WARM_UP_STEPS = 2
FLUX_STEPS = 28  # FLUX.1-dev's default num_inference_steps


def _sustained(listed: list[float], step_bytes: int, period: float) -> dict[str, float]:
    """From when each step was listed, steps fed one every `period` seconds: the sustained rate
    (the steps after the first WARM_UP_STEPS, over the time they took) and the warm-up, as
    _simulated_ratio plays it: how much later than the first step's feeding plus WARM_UP_STEPS
    sustained steps the first WARM_UP_STEPS were durable."""
    seconds_per_step = (listed[-1] - listed[WARM_UP_STEPS - 1]) / (len(listed) - WARM_UP_STEPS)
    # Steps listed between two looks read as listed at once: each took at most a look's time.
    seconds_per_step = max(seconds_per_step, LOOK_SECONDS)
    expected = period + WARM_UP_STEPS * seconds_per_step
    return {
        "sustained_mb_s": step_bytes / seconds_per_step / 1e6,
        "warm_up_seconds": max(0.0, listed[WARM_UP_STEPS - 1] - expected),
    }


def _simulated_ratio(seconds_per_step: float, warm_up_seconds: float) -> float:
    """Traced / untraced of a FLUX_STEPS generation at the H100's step time, with a writer that
    makes a step durable every `seconds_per_step` once warm and spends `warm_up_seconds` more on
    its first (_durable_times); the run ends when its last step is durable."""
    durable = _durable_times(seconds_per_step, warm_up_seconds, H100_STEP_SECONDS, FLUX_STEPS)
    return durable[-1] / (FLUX_STEPS * H100_STEP_SECONDS)


def _durable_times(
    seconds_per_step: float, warm_up_seconds: float, period: float, steps: int
) -> list[float]:
    """When each of `steps` steps, one generated every `period` seconds, is durable, in seconds
    from the first step's start. As the writer does: a step is written once generated, after the
    one before it; the generation starts a step only while fewer than WARM_UP_STEPS
    (max_pending) steps are not yet durable."""
    durable: list[float] = []
    generated = 0.0
    for step in range(steps):
        if step >= WARM_UP_STEPS:
            generated = max(generated, durable[step - WARM_UP_STEPS])
        generated += period
        begins = max(generated, durable[-1]) if durable else generated + warm_up_seconds
        durable.append(begins + seconds_per_step)
    return durable


# Steps fed per measurement: WARM_UP_STEPS, then enough for a sustained rate. With 4 the whole
# run's rate was a third warm-up, serial start and end: its 1 -> 2 core scaling read 1.29-1.51
# where 8 steps read 1.65 on the same machine.
STEPS = 8


def writer_alone(
    pending: Sequence[int], steps: int = STEPS, layers: int = LAYERS
) -> dict[str, Any]:
    """The writer alone on this process's cores, in this process (its allocator as it is), fed
    as fast as it takes them and at an H100's step: its decoded MB/s with each of `pending`
    steps in flight. On a GPU box (bench.gpu) it tells the writer's own rate there from what the
    generation beside it costs."""
    with scratch("writer") as workdir:
        load = Load(workdir, steps, layers)
        runs = {}
        for max_pending in pending:
            for pace in (0.0, H100_STEP_SECONDS):
                run = feed(load, workdir / "w.zarr", steps, pace, max_pending=max_pending)
                label = f"{max_pending} steps in flight, " + ("paced" if pace else "unthrottled")
                runs[label] = {key: run[key] for key in _WRITER_ALONE}
    return {
        "cores": len(os.sched_getaffinity(0)),
        "steps": steps,
        "step_bytes": load.step_bytes,
        "runs": runs,
    }


_WRITER_ALONE = (
    "decoded_mb_s",
    "sustained_mb_s",
    "put_wait_seconds",
    "cpu_seconds",
    "close_seconds",
    "stored_bytes",
)


def figures(period: float = H100_STEP_SECONDS, steps: int = STEPS) -> dict[str, Any]:
    """Measure on 1 and 2 cores (those this machine has) and project."""
    available = len(os.sched_getaffinity(0))
    by_cores = {}
    for cores in (1, 2):
        if cores > available:
            print(f"only {available} core(s) here: no {cores}-core figure", file=sys.stderr)
            continue
        log(f"rate: {cores} core(s)")
        by_cores[cores] = isolated("bench.rate:measure", cores=cores, steps=steps, period=period)
        log(f"rate: {cores} core(s), allocator tuned")
        by_cores[cores]["tuned"] = isolated(
            "bench.rate:measure", cores=cores, steps=steps, period=period, tuned=True
        )
    out: dict[str, Any] = {"runs": by_cores}
    if len(by_cores) == 2:
        one, two = by_cores[1]["tuned"], by_cores[2]["tuned"]
        log("rate: later runs at the load of 8 and 16 cores, emulated on 2")
        seconds_per_step = {
            str(host): _seconds_per_step(one, two, one["step_bytes"], host) for host in HOSTS
        }
        out["emulated"] = isolated("bench.rate:emulate", cores=2, seconds_per_step=seconds_per_step)
    out["memory"] = memory_cost()
    return out | (project(by_cores, out.get("emulated")) if len(by_cores) == 2 else {})


def main(argv: list[str]) -> int:
    """`python -m bench rate [--period S] [--steps N] [--json FILE]`."""
    parser = argparse.ArgumentParser(
        prog="python -m bench rate", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--period", type=float, default=H100_STEP_SECONDS, help="seconds per step")
    parser.add_argument("--steps", type=int, default=STEPS, help="steps fed per measurement")
    parser.add_argument("--json", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args(argv)
    if args.steps <= WARM_UP_STEPS:
        parser.error(f"--steps must be more than the {WARM_UP_STEPS} warm-up steps: {args.steps}")
    result = figures(args.period, args.steps)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0
