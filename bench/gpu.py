"""`python -m bench.gpu`: FLUX.1-dev's transformer on a GPU, untraced against traced.

Builds a full-shape random-weight `FluxTransformer2DModel` from FLUX.1-dev's configuration (19
double and 38 single blocks, 24 heads of 128) on the device, in bf16, with no download, inside
the demo pipeline (tiny random text encoders and VAE; the prompt is 20 words). Then times 28
steps at 1024², latents out, untraced and traced with default settings (the allocator set as
`attnscope record` sets it, analysis.allocator), as two pairs (bench.overhead), and writes:
traced / untraced wall time (the process's first traced run and a later one apart, and one more
pair with half the host's cores' steps in flight: `deeper_writer`, and one keeping 9 mantissa
bits where the bf16 model's default keeps 7: `keepbits_9`, and one with fsync off, its steps
left in the page cache: `unsynced`), the GPU memory tracing adds,
the bytes written and the decoded GB/s the recording sustained, what `record --estimate` would
have predicted of it from its probe of the writer (`estimate`), the host's cores and the synced
rate of the disk the stores go to, the traced runs' CPU seconds and page faults (whether the
allocator's settings held: analysis.allocator, `malloc_arenas`), the writer alone on the host's
cores with 2 and half the cores' steps in flight (`writer_alone`, bench.rate's feed of real
maps), and what pinning host memory
costs there (a process's first run pins its step buffers on a writer
thread from the run's start; the generation's first put() waits for the first of them), through
PyTorch's caching host allocator as the writer does and with its pages faulted in by several
threads, then registered (`pinning_registered`), and the rate of a device->host copy into
pinned memory on a stream of its own, as the writer copies maps off (`copy_off_gb_s`). The
breakdown of the traced run gives the seconds the capture and the model's attention kept the GPU
busy (CUDA events), and `capture_per_call` (bench/capture_cost.py) the capture of one call at
that shape: its work counted, its GPU time per chunk size against the attention's, its error
against float64, its GEMM in float32 against bf16 inputs on tensor cores, and the padding row
from blocks against from fused kernels' log-sum-exps (`padding_row`). Before all that
it runs the suite's CUDA tests there (`cuda_tests`: the only place they run), and `--json` is
rewritten after each part, so a failure or a timeout later on keeps what came before.

The GPU box has torch but no registry, so what else this needs travels as wheels:

    here:   python -m bench.gpu --wheels wheels --python 3.12   # downloads requires()
    there:  python -m bench.gpu --install wheels --json $OUT/gpu.json

`wheels` is a folder git ignores, carried to the box (about 60 MiB: the device takes 64 with the
working tree); they are installed into SITE there, not into the box's own Python.

`--smoke` runs the same code at the CPU quick geometry (what the test suite does).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from packaging.utils import canonicalize_name

# What a traced generation imports (the modules run here, on the CPU, import the same), and
# pytest for the suite's CUDA tests.
MODULES = (
    "tracer",
    "tracer.demo",
    "analysis",
    "bench.overhead",
    "bench.variants",
    "dask.array",
    "zarrs",
    "psutil",
    "pytest",
)
ROOT = Path(__file__).resolve().parent.parent
# The suite's tests marked `cuda`, in the files whose imports the carried wheels cover: never run
# but on a GPU box. The one other file with such a test needs DiffSynth-Studio, not carried.
CUDA_TESTS = (
    "tests/tracer/test_lse_path.py",
    "tests/tracer/test_writer.py",
    "tests/tracer/test_pinning.py",
    "tests/tracer/test_write_probe.py",
)


SITE = Path("/tmp/attnscope-site")  # where carried wheels are installed on the GPU box

# Imported here only because they are installed: accelerate, which diffusers imports, loads
# boto3 (installed for the S3 tests) when it finds it; diffusers and transformers load peft and
# sentencepiece, and numcodecs msgpack, likewise. No trace uses them (the smoke run passes with
# them blocked), and they would take the carried wheels past the device's 64 MiB.
NOT_CARRIED = frozenset(
    {"boto3", "botocore", "s3transfer", "jmespath", "peft", "sentencepiece", "msgpack"}
)


def requires() -> list[str]:
    """Distributions those modules import, at the versions installed here, less torch's own."""
    for module in MODULES:
        importlib.import_module(module)
    owners = importlib.metadata.packages_distributions()
    imported = {d for m in list(sys.modules) for d in owners.get(m.split(".")[0], [])}
    left = _torch_own() | NOT_CARRIED | {"attnscope"}
    keep = sorted(d for d in imported if canonicalize_name(d) not in left)
    return [f"{d}=={importlib.metadata.version(d)}" for d in keep]


def download(folder: Path, python: str | None) -> list[str]:
    """Binary wheels of `requires()` into `folder`; returns the pins."""
    pins = requires()
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(folder)]
    if python:
        command += ["--only-binary=:all:", "--python-version", python]
        command += ["--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64"]
    subprocess.run([*command, *pins], check=True)
    return pins


def install(folder: Path, target: Path = SITE) -> None:
    """Install the carried wheels (no registry) into `target`, first on sys.path, except torch's
    own distributions, which stay the box's. Not into the box's own environment, which may not
    be writable."""
    # The box's image has its own transformers, huggingface_hub, xarray, pandas...: the carried
    # ones shadow them, so that a run there uses the versions the suite passes with here.
    box = _torch_own()
    wheels = [
        str(wheel)
        for wheel in sorted(folder.glob("*.whl"))
        if canonicalize_name(wheel.name.split("-")[0]) not in box
    ]
    if wheels:
        pip = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile"]
        subprocess.run([*pip, "-q", "--upgrade", "--target", str(target), *wheels], check=True)
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()


def _torch_own() -> set[str]:
    """torch, torchvision and what they require, as installed here (canonical names)."""
    from packaging.requirements import Requirement

    there, todo = set(), ["torch", "torchvision"]
    while todo:
        name = canonicalize_name(todo.pop())
        if name in there or not _installed(name):
            continue
        there.add(name)
        for line in importlib.metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return there


def _installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def measure(
    smoke: bool,
    save: Callable[[dict[str, Any]], None] = lambda figures: None,
    allocator_tuned: bool = False,
    pinned_at_size: bool = False,
) -> dict[str, Any]:
    """Time untraced and traced generations; the figures for docs/benchmarks.md.

    `save` gets the figures measured so far after each part, the quick ones first: a GPU box is
    lent for minutes, and what a failure or a timeout later on leaves is kept.
    `allocator_tuned`: what `reuse_freed_memory()` returned, called before anything else ran;
    `pinned_at_size`: what `tracer.pinning.pin_at_size()` returned.
    """
    import torch

    from analysis.allocator import arenas
    from bench import capture_cost
    from bench.common import GEOMETRIES, scratch
    from bench.overhead import measure as pairs_of
    from bench.rate import writer_alone
    from bench.variants import deep_pending_steps
    from tracer.durable import disk_sync_rate

    geo = GEOMETRIES["quick" if smoke else "flux-dev-gpu"]
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("bench.gpu needs a CUDA device (or --smoke for the CPU quick geometry)")
    started = time.perf_counter()
    figures: dict[str, Any] = {
        "geometry": asdict(geo),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "allocator_tuned": allocator_tuned,
        "pinned_at_size": pinned_at_size,
    }
    if not smoke:  # the suite runs these itself, skipped where there is no GPU
        figures["cuda_tests"] = cuda_tests()
        save(figures)
    try:
        figures["capture_per_call"] = capture_cost.measure(geo)
    except Exception as exc:  # the pairs after it are what the box is lent for: go on to them
        figures["capture_per_call"] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    save(figures)
    with scratch("disk") as folder:  # where the traced runs write their stores
        megabytes = 16 if smoke else 2048
        disk = disk_sync_rate(folder, megabytes * 2**20) / 1e6
        # As the writer writes: four shards in flight (two steps, two directions), each whole.
        block = (4 if smoke else 64) * 2**20
        parallel = disk_sync_rate(folder, 2 * megabytes * 2**20, files=4, block_bytes=block) / 1e6
    figures["host"] = {
        "cores": len(os.sched_getaffinity(0)),
        "disk_sync_mb_s": disk,
        "disk_sync_mb_s_4_files": parallel,
    }
    save(figures)
    # Two pairs: a process's first traced run pays for its buffers (pinned host memory, zarrs'
    # working memory) as it goes; a later run reuses them (bench.rate projects both). One more
    # with more steps in flight, to see whether the host's idle cores would keep up.
    # And one keeping 9 mantissa bits, a float32 model's, where the default keeps bf16's 7, and
    # one with fsync off, whose generation waits for the disk's write-back only past the
    # kernel's limit on unwritten pages.
    result = pairs_of(
        asdict(geo),
        {"attnscope": 2, "attnscope-deep": 1, "attnscope-keepbits9": 1, "attnscope-unsynced": 1},
    )
    traced = result["outputs"]["attnscope"]
    deep = result["outputs"]["attnscope-deep"]
    nine_bits = result["outputs"]["attnscope-keepbits9"]
    unsynced = result["outputs"]["attnscope-unsynced"]
    peak = result["cuda_peak"]
    first, later = result["ratios"]["attnscope"]["wall"]
    figures |= {
        "traced_over_untraced": result["ratio"]["attnscope"],
        "traced_over_untraced_first_run": first,
        "traced_over_untraced_later_run": later,
        "median_wall": result["median_wall"],
        "median_cpu": result["median_cpu"],  # all threads: cores busy = cpu / wall
        "breakdown": result["breakdown"],
        "gpu_memory_added_bytes": peak["attnscope"] - peak["untraced"] if peak else None,
        "bytes_written": traced["bytes"],
        "bytes_per_value": traced["bytes"] / (traced["decoded_bytes"] / 4),
        "token_rows": traced["token_rows"],
        "keepbits": traced["keepbits"],
        "lse_used": traced["lse_used"],
        "decoded_bytes": traced["decoded_bytes"],
        "decoded_gb_s": traced["decoded_bytes"] / traced["wall"] / 1e9,
        # A page fault per 4 KiB written would mean the writer's buffers are faulted in afresh.
        "page_faults_per_gb_decoded": traced["page_faults"] / (traced["decoded_bytes"] / 1e9),
        "malloc_arenas": arenas(),
        "deeper_writer": {
            "max_pending_steps": deep_pending_steps(),
            "traced_over_untraced": result["ratio"]["attnscope-deep"],
            "wall": deep["wall"],
            "cpu": deep["cpu"],
            "gpu_memory_added_bytes": (peak["attnscope-deep"] - peak["untraced"] if peak else None),
        },
        "keepbits_9": {
            "traced_over_untraced": result["ratio"]["attnscope-keepbits9"],
            "wall": nine_bits["wall"],
            "bytes_written": nine_bits["bytes"],
            "bytes_per_value": nine_bits["bytes"] / (nine_bits["decoded_bytes"] / 4),
        },
        "unsynced": {
            "traced_over_untraced": result["ratio"]["attnscope-unsynced"],
            "wall": unsynced["wall"],
            "cpu": unsynced["cpu"],
        },
    }
    save(figures)
    try:
        figures["estimate"] = estimated(geo, traced, result["median_wall"]["untraced"])
    except Exception as exc:  # the parts after it are what the box is lent for: go on to them
        figures["estimate"] = {"write_rate": None, "write_error": f"{type(exc).__name__}: {exc}"}
    save(figures)
    # The writer without the generation beside it: what the host's cores and disk do alone.
    pending = sorted({2, deep_pending_steps()})
    figures["writer_alone"] = writer_alone(pending, 3, 3) if smoke else writer_alone(pending)
    save(figures)
    # After the traced runs, whose first pins its step buffers afresh: see the functions.
    figures["pinning_seconds_per_gib"] = pinning_seconds_per_gib()
    figures["copy_off_gb_s"] = copy_off_gb_s()
    figures["pinning_registered"] = pinning_registered()
    figures["seconds_in_all"] = time.perf_counter() - started
    save(figures)
    return figures


def estimated(geo: Any, traced: dict[str, Any], untraced_seconds: float) -> dict[str, Any]:
    """What `record --estimate` says there of the traced runs' recording, at the untraced
    generation's own step time: its probe of the writer (tracer.write_probe), on the device."""
    import torch

    from analysis import store_format as fmt
    from bench.common import scratch
    from tracer.estimate import Estimate, writer_facts

    cost = Estimate(
        layers=geo.num_layers + geo.num_single_layers,
        heads=geo.num_attention_heads,
        rows=traced["token_rows"],
        grid=geo.grid,
        steps=geo.steps,
        directions=fmt.DIRECTIONS,
        keepbits=traced["keepbits"],
        step_seconds=untraced_seconds / geo.steps,
        device="cuda" if torch.cuda.is_available() else "cpu",
    )
    with scratch("estimate") as folder:
        probed = replace(cost, **writer_facts(cost, folder / "estimated.zarr"))
    return {
        "step_seconds": cost.step_seconds,
        "write_rate": probed.write_rate,
        "write_ratio": probed.write_ratio,
        "write_error": probed.write_error,
    }


def cuda_tests() -> dict[str, Any]:
    """The suite's CUDA tests (CUDA_TESTS, `pytest -m cuda`) run in a child with the carried
    wheels: its exit status, summary line and failed tests."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SITE), str(ROOT)]))
    # The box's pytest plugins (its image has several) would load into the carried pytest,
    # whose version they may not support; these tests use none.
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider"]
    done = subprocess.run(
        [*command, *CUDA_TESTS], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    lines = done.stdout.splitlines()
    return {
        "returncode": done.returncode,
        "summary": lines[-1] if lines else done.stderr[-2000:],
        "failed": [line for line in lines if line.startswith(("FAILED", "ERROR"))],
    }


def pinning_seconds_per_gib() -> float | None:
    """Seconds to pin a GiB of host memory afresh through PyTorch's caching host allocator,
    as the writer's step buffers are pinned in a process's first run; None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    start = time.perf_counter()
    # 2 GiB: a block size the traced runs before left nothing cached of (their step buffers,
    # about 0.6 GB each at this prompt's 28 rows, are pinned at their size: tracer.pinning).
    block = torch.empty(2**29, dtype=torch.float32, pin_memory=True)
    seconds = time.perf_counter() - start
    del block
    return seconds / 2


def copy_off_gb_s() -> float | None:
    """GB/s a device->host copy into pinned memory runs at, on a stream of its own, as the
    writer copies maps off (a step of FLUX.1-dev's maps is 1-2 GB every 0.15 s); None without
    CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    device = torch.empty(2**28, dtype=torch.float32, device="cuda").fill_(1.0)  # 1 GiB
    host = torch.empty(device.shape, dtype=torch.float32, pin_memory=True)
    stream = torch.cuda.Stream()
    seconds = []
    for _ in range(3):
        stream.wait_stream(torch.cuda.current_stream())
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record()
            host.copy_(device, non_blocking=True)
            end.record()
        end.synchronize()
        seconds.append(start.elapsed_time(end) / 1e3)
    return device.numel() * 4 / min(seconds) / 1e9


def pinning_registered() -> dict[str, Any] | None:
    """What pinning costs with PyTorch's other way of pinning host memory: allocated plainly,
    its pages faulted in by several threads, then registered with CUDA
    (`pinned_use_cuda_host_register`, `pinned_num_register_threads`: the largest power of two
    up to the cores, as the setting asks). Set for this process from here on, so measured last;
    None without CUDA, the error where this torch refuses the setting."""
    import torch

    if not torch.cuda.is_available():
        return None
    threads = 2 ** int(math.log2(min(len(os.sched_getaffinity(0)), 128)))
    try:
        torch.cuda.memory._set_allocator_settings(
            f"pinned_use_cuda_host_register:True,pinned_num_register_threads:{threads}"
        )
    except Exception as exc:
        return {"threads": threads, "error": f"{type(exc).__name__}: {exc}"[:500]}
    torch.cuda.synchronize()
    start = time.perf_counter()
    # 4 GiB: pinning_seconds_per_gib left a 2 GiB block cached, which would be reused.
    block = torch.empty(2**30, dtype=torch.float32, pin_memory=True)
    seconds = time.perf_counter() - start
    del block
    return {"threads": threads, "seconds_per_gib": seconds / 4}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--wheels", type=Path, help="download the wheels it needs here; exit")
    parser.add_argument("--python", help="with --wheels: the GPU box's Python, e.g. 3.12")
    parser.add_argument("--install", type=Path, help="install carried wheels from here first")
    parser.add_argument("--smoke", action="store_true", help="CPU quick geometry, for tests")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    if args.wheels:
        args.wheels.mkdir(parents=True, exist_ok=True)
        print("\n".join(download(args.wheels, args.python)))
        return 0
    if args.install:
        install(args.install)
    # This script owns its process, as `attnscope record` does: the same allocator settings
    # (glibc's, and PyTorch's for pinned memory: tracer.pinning), before anything starts a
    # thread (CUDA's first call does; analysis.allocator says why). A smoke run shares the test
    # suite's process, which is left as it is.
    tuned = pinned = False
    if not args.smoke:
        from analysis.allocator import reuse_freed_memory
        from tracer.pinning import pin_at_size

        tuned = reuse_freed_memory()
        pinned = pin_at_size()

    def save(figures: dict[str, Any]) -> None:
        if args.json:
            args.json.write_text(json.dumps(figures, indent=1))

    print(json.dumps(measure(args.smoke, save, tuned, pinned), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
