"""Out of core: a store several times larger than a memory limit reduces to a heatmap under it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import zarr

from analysis import store_format as sf

REPO = Path(__file__).resolve().parents[2]
LIMIT_BYTES = 400 * 2**20
STEPS, LAYERS, HEADS, SPANS, GRID = 45, 24, 24, 4, (64, 64)  # FLUX-sized maps
DISTINCT = 3  # steps written through zarr; the others are byte copies of their shards

CHILD = """
import json, sys
import dask
dask.config.set(scheduler="threads", num_workers=2)
import analysis
ds = analysis.open_trace(sys.argv[1])
m = ds.txt2img.mean(["step", "layer", "head", "span"])
fig = analysis.heatmap(m, path=sys.argv[2])
drawn = fig.axes[0].collections[0].get_array()
# VmHWM, not ru_maxrss: a child inherits its parent's ru_maxrss (a torch-laden test worker).
status = open("/proc/self/status").read()
peak = int(status.split("VmHWM:")[1].split()[0]) * 1024  # kB
print(json.dumps({"peak": peak, "drawn": drawn.tolist()}))
"""


def base_map() -> np.ndarray:
    yy, xx = np.meshgrid(np.arange(GRID[0]), np.arange(GRID[1]), indexing="ij")
    return (np.exp(-((yy - 20) ** 2 + (xx - 40) ** 2) / 200.0) + 0.01).astype(np.float32)


def write_large_store(path: Path) -> np.ndarray:
    """A lossless txt2img store of 1.7 GB decoded; returns the expected mean map."""
    steps = list(range(STEPS))
    coords = sf.run_coords(
        steps=steps,
        timesteps=[1000.0 - 20 * s for s in steps],
        sigmas=[1.0 - s / STEPS for s in steps],
        layers=[f"transformer_blocks.{i}" for i in range(LAYERS)],
        layer_kinds=["double"] * LAYERS,
        heads=list(range(HEADS)),
        tokens=[sf.TokenRow(i, 1, f"word{i}", "prompt") for i in range(SPANS)],
        grid=GRID,
    )
    ds, encoding = sf.run_skeleton(coords, {}, directions=("txt2img",), keepbits=None)
    root = zarr.open_group(path, mode="w")
    root.attrs[sf.FORMAT_ATTR] = sf.FORMAT_VERSION
    ds.to_zarr(path, group="run-0000", encoding=encoding, compute=False, consolidated=False)
    group = zarr.open_group(path, path="run-0000", mode="r+")
    scale = np.random.default_rng(0).uniform(0.5, 1.5, size=(DISTINCT, LAYERS, SPANS))
    f = base_map()
    chunk_dir = path / "run-0000" / "txt2img" / "c"
    shards = []
    for step in range(DISTINCT):
        maps = scale[step][:, None, :, None, None].astype(np.float32) * f
        group["txt2img"][step] = np.broadcast_to(maps, (LAYERS, HEADS, SPANS, *GRID))
        (shard,) = [p for p in (chunk_dir / str(step)).rglob("*") if p.is_file()]
        shards.append(shard)
    for step in range(DISTINCT, STEPS):
        source = shards[step % DISTINCT]
        target = chunk_dir / str(step) / source.relative_to(chunk_dir / str(step % DISTINCT))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    group.attrs.update(
        {
            sf.STATUS: sf.COMPLETE,
            sf.STEPS_COMPLETE: steps,
            sf.TEXT_LEN: SPANS,
            sf.SPANS: {f"word{i}": [i] for i in range(SPANS)},
        }
    )
    per_step = scale.astype(np.float32).astype(np.float64).mean(axis=(1, 2))
    weights = np.bincount(np.arange(STEPS) % DISTINCT, minlength=DISTINCT)
    return f * (per_step @ weights / STEPS)


def test_a_store_four_times_the_memory_limit_reduces_under_it(tmp_path):
    path = tmp_path / "large.zarr"
    expected = write_large_store(path)
    decoded = STEPS * LAYERS * HEADS * SPANS * GRID[0] * GRID[1] * 4
    assert decoded >= 4 * LIMIT_BYTES
    env = dict(os.environ, PYTHONPATH=str(REPO), MPLBACKEND="Agg")
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(tmp_path / "large.png")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["peak"] < LIMIT_BYTES, f"peak RSS {report['peak'] / 2**20:.0f} MiB"
    drawn = np.asarray(report["drawn"]).reshape(GRID)
    np.testing.assert_allclose(drawn, expected, rtol=1e-5)
