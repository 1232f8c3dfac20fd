"""Reading speed of the analysis side, on a synthetic store written by the real writer.

The store has FLUX.1-dev's shape (28 steps, 19 + 38 blocks, 24 heads, a 64×64 grid) with seven
token rows of `txt2img` (six words and the padding): 4.4 GB of float32 maps once decoded, stored
with the default error bound.
Its values are random attention-like probabilities (log-normal, about 1/4096 on average), so they
compress about as real maps do. Measured, each in a fresh interpreter:
- the mean heatmap over all steps, layers and heads of every span (the whole store decoded once;
  the median of MEAN_RUNS): time, decoded MB/s and peak RSS, in a process as the library leaves
  it and in one whose allocator is set as the `attnscope` command sets it;
- the CLI from a cold start (new interpreter, imports included, page cache warm) to the PNG of one
  map (one step, layer, head and span), and to the mean map of one span over everything.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import log, median, peak_rss

WORDS = ("a", "cat", "on", "red", "chair", "photo")
MEAN_RUNS = 3


def write_store(
    path: str,
    steps: int = 28,
    double: int = 19,
    single: int = 38,
    heads: int = 24,
    grid: tuple[int, int] = (64, 64),
    words: tuple[str, ...] = WORDS,
) -> dict[str, Any]:
    """Write the synthetic run with tracer.store + tracer.writer: one row per word, one of
    padding. Fresh interpreter."""
    import numpy as np
    import torch

    from analysis import store_format as fmt
    from tracer.store import create_run
    from tracer.writer import TraceWriter

    layers = [f"transformer_blocks.{i}" for i in range(double)]
    layers += [f"single_transformer_blocks.{i}" for i in range(single)]
    spans = {"prompt": list(range(len(words)))} | {w: [i] for i, w in enumerate(words)}
    rows = [fmt.TokenRow(i, 1, word, "prompt") for i, word in enumerate(words)]
    rows.append(fmt.TokenRow(len(words), 512 - len(words), "<pad>", "prompt", padding=True))
    coords = fmt.run_coords(
        steps=list(range(steps)),
        timesteps=np.linspace(1000, 1000 / steps, steps),
        sigmas=np.linspace(1, 1 / steps, steps),
        layers=layers,
        layer_kinds=["double"] * double + ["single"] * single,
        heads=list(range(heads)),
        tokens=rows,
        grid=grid,
    )
    attrs = {
        fmt.STATUS: fmt.RECORDING,
        fmt.STEPS_COMPLETE: [],
        fmt.SPANS: spans,
        fmt.SPAN_TOKENS: {name: [words[i] for i in idx] for name, idx in spans.items()},
        "prompt": " ".join(words),
        "text_len": 512,
        "error_bound": fmt.relative_error_bound(fmt.DEFAULT_KEEPBITS),
    }
    name, group = create_run(path, coords, attrs, ["txt2img"], fmt.DEFAULT_KEEPBITS)
    n_pixels = grid[0] * grid[1]
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(len(layers), heads, len(rows), n_pixels, generator=generator)
    base = base.mul_(1.5).exp_().div_(n_pixels * float(np.exp(1.5**2 / 2)))
    writer = TraceWriter(group, directions=["txt2img"], n_layers=len(layers))
    start = time.perf_counter()
    for step in range(steps):
        maps = base * (1.0 + 0.01 * step)  # a new tensor per step: put() keeps what it is given
        for layer in range(len(layers)):
            writer.put(step, layer, {"txt2img": maps[layer]})
    writer.close()
    seconds = time.perf_counter() - start
    group.attrs.update({fmt.STATUS: fmt.COMPLETE})
    decoded = steps * base.numel() * 4
    stored = sum(p.stat().st_size for p in (Path(path) / name / "txt2img").rglob("*"))
    log(f"synthetic store: {decoded / 1e9:.2f} GB decoded, written in {seconds:.1f} s")
    return {
        "shape": [steps, len(layers), heads, len(rows), *grid],
        "decoded_bytes": decoded,
        "stored_bytes": stored,
        "write_seconds": seconds,
        "peak_rss": peak_rss(),
    }


def mean_heatmap(path: str, png: str) -> dict[str, Any]:
    """The mean over step, layer and head of every span, then one span drawn. Fresh interpreter.

    Then the same mean where zarr-python reads the maps (a `file://` URL), and for scale the
    same bytes decoded by plain zarr, one step shard per task on as many
    threads as cores, and summed with NumPy: what the codecs alone cost on this machine.
    """
    start = time.perf_counter()
    import analysis

    open_trace = analysis.open_trace  # its module's imports (xarray, dask, zarr) happen here
    imported = time.perf_counter()
    ds = open_trace(path)
    opened = time.perf_counter()
    runs, mean = _span_means(ds)
    computed = time.perf_counter()
    analysis.heatmap(mean.sel(span="prompt"), path=png)
    drawn = time.perf_counter()
    peak = peak_rss()
    # One word's question: its span reads its own token row only.
    word = time.perf_counter()
    ds.txt2img.sel(span="cat").mean(["step", "layer", "head"]).compute()
    word = time.perf_counter() - word
    # Where the time goes: the stored token rows averaged directly (no span views), and the
    # spans without xarray's default NaN skipping.
    rows = time.perf_counter()
    ds.txt2img_tokens.mean(["step", "layer", "head"]).compute()
    rows = time.perf_counter() - rows
    no_skipna = time.perf_counter()
    ds.txt2img.mean(["step", "layer", "head"], skipna=False).compute()
    no_skipna = time.perf_counter() - no_skipna
    # The same mean where zarr-python reads the maps, as for a store behind a URL.
    url = time.perf_counter()
    analysis.open_trace(Path(path).absolute().as_uri()).txt2img.mean(
        ["step", "layer", "head"]
    ).compute()
    url = time.perf_counter() - url

    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import zarr

    array = zarr.open_group(path, path=ds.attrs["run"], mode="r")["txt2img"]

    def step_sum(step: int) -> np.ndarray:
        return array[step].sum(axis=(0, 1), dtype=np.float64)

    decode = time.perf_counter()
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        sum(pool.map(step_sum, range(array.shape[0])))
    decode = time.perf_counter() - decode
    return {
        "decoded_bytes": int(ds.txt2img.nbytes),
        "import_seconds": imported - start,
        "open_seconds": opened - imported,
        "compute_seconds": median(runs),
        "compute_runs": runs,
        "draw_seconds": drawn - computed,
        "span_compute_seconds": word,
        "span_decoded_bytes": int(ds.txt2img.sel(span="cat").nbytes),
        "peak_rss": peak,
        "zarr_decode_seconds": decode,
        "rows_compute_seconds": rows,
        "no_skipna_compute_seconds": no_skipna,
        "url_compute_seconds": url,
    }


def _span_means(ds: Any) -> tuple[list[float], Any]:
    """Seconds of each of MEAN_RUNS means of every span over step, layer and head (the page
    cache warm for all: their median is the figure, the shared cores' load moving it by a tenth
    or more from run to run), and the mean."""
    runs = []
    for _ in range(MEAN_RUNS):
        start = time.perf_counter()
        mean = ds.txt2img.mean(["step", "layer", "head"]).compute()
        runs.append(time.perf_counter() - start)
    return runs, mean


def mean_allocator_tuned(path: str) -> dict[str, Any]:
    """The mean of every span (as `mean_heatmap`) in a process whose allocator is set as the
    `attnscope` command sets it (`analysis.allocator`). Fresh interpreter."""
    from analysis.allocator import reuse_freed_memory

    tuned = reuse_freed_memory()
    import analysis

    runs, _ = _span_means(analysis.open_trace(path))
    return {
        "allocator_tuned": tuned,
        "compute_seconds": median(runs),
        "compute_runs": runs,
        "peak_rss": peak_rss(),
    }


def cli(args: list[str]) -> dict[str, Any]:
    """Wall time and peak RSS of one `attnscope` command in a new interpreter."""
    command = [sys.executable, "-m", "analysis", *args]
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{stderr}")
    return {"seconds": seconds, "peak_rss": usage.ru_maxrss * 1024}


def import_seconds(module: str, after: str = "numpy, zarr") -> float:
    """Seconds a fresh interpreter takes to import `module` once it has imported `after`."""
    script = (
        f"import time, {after}\nstart = time.perf_counter()\nimport {module}\n"
        "print(time.perf_counter() - start)"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return float(out.stdout)


def cli_figures(path: str, workdir: str, repeats: int) -> dict[str, Any]:
    one = [
        "heatmap", path, "--span", "cat", "--step", "0", "--layer", "transformer_blocks.0",
        "--head", "0", "-q", "-o", f"{workdir}/one.png",
    ]  # fmt: skip
    span = ["heatmap", path, "--span", "cat", "-q", "-o", f"{workdir}/span.png"]
    runs = [cli(one) for _ in range(repeats)]
    whole = cli(span)
    floor = [cli(["--help"]) for _ in range(repeats)]
    return {
        "help_seconds": median([r["seconds"] for r in floor]),
        "one_map_seconds": median([r["seconds"] for r in runs]),
        "one_map_runs": [r["seconds"] for r in runs],
        "one_map_peak_rss": max(r["peak_rss"] for r in runs),
        "figures_import_seconds": median(
            [import_seconds("analysis.cli.figures", after="sys") for _ in runs]
        ),
        "tensorstore_import_seconds": median([import_seconds("tensorstore") for _ in runs]),
        "span_mean_seconds": whole["seconds"],
        "span_mean_peak_rss": whole["peak_rss"],
        "commands": {
            name: "attnscope " + " ".join(args).replace(path, "STORE").replace(workdir, ".")
            for name, args in (("one_map", one), ("span_mean", span))
        },
    }
