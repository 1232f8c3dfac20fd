"""A disk slower than the steps: the writer paced as from a GPU, fsync on against off.

`attnscope record --no-fsync` is for a disk that syncs slower than the model computes: its steps
go to the page cache, so the generation waits for the disk only past the kernel's limit on
unwritten pages. This machine's disk keeps up, so the same paced runs are timed twice: on the
disk as it is, and with this process's writes to it throttled by the kernel's block I/O
controller (a cgroup of its own; root only), which slows what reaches the device (direct and
synced writes) as a slow disk would. Writeback from the page cache runs in the kernel's own
threads, outside the cgroup: the unsynced runs show what the generation waits for, not when the
disk has the bytes. Beside each, what `record --estimate` predicts for those steps from its probe
of the writer (tracer.write_probe), run under the same throttle.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import log, scratch

LAYERS = 8  # FLUX.1-dev's steps but 8 of its 57 layers: what 2 cores encode at 0.15 s a step
STEPS = 20
THROTTLED_MB_S = 150
CGROUP_V1 = Path("/sys/fs/cgroup/blkio")


def measure(period: float = 0.15) -> dict[str, Any]:
    """Paced runs, fsync on and off, on the disk as it is and throttled. Fresh interpreter."""
    import dataclasses

    from analysis import store_format as fmt
    from analysis.allocator import reuse_freed_memory
    from bench.rate import GRID, HEADS, TOKEN_ROWS, Load, feed
    from tracer.estimate import Estimate, writer_facts

    reuse_freed_memory()  # as `attnscope record` sets it
    with scratch("slow-disk") as workdir:
        load = Load(workdir, STEPS, LAYERS)
        feed(load, workdir / "warm.zarr", 3, 0.0)  # faults the writer's memory in
        out: dict[str, Any] = {"layers": LAYERS, "steps": STEPS, "period": period}
        for disk in ("as it is", f"throttled to {THROTTLED_MB_S} MB/s"):
            with contextlib.ExitStack() as stack:
                if disk != "as it is":
                    why_not = stack.enter_context(throttled_writes(workdir, THROTTLED_MB_S))
                    if why_not:
                        out[disk] = {"skipped": why_not}
                        continue
                log(f"slow disk: {disk}")
                runs: dict[str, Any] = {}
                # Twice each, alternating, the faster kept: other jobs only slow a run down.
                for fsync in (True, False, True, False):
                    name = "fsync on" if fsync else "fsync off"
                    run = feed(load, workdir / f"{name}.zarr", STEPS, period, fsync)
                    run["traced_over_untraced"] = run["seconds"] / (STEPS * period)
                    if name not in runs or run["seconds"] < runs[name]["seconds"]:
                        runs[name] = run
                for fsync in (True, False):
                    cost = Estimate(
                        layers=LAYERS,
                        heads=HEADS,
                        rows=TOKEN_ROWS,
                        grid=GRID,
                        steps=STEPS,
                        directions=fmt.DIRECTIONS,
                        keepbits=load.keepbits,
                        step_seconds=period,
                        fsync=fsync,
                    )
                    probed = writer_facts(cost, workdir / "estimated.zarr")
                    runs["fsync on" if fsync else "fsync off"]["estimate"] = dataclasses.replace(
                        cost, **probed
                    ).write_ratio
                out[disk] = runs
    return out


@contextlib.contextmanager
def throttled_writes(folder: Path, megabytes_per_second: float) -> Iterator[str | None]:
    """This process's writes to the disk under `folder` held to `megabytes_per_second`, by a
    blkio cgroup of its own (cgroup v1); yields None, or why it could not be done."""
    group = CGROUP_V1 / f"attnscope-bench-{os.getpid()}"
    try:
        disk = _disk_of(folder)
        group.mkdir()
    except OSError as error:
        yield f"no blkio cgroup to throttle writes in ({error.strerror}: {error.filename})"
        return
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    home = next((line.split(":", 2)[2] for line in lines if ":blkio:" in line), "/")
    try:
        try:
            limit = f"{disk} {int(megabytes_per_second * 1e6)}"
            (group / "blkio.throttle.write_bps_device").write_text(limit)
            (group / "cgroup.procs").write_text(str(os.getpid()))
        except OSError as error:
            yield f"the blkio cgroup refused to throttle disk {disk} ({error.strerror})"
            return
        yield None
    finally:
        (CGROUP_V1 / home.lstrip("/") / "cgroup.procs").write_text(str(os.getpid()))
        group.rmdir()


def _disk_of(folder: Path) -> str:
    """`major:minor` of the whole disk `folder` is on (a partition's writes count on its disk)."""
    device = os.stat(folder).st_dev
    block = Path(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}").resolve()
    if (block / "partition").exists():
        block = block.parent
    return (block / "dev").read_text().strip()
