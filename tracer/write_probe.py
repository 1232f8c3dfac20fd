"""How fast this host's writer takes steps of a recording's shape: a short recording of its own.

The estimate (tracer.estimate) asks it before anything is generated. The probe runs the real
writer as a recording would (the maps on the model's device, rounded there, the same fsync and
steps in flight) into a throwaway store beside the one asked for, so the figure is the host's
cores and disk together. The maps are synthetic, softmax rows of Gaussian logits: they store
about as many bytes per value as a real recording's maps (1.45 against 1.42 at keepbits 7, with
the format's LZ4 and bit-shuffle; tests/tracer/test_write_probe.py holds it to 10%), so they cost
the encoder about as much.
"""

from __future__ import annotations

import math
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from analysis import store_format as fmt
from tracer.store import claim_run, lay_down_run
from tracer.writer import RunPlan, TraceWriter

# A probe step holds at most this many decoded bytes (its layers capped), so the probe takes a
# few seconds at most (2-5 s on two cores at FLUX.1-dev's shape); a step's layers are alike.
STEP_BYTES = 256 * 2**20
STEPS = 4  # steps timed beyond a one-step store's, once the buffers are warm


def writer_rate(
    folder: Path,
    *,
    layers: int,
    heads: int,
    rows: int,
    grid: tuple[int, ...],
    directions: Sequence[str],
    keepbits: int | None,
    device: torch.device | str = "cpu",
    fsync: bool = True,
    max_pending_steps: int = 2,
) -> float:
    """Decoded bytes per second the writer sustained on steps of `heads` × `rows` × `grid` maps
    per layer, fed as fast as it took them: up to `layers` layers a step (fewer where a step would
    pass STEP_BYTES), into stores in `folder` that are removed again.

    Sustained: the time a store of 1 + STEPS steps took beyond a one-step store's, so what every
    store pays once (laying the run down, the last step's flush) is left out, as it is from a
    long recording's steps; both after a first store of 1 + STEPS steps has warmed up the
    memory they take (a process's first recording faults it in as it goes)."""
    cells = math.prod(grid)
    layer_bytes = heads * rows * cells * 4 * len(directions)
    n_layers = max(1, min(layers, STEP_BYTES // layer_bytes))
    maps = synthetic_maps(heads, rows, cells, device)
    n_steps = 1 + STEPS
    tokens = [fmt.TokenRow(i, 1, f"t{i}", "prompt") for i in range(rows)]
    coords = synthetic_coords(n_steps, n_layers, heads, tokens, grid)
    workdir = folder / f"write-probe.{uuid.uuid4().hex}.partial"
    workdir.mkdir()
    try:
        options = {
            "directions": directions,
            "keepbits": keepbits,
            "fsync": fsync,
            "max_pending_steps": max_pending_steps,
        }
        seconds = []
        # The first store warms up the memory the others take (buffers, and the page cache
        # without fsync); each is removed once timed, so the next reuses its memory.
        for i, steps in enumerate((n_steps, 1, n_steps)):
            store = workdir / f"{i}.zarr"
            seconds.append(_record(store, coords, maps, steps, **options))
            shutil.rmtree(store, ignore_errors=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    one, more = seconds[1:]
    # Timings this short can cross over on a busy host: then the whole store's rate, lower.
    extra = more - one if more > one else more / n_steps * STEPS
    return STEPS * n_layers * layer_bytes / extra


def synthetic_maps(
    heads: int, rows: int, cells: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """One layer's `[heads, rows, cells]` float32 maps like attention's: each row a softmax of
    Gaussian logits over the cells (seeded, the same every call)."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(heads, rows, cells, generator=generator)
    return torch.softmax(logits, dim=-1).to(device)


def synthetic_coords(
    steps: int, layers: int, heads: int, tokens: Sequence[fmt.TokenRow], grid: tuple[int, ...]
) -> dict[str, Any]:
    """The coordinates of a run of this many steps, layers (all `double`) and heads, of these
    token rows on this latent grid, with made-up names and timesteps."""
    return fmt.run_coords(
        steps=list(range(steps)),
        timesteps=np.linspace(1000.0, 1000.0 / steps, steps),
        sigmas=np.linspace(1.0, 1.0 / steps, steps),
        layers=[f"layer.{i}" for i in range(layers)],
        layer_kinds=["double"] * layers,
        heads=list(range(heads)),
        tokens=tokens,
        grid=tuple(grid),
    )


def _record(
    store: Path,
    coords: dict[str, Any],
    maps: torch.Tensor,
    steps: int,
    *,
    directions: Sequence[str],
    keepbits: int | None,
    fsync: bool,
    max_pending_steps: int,
) -> float:
    """Seconds `steps` steps of `maps` at every layer of `coords` took through a writer into a
    new store, from its first put() until close() returned."""
    name = claim_run(str(store))
    attrs = {fmt.STATUS: fmt.RECORDING, fmt.STEPS_COMPLETE: []}

    def lay_down() -> zarr.Group:
        return lay_down_run(str(store), name, coords, attrs, directions, keepbits)

    n_layers = len(coords["layer"])
    writer = TraceWriter(
        RunPlan(coords, keepbits, lay_down),
        directions=list(directions),
        n_layers=n_layers,
        max_pending=max_pending_steps,
        fsync=fsync,
    )
    start = time.perf_counter()
    try:
        for step in range(steps):
            for layer in range(n_layers):
                writer.put(step, layer, dict.fromkeys(directions, maps))
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return time.perf_counter() - start
