"""The prose of docs/benchmarks.md around the numbers: what limits each figure, and the method."""

from __future__ import annotations

import math
from typing import Any

from bench.summary import TARGETS, bytes_per_value, growth_summary, memory_summary


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def limits(r: dict[str, Any]) -> str:
    main = "quick" if r["quick"] else "flux-cpu"
    parts = ["## What limits each figure"]
    parts.append(_overhead(r, main))
    parts.append(_gpu(r))
    parts.append(_memory(r, main))
    parts.append(_store(r, main))
    parts.append(_analysis(r))
    return "\n\n".join(parts)


def _overhead(r: dict[str, Any], main: str) -> str:
    over = r["overhead"][main]
    ratio = over["ratio"]["attnscope"]
    untraced = over["median_wall"]["untraced"]
    b = over.get("breakdown") or {}
    calls = (over["geometry"]["num_layers"] + over["geometry"]["num_single_layers"]) * over[
        "geometry"
    ]["steps"]
    text = [
        f"**Tracing overhead ({main}: {ratio:.3f}; the floor is 1).** The model's own kernels "
        "run unchanged; what a traced generation adds is, measured in one instrumented run "
        f"(untraced median {untraced:.2f} s):",
        f"- the capture math: {b.get('capture', math.nan):.2f} s for {calls} attention calls "
        f"({1000 * b.get('capture', math.nan) / calls:.0f} ms each), on the generation's "
        "thread. With the kernel's log-sum-exp it is a few GEMMs: txt2img, every text query "
        "(each token row's, the padding's included) against all keys; img2txt, all image "
        "queries against the text keys, summed per row; on the model's own threads (one "
        "thread for a tiny call, where OpenMP's barriers would cost more than its ops)"
        + (
            f" (the model's own attention calls took {b['attention_device']:.2f} s in the "
            "same run);"
            if "attention_device" in b
            else ";"
        ),
        f"- starting the run: {b.get('start_run', math.nan):.3f} s once per run, on the "
        "generation's thread (claiming its name, starting the writer). The writer's thread "
        f"lays the run group down during the first step ({b.get('lay_down', math.nan):.3f} s: "
        "a dozen small Zarr objects, metadata and coordinates), so that overlaps the model; on "
        "these two shared cores it still takes CPU time from it;",
        f"- the writer's compression and writes: {b.get('writer_step', math.nan):.2f} s of "
        "thread time in all, beside the generation, of which the last step's write is "
        "waited for at the end (a step is durable when the call returns). Its threads fill "
        "and round the host buffers with NumPy, never torch: a torch op on another thread "
        "starts an OpenMP team of that thread's own, and while it lived the model's own team "
        "was throttled (libgomp, with more threads than cores, puts idle workers to sleep at "
        "once, so every parallel region waits for a wake-up): every denoiser call was a third "
        "slower for the rest of the run, recorded or not (tiny Wan 1.79 → 1.21, tiny "
        "CogVideoX 1.57 → 1.26, FLUX at the families' small geometry 2.07 → 1.73).",
    ]
    if b:
        added = b.get("capture", 0.0) + b.get("start_run", 0.0)
        walls = over["ratios"]["attnscope"]["wall"]
        text.append(
            f"The work on the generation's thread (capture, starting the run) is {added:.2f} s, "
            f"{added / untraced:.1%} of the untraced time; the pairs' ratios ranged "
            f"{min(walls):.2f} to {max(walls):.2f} with the load of other jobs on the cores, and "
            f"the CPU-time ratio, less sensitive to it, is {over['cpu_ratio']['attnscope']:.3f}."
        )
    recompute = over["ratio"].get("attnscope-recompute")
    if recompute is not None:
        text.append(
            f"Before this change img2txt re-ran a fused attention over all keys for the image "
            f"queries (V = span indicators) to get each row's normaliser: {recompute:.3f} here, "
            "the same QKᵀ work as the model's own attention once more. The tap now runs the "
            "model's call through the very aten kernel SDPA picks when that kernel returns the "
            "log-sum-exp (CPU flash; CUDA flash, memory-efficient and cuDNN, each checked "
            "bit-identical once per call signature), so the output is the same tensor and "
            "img2txt is `exp(q·kᵀ·scale + mask − lse)` over the span keys only. The math "
            "kernel, dropout, causal, GQA and autograd calls fall back to the old path "
            "(`tracer.trace(..., lse='recompute')` forces it)."
        )
    if r["overhead"].get("quick") and main != "quick":
        q = r["overhead"]["quick"]
        text.append(
            f"The quick geometry's ratio ({q['ratio']['attnscope']:.2f}) is not an overhead "
            f"figure: its generation takes {q['median_wall']['untraced']:.2f} s, so the fixed "
            "cost of creating the run group and writing its last step dominates, and at that "
            "size timings are at the mercy of the other jobs on the cores."
        )
    return "\n".join(text)


def _gpu(r: dict[str, Any]) -> str:
    gpu = r["overhead"].get("flux-dev-gpu")
    if gpu:
        b = gpu.get("breakdown") or {}
        text = (
            f"**GPU ({gpu['ratio']['attnscope']:.3f} at FLUX.1-dev's shape).** Measured on "
            f"{r['machine'].get('gpu')}; the lse kernels used are checked once per call "
            "signature against SDPA's own output (one extra attention per run)."
        )
        if "capture_device" in b:
            text += (
                f" In the instrumented traced run the capture kept the GPU busy "
                f"{b['capture_device']:.2f} s and the model's attention calls "
                f"{b['attention_device']:.2f} s, of {b['wall']:.2f} s (CUDA events)."
            )
        return text + "\n\n" + _capture_counted()
    if r.get("gpu_box"):
        return _gpu_box(r["gpu_box"]) + "\n\n" + _capture_counted()
    return (
        "**GPU at FLUX.1-dev's shape: not measured here** (no CUDA device on this machine; "
        "`python -m bench` runs it whenever `torch.cuda.is_available()`, and `python -m "
        "bench.gpu` is the prepared script for a bare GPU box: it carries its wheels, see its "
        "docstring). On CUDA the tap takes "
        "the flash, memory-efficient or cuDNN kernel's lse (cuDNN's is what FLUX's unmasked "
        "bf16 attention gets on an H200 under torch 2.11), verified bit-identical against "
        "SDPA's own output once per call signature; the device-to-host copy of the "
        "maps is asynchronous into pinned buffers. A process's first run also pins its step "
        "buffers (2.3 GB, on a writer thread from the run's start, while put() waits for the "
        "first) and faults zarrs' working memory in while its first steps are written, which "
        "*Writer rate against a GPU* measures as its warm-up and projects.\n\n" + _capture_counted()
    )


def _gpu_box(box: dict[str, Any]) -> str:
    """The figures of `python -m bench.gpu` on a GPU box, filed by `python -m bench gpu`."""
    wall, b = box["median_wall"], box["breakdown"]
    ratio, target = box["traced_over_untraced"], TARGETS["overhead_gpu"]
    text = (
        f"**GPU at FLUX.1-dev's shape: {ratio:.2f} on an {box['device']} "
        f"({'met' if ratio <= target else 'missed'}; target {target:.2f}).** "
        "`python -m bench.gpu` at "
        f"{box['at']}, 28 steps at 1024² with the {box['token_rows']} token rows of its "
        "20-word prompt under the demo's in-process tokenizer, default settings: untraced "
        f"{wall['untraced']:.2f} s, traced {wall['attnscope']:.2f} s (a process's first traced "
        f"run {box['traced_over_untraced_first_run']:.2f}, a later one "
        f"{box['traced_over_untraced_later_run']:.2f}). A traced generation wrote "
        f"{box['bytes_written'] / 1e9:.1f} GB ({box['decoded_bytes'] / 1e9:.1f} GB decoded) at "
        f"{box['decoded_gb_s']:.2f} GB/s decoded and added "
        f"{box['gpu_memory_added_bytes'] / 1e6:.0f} MB of GPU memory. In the instrumented "
        f"traced run ({b['wall']:.1f} s) put() held the generation {b['writer_put']:.1f} s "
        "waiting for the writer (its backpressure), the capture kept the GPU busy "
        f"{b['capture_device']:.2f} s and the model's attention {b['attention_device']:.2f} s "
        f"(CUDA events). Every traced call took its normalisers from the kernel "
        f"({box['lse_used']['kernel']:,} calls, {box['lse_used']['recompute']} recomputed)"
    )
    text += _gpu_call(box["capture_per_call"])
    text += (
        f". The suite's CUDA tests there: {box['cuda_tests']['summary']}. Pinning host memory "
        f"afresh took {box['pinning_seconds_per_gib']:.2f} s per GiB"
    )
    if box.get("pinned_at_size") is False and "pinning_registered" in box:
        text += (
            " (its torch pins every block at a power of two: no `pinned_max_round_threshold_mb`)"
        )
    registered = box.get("pinning_registered")
    if registered is not None and "error" in registered:
        text += f"; with its pages registered instead, refused there: {registered['error']}"
    elif registered is not None:
        text += (
            f", {registered['seconds_per_gib']:.2f} s with its pages faulted in by "
            f"{registered['threads']} threads and registered (PyTorch's "
            "`pinned_use_cuda_host_register`)"
        )
    text += "."
    if box.get("copy_off_gb_s") is not None:
        text += (
            f" A device->host copy into pinned memory, on a stream of its own as the writer's, "
            f"ran at {box['copy_off_gb_s']:.1f} GB/s."
        )
    if "host" in box:
        cores_busy = box["median_cpu"]["attnscope"] / wall["attnscope"]
        deep = box["deeper_writer"]
        text += (
            f" The host: {box['host']['cores']} cores, its disk syncing "
            f"{box['host']['disk_sync_mb_s']:,.0f} MB/s; a traced run kept {cores_busy:.1f} of "
            f"them busy ({bytes_per_value(box):.2f} bytes per value on disk). With "
            f"{deep['max_pending_steps']} steps in flight instead of 2: "
            f"{deep['traced_over_untraced']:.2f}."
        )
        if "keepbits_9" in box:
            nine_bits = box["keepbits_9"]
            text += (
                f" Keeping 9 mantissa bits instead of the default's {box['keepbits']} "
                f"(`--keepbits 9`): {nine_bits['traced_over_untraced']:.2f}, "
                f"{nine_bits['bytes_written'] / 1e9:.1f} GB written "
                f"({nine_bits['bytes_per_value']:.2f} bytes per value)."
            )
        if "unsynced" in box:
            text += (
                f" With fsync off (`--no-fsync`, its steps left in the page cache): "
                f"{box['unsynced']['traced_over_untraced']:.2f}."
            )
        if "disk_sync_mb_s_4_files" in box["host"]:
            text += (
                f" Four files written side by side in 64 MiB writes, as the writer's shards are, "
                f"synced {box['host']['disk_sync_mb_s_4_files']:,.0f} MB/s."
            )
    if "writer_alone" in box:
        from bench.rate import H100_STEP_SECONDS

        alone = box["writer_alone"]
        runs = ", ".join(
            f"{label} {run['decoded_mb_s']:,.0f} MB/s" for label, run in alone["runs"].items()
        )
        text += (
            f" The writer alone on the host's {alone['cores']} cores ({alone['steps']} steps of "
            f"{alone['step_bytes'] / 1e9:.2f} GB decoded, bench.rate's feed of real maps), "
            f"decoded: {runs}; an H100's step needs "
            f"{alone['step_bytes'] / H100_STEP_SECONDS / 1e6:,.0f} MB/s."
        )
    estimate = box.get("estimate")
    if estimate is not None and estimate["write_rate"] is not None:
        text += (
            f" `record --estimate`'s probe of the writer there sustained "
            f"{estimate['write_rate'] / 1e9:.2f} GB/s decoded: at the untraced generation's "
            f"{estimate['step_seconds']:.3f} s a step it predicted at least "
            f"{estimate['write_ratio']:.2f}."
        )
    elif estimate is not None:
        text += f" `record --estimate` could not probe the writer there: {estimate['write_error']}."
    if "malloc_arenas" in box:
        text += (
            f" The allocator's settings (analysis.allocator) "
            f"{'held' if box['allocator_tuned'] else 'did not hold'}: "
            f"{box['malloc_arenas']} malloc arena(s) after the runs, "
            f"{box['page_faults_per_gb_decoded']:,.0f} page faults per decoded GB in a traced "
            f"run (each GB copied into memory faulted in afresh costs about 244,000)."
        )
    return text


def _gpu_call(call: dict[str, Any]) -> str:
    """One traced call at the GPU box's shape (bench/capture_cost.py), as measured there."""
    if "error" in call:
        return f"; measuring one call's capture failed there: {call['error']}"
    chunk = call["chunks"][max(call["chunks"], key=int)]
    text = (
        f": `{call['kernel']}`, its output bit-identical to SDPA's. One call's capture took "
        f"{1e3 * chunk['seconds']:.2f} ms of GPU time (the largest chunks), the model's "
        f"attention {1e3 * call['attention_seconds']:.2f} ms"
    )
    gemm = call.get("gemm", {})
    if "out_dtype_seconds" in gemm:
        text += (
            f"; its GEMM {1e3 * gemm['float32_seconds']:.3f} ms in float32 against "
            f"{1e3 * gemm['out_dtype_seconds']:.3f} ms from bf16 inputs with a float32 output "
            f"(largest difference {gemm['out_dtype_max_abs_error']:.1e} on logits up to "
            f"{gemm['logit_scale']:.0f})"
        )
    for way, label in (("blocks", "from blocks"), ("fused", "from fused kernels")):
        figure = call.get("padding_row", {}).get(way, {})
        if "seconds" in figure:
            text += (
                f"; the capture with the padding row {label} {1e3 * figure['seconds']:.3f} ms, "
                f"largest error {figure['max_relative_error']:.1e} against float64"
            )
        elif "error" in figure:
            text += f"; the padding row {label} failed there: {figure['error']}"
    return text


def _capture_counted() -> str:
    """The capture's work at FLUX.1-dev's shape, counted, against an H100's peak rates."""
    from bench.capture_cost import ROWS, work
    from bench.common import GEOMETRIES
    from bench.rate import H100_STEP_SECONDS

    geo = GEOMETRIES["flux-dev-gpu"]
    w = work(geo)
    calls = geo.num_layers + geo.num_single_layers
    # NVIDIA's H100 SXM datasheet: FP32 67 TFLOP/s, BF16 dense 989 TFLOP/s, HBM3 3.35 TB/s.
    fp32, bf16, memory = 67e12, 989e12, 3.35e12
    passes = 6  # each block: the GEMM's broadcast input and its output, exp, the span reduction
    arithmetic = calls * w["capture_flop"] / fp32
    traffic = calls * passes * w["block_bytes"] / memory
    return (
        "**The capture on a GPU, counted.** With the kernel's lse, a call's capture is two "
        "float32 GEMMs, every text position against the image positions (txt2img: text "
        "queries against image keys; img2txt: image queries against text keys), reduced to "
        f"token rows. A 20-word prompt has {ROWS} rows but {geo.text_len} text positions, each "
        f"some row's: the padding's {geo.text_len - ROWS + 1} are summed into one. At "
        f"FLUX.1-dev's shape that is {w['capture_flop'] / 1e9:.1f} GFLOP in float32 per call "
        f"against the model's attention's {w['attention_flop'] / 1e9:.0f} GFLOP in bf16, and "
        f"about {passes} passes over {w['block_bytes'] / 1e6:.0f} MB of float32 probability "
        f"blocks (the GEMM's broadcast input and output, exp, the span reduction). At an H100 "
        "SXM's peak rates (NVIDIA's datasheet: 67 TFLOP/s float32 without tensor cores, 989 "
        f"bf16 with, 3.35 TB/s), a step's {calls} calls take at least "
        f"{1e3 * arithmetic:.0f} ms of float32 arithmetic and about {1e3 * traffic:.0f} ms "
        f"of memory traffic, against {1e3 * calls * w['attention_flop'] / bf16:.0f} ms for the "
        f"model's attention and about {1e3 * H100_STEP_SECONDS:.0f} ms for the whole step: on "
        "a GPU the capture, "
        "not only the writer, may decide the ratio. `python -m bench.gpu` measures it "
        "(`capture_per_call`: the GPU time of one call per chunk size against the attention's, "
        "its error against float64, and its GEMM in float32 against bf16 inputs on tensor "
        "cores with a float32 output, whose products are exact in float32). The GEMMs run so "
        "where torch has such GEMMs (CUDA, torch ≥ 2.8); what is left is the blocks' memory "
        "traffic. On CUDA the padding's row now takes no block: its maps are log-sum-exps over "
        "its positions from two fused attention calls (tracer.capture's fused spans), so the "
        f"blocks are of {ROWS - 1} positions, not {geo.text_len}; `capture_per_call` "
        "measures the capture both ways (`padding_row`)."
    )


def _memory(r: dict[str, Any], main: str) -> str:
    mem = memory_summary(r)
    extra = mem["attnscope"]["extra"]
    shape = r["store"][main]["directions"]["txt2img"]["shape"]
    per_step = math.prod(shape[1:]) * 4
    pool = 2 * 2 * per_step  # max_pending_steps (2) x directions (2)
    growth = growth_summary(r)
    text = (
        f"**Extra memory ({_mib(extra)}, {mem['attnscope']['extra_fraction']:+.1%}).** The "
        "tracer's own memory is bounded by design: the writer's pool of host buffers, 2 "
        f"pending steps × 2 directions × one step's maps ({_mib(per_step)}) = {_mib(pool)}; "
        "the maps handed over and not yet copied (as much again at most); the capture's blocks "
        "(at most H × chunk_size × N floats, far less on the lse path); Zarr's encoding "
        "buffers for one step; the writer's threads. None of it depends on the number of "
        f"steps: {_mib(growth[2])} at 2 steps and {_mib(growth[8])} at 8 on "
        f"{r['growth']['geometry']['name']}. The seed method needs "
        f"{_mib(mem['seed']['extra'])} more than the untraced run, for its materialised "
        "N × N maps."
    )
    default = memory_summary(r, "default")
    if default:
        spread = max(default["untraced"]["peaks"]) - min(default["untraced"]["peaks"])
        text += (
            "\n\nWith glibc's default mmap threshold the extra reads "
            f"{_mib(default['attnscope']['extra'])} "
            f"({default['attnscope']['extra_fraction']:+.1%}), but that figure is mostly the "
            "allocator's: two identical untraced processes peaked "
            f"{_mib(spread)} apart here, and the untraced run's own peak is "
            f"{_mib(default['untraced']['peak'] - mem['untraced']['peak'])} higher than with "
            "the threshold fixed. glibc raises its threshold to the size of each large block "
            "freed (up to 32 MiB); the model's activations then come from the heap and stay "
            "there in fragments, by an amount that depends on the order of allocations, which "
            "the writer's threads change. A deployment that cares can fix the threshold "
            "(`MALLOC_MMAP_THRESHOLD_=1048576`)"
            + (
                ": the traced run then peaks lower than the untraced one does by default."
                if mem["attnscope"]["peak"] < default["untraced"]["peak"]
                else "."
            )
        )
    return text


def _store(r: dict[str, Any], main: str) -> str:
    s = r["store"][main]
    lines = [
        f"**Store size.** Bit rounding keeps {s['keepbits']} mantissa bits (relative error "
        f"≤ {s['error_bound']:.2e}; measured maxima are in the table above), then bit-shuffled "
        "LZ4 packs what is left. Per value, the limit for these values if their kept mantissa "
        "bits are incompressible is the entropy of the exponent plus the kept bits:"
    ]
    for name, d in s["directions"].items():
        lines.append(
            f"- `{name}`: {d['bytes_per_value']:.2f} B stored against "
            f"{d['entropy_bytes_per_value']:.2f} B for that limit "
            f"({d['bytes_per_value'] / d['entropy_bytes_per_value'] - 1:+.0%}); lossless "
            f"storage takes {d['lossless_bytes_per_value']:.2f} B."
        )
    lines.append(
        "Going further needs fewer kept bits (`keepbits=`, a stated error bound) or a "
        "transform that uses the maps' spatial smoothness, which a byte-level coder does not "
        "see."
    )
    out = r["overhead"].get(main, {}).get("outputs", {})
    if all(v in out for v in ("attnscope", "seed", "amd")):
        ours = out["attnscope"]["bytes"]
        lines.append(
            f"The baselines keep each text token's own map, raw: the seed method wrote "
            f"{out['seed']['bytes'] / ours:,.0f}× and attention-map-diffusers "
            f"{out['amd']['bytes'] / ours:,.0f}× attnscope's bytes for the same generation "
            "(the latter for its double-stream blocks only)."
        )
    return "\n".join(lines)


def _analysis(r: dict[str, Any]) -> str:
    a = r["analysis"]
    m, c = a["mean"], a["cli"]
    rate = m["decoded_bytes"] / m["compute_seconds"] / 1e6
    decode = m["decoded_bytes"] / m["zarr_decode_seconds"] / 1e6
    where = ""
    tuned = a.get("mean_tuned")
    if tuned:
        where += (
            "In a process whose allocator is set as the `attnscope` command sets it "
            "(`analysis.allocator`: one arena, no mmap'd blocks, no trimming) the same mean runs "
            f"at {m['decoded_bytes'] / tuned['compute_seconds'] / 1e6:,.0f} MB/s with a peak RSS "
            f"of {tuned['peak_rss'] / 1e6:,.0f} MB: glibc otherwise serves every chunk's "
            "buffers (the decoded chunk, dask's NaN-skipping copy of it) with fresh pages and "
            "hands them back when they are freed, so each chunk faults its memory in again, and "
            "it gives each of dask's threads an arena of its own, which holds memory the "
            "others cannot reuse. A notebook's process is the user's: the library leaves it "
            "as it is, and `analysis.allocator.reuse_freed_memory()` sets it. "
        )
    if "rows_compute_seconds" in m:
        rows = m["decoded_bytes"] / m["rows_compute_seconds"] / 1e6
        no_skipna = m["decoded_bytes"] / m["no_skipna_compute_seconds"] / 1e6
        where += (
            "A local store's maps are read through TensorStore, which decodes chunks outside "
            "the GIL (dask's threads read side by side, and TensorStore decodes on as many threads "
            "as dask has workers) and checks each chunk's CRC32C. What is left is "
            "mostly the reduction asked for: on float maps xarray's `.mean()` skips NaN by "
            "default, and dask's NaN-skipping mean copies each chunk and builds its NaN mask "
            "twice; and the span views: each token row a span holds is read as an array of its "
            "own (the padding row, which no span holds, is not read), the six words' spans are "
            "joined along `span`, and the prompt's span sums their rows in float64 first. In "
            "the same run the stored token "
            f"rows (`txt2img_tokens`, no span views) average at {rows:,.0f} MB/s, and the spans "
            f"with `skipna=False` at {no_skipna:,.0f} MB/s. "
        )
        if "url_compute_seconds" in m:
            url = m["decoded_bytes"] / m["url_compute_seconds"] / 1e6
            where += (
                f"Through a `file://` URL, where zarr-python's own pipeline reads the maps (as "
                f"for a bucket), the mean runs at {url:,.0f} MB/s: it decodes a shard's chunks "
                "one at a time under asyncio, with a thread hand-off per chunk. "
            )
    return (
        f"**Analysis ({rate:,.0f} MB/s, peak RSS {m['peak_rss'] / 1e6:,.0f} MB).** {where}"
        "Plain zarr with its own codec pipeline, decoding the "
        "same store one step shard per thread (as many threads as cores) and summing with "
        f"NumPy, runs at {decode:,.0f} MB/s on this machine; open_trace's dask graph runs at "
        f"{rate / decode:.2f}× that. Memory stays flat because each dask task "
        "holds a chunk of 24 MiB at most (a span's token row: a step's 57 layers here) and "
        "the mean is accumulated chunk by chunk.\n\n"
        f"**Time to first heatmap ({c['one_map_seconds']:.2f} s).** Reading one map is a few "
        f"milliseconds. A cold interpreter that starts the CLI and exits takes "
        f"{c['help_seconds']:.2f} s; importing the figure verbs' libraries (xarray, dask, zarr, "
        f"matplotlib, seaborn) takes {c['figures_import_seconds']:.2f} s; opening the store's "
        "metadata, reading and drawing take the rest. With `--span cat` the run is opened "
        "with that span alone, whose token row is a dask array of its own: dask fuses the "
        "selection into its read, so the one stored chunk of the map is read, through "
        "zarr-python. A view of several spans (the default, the prompt's) reads that step's "
        "chunks of its rows whole, through TensorStore, whose import takes "
        f"{c['tensorstore_import_seconds']:.2f} s (ml_dtypes 0.7.0, which it imports, took "
        "0.7 s to register its NumPy loops here, against 5 ms for 0.6.0: pyproject.toml "
        "excludes that version)."
    )


def method(r: dict[str, Any]) -> str:
    return "\n".join(
        [
            "## How it is measured",
            "",
            "- Model: `tracer.demo.demo_pipeline` (the real diffusers `FluxPipeline` and "
            "`FluxTransformer2DModel` classes, random weights, tiny text encoders and VAE) at "
            "the geometry named; prompt `a cat on a red chair`, seed 0, latents out (no VAE "
            "decode), the same call for every variant. attnscope records its defaults: every "
            "layer, head and step, both directions, one row per text token (the padding "
            "summed in one), compressed to disk.",
            "- Timing: one process per geometry builds the model once and runs a warm-up "
            "generation. Each figure is a pair: an untraced generation next to a recorded one "
            "(order alternating), its ratio their quotient; recorders' pairs are interleaved; "
            "tables give medians over pairs and every pair's ratio. Recording time includes "
            "saving: attnscope's writer finishes before the pipeline call returns, the seed "
            "method saves inside the call, attention-map-diffusers computes and saves after it. "
            "CPU-time ratios (all threads of the process) are shown beside wall-time ones.",
            "- Memory: one fresh process per run imports the same libraries, builds the model "
            "and runs one generation; the figure is the kernel's peak-RSS high-water mark "
            "(`ru_maxrss`), and extra memory is the difference from the untraced process at the "
            "same number of steps. These processes run with glibc's mmap threshold fixed at "
            "1 MiB (`MALLOC_MMAP_THRESHOLD_=1048576`): with its default sliding threshold the "
            "peak of one and the same untraced run varies by a few hundred MiB between "
            "processes (heap fragmentation), more than the quantity measured; with it fixed, "
            "repeated runs agree within 1 MiB. Figures with the default allocator are given "
            "too. On CUDA: `torch.cuda.max_memory_allocated`.",
            "- Store: one generation traced at the default error bound and losslessly; bytes "
            "are the stored shards of each variable, errors are relative to the lossless "
            "values (zeros stay exact zeros).",
            "- Analysis: the synthetic store is written by `tracer.store.create_run` and "
            "`tracer.writer.TraceWriter`; each measurement runs in a fresh interpreter with the "
            "page cache warm (the store was just written or read). MB/s counts decoded float32 "
            "bytes.",
            "- The orchestrating process (`python -m bench`) never imports torch, so it does not "
            "compete for the cores or lend its memory to a child's peak RSS.",
        ]
    )
