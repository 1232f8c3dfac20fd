"""What every benchmark shares: geometries, the model and its call, isolated runs, the machine.

Measurements that must not pollute each other (peak RSS above all) run in a fresh interpreter:
`isolated("bench.memory:measure", ...)` runs that function in `python -m bench.common` and returns
the JSON-able value it returned.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

PROMPT = "a cat on a red chair"
# The GPU case: a 20-word prompt (28 token rows under the demo tokenizers: its 26 T5
# pieces, </s> and the padding's row; the issue counts about 26).
PROMPT_20_WORDS = (
    "a photo of a small grey cat sitting on a red velvet chair beside a window in the morning light"
)
RESULT_TAG = "BENCH-RESULT "


@dataclass(frozen=True)
class Geometry:
    """A random-weight FLUX model (tracer.demo) and the generation the benchmarks run on it."""

    name: str
    num_layers: int  # double-stream blocks
    num_single_layers: int
    num_attention_heads: int
    attention_head_dim: int
    text_len: int  # T5 tokens in the joint attention
    height: int
    width: int
    steps: int
    dtype: str = "float32"
    device: str = "cpu"
    prompt: str = PROMPT

    @property
    def grid(self) -> tuple[int, int]:
        return self.height // 16, self.width // 16

    @property
    def tokens(self) -> int:
        """Length of the joint sequence: text then image tokens."""
        return self.text_len + self.grid[0] * self.grid[1]

    def describe(self) -> str:
        ny, nx = self.grid
        return (
            f"{self.num_attention_heads} heads × {self.attention_head_dim}, "
            f"{self.num_layers} double + {self.num_single_layers} single blocks, "
            f"{self.text_len} text + {ny}×{nx} image tokens = {self.tokens}, "
            f"{self.steps} steps, {self.dtype} on {self.device}"
        )


GEOMETRIES = {
    # Seconds per generation: for --quick and for memory-vs-steps.
    "quick": Geometry("quick", 1, 2, 4, 64, 128, 256, 256, 2),
    # The CPU FLUX geometry: FLUX's head dim, text length and 1024² grid (4608 tokens),
    # fewer heads and blocks so that a generation takes tens of seconds on 2 cores.
    "flux-cpu": Geometry("flux-cpu", 2, 4, 8, 128, 512, 1024, 1024, 2),
    # FLUX.1-dev's transformer at 1024², random weights in bf16: GPU only.
    "flux-dev-gpu": Geometry(
        "flux-dev-gpu",
        19,
        38,
        24,
        128,
        512,
        1024,
        1024,
        28,
        dtype="bfloat16",
        device="cuda",
        prompt=PROMPT_20_WORDS,
    ),
}


def geometry(base: str, **changes: Any) -> Geometry:
    """`base` with some fields changed, named after it and the changes."""
    name = "-".join([base, *(f"{k.split('_')[-1]}{v}" for k, v in changes.items())])
    return replace(GEOMETRIES[base], name=name, **changes)


# ------------------------------------------------------------------------------------- model


def build_pipeline(geo: Geometry) -> Any:
    """The demo FLUX pipeline at `geo`'s shape, on `geo`'s device and dtype."""
    import torch

    from tracer.demo import demo_pipeline

    dtype = getattr(torch, geo.dtype)
    kwargs = {
        "num_layers": geo.num_layers,
        "num_single_layers": geo.num_single_layers,
        "num_attention_heads": geo.num_attention_heads,
        "attention_head_dim": geo.attention_head_dim,
        "max_sequence_length": geo.text_len,
    }
    if geo.device == "cpu":
        return demo_pipeline(dtype=dtype, **kwargs)
    # Built on the device (a 12B-parameter transformer in float32 would take 48 GB of host
    # memory), then cast parameter by parameter.
    with torch.device(geo.device):
        return demo_pipeline(dtype=dtype, **kwargs)


def generate(pipe: Any, geo: Geometry, steps: int | None = None) -> Any:
    """One generation, latents out (no VAE decode): the same call for every variant."""
    import torch

    out = pipe(
        geo.prompt,
        num_inference_steps=steps or geo.steps,
        height=geo.height,
        width=geo.width,
        max_sequence_length=geo.text_len,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    )
    synchronize(geo)
    return out


def synchronize(geo: Geometry) -> None:
    if geo.device == "cuda":
        import torch

        torch.cuda.synchronize()


# ------------------------------------------------------------------------------ measurement


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def peak_rss() -> int:
    """This process's peak resident set size so far, in bytes (the kernel's high-water mark)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def du(path: str | os.PathLike) -> int:
    """Bytes of the files under `path` (apparent sizes)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@contextlib.contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A temporary directory next to the other benchmarks' (BENCH_TMPDIR or the system's)."""
    parent = os.environ.get("BENCH_TMPDIR")
    path = Path(tempfile.mkdtemp(prefix=f"attnscope-bench-{prefix}-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- isolated runs


# glibc's malloc moves its mmap threshold up to the size of the largest block freed (up to
# 32 MiB), after which freed activations stay in the heap, fragmented: a process's peak RSS
# then wanders by a few hundred MiB from one identical run to the next. A fixed threshold turns
# that off, so that peak RSS is the memory the program holds (see bench/memory.py).
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}


def isolated(
    target: str, timeout: float | None = None, env: dict[str, str] | None = None, **kwargs: Any
) -> Any:
    """Run `module:function(**kwargs)` in a fresh interpreter and return what it returned.

    `env`: variables added to this process's environment for the child.
    """
    command = [sys.executable, "-m", "bench.common", target, json.dumps(kwargs)]
    proc = subprocess.run(
        command,
        stdout=subprocess.PIPE,
        text=True,
        timeout=timeout,
        cwd=_repo_root(),
        env=os.environ | (env or {}),
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{target} failed (exit {proc.returncode}); its stderr is above")
    return json.loads(lines[-1][len(RESULT_TAG) :])


def _repo_root() -> str:
    return str(Path(__file__).resolve().parent.parent)


def _main(argv: Sequence[str]) -> None:
    target, raw = argv
    module, function = target.split(":")
    result = getattr(importlib.import_module(module), function)(**json.loads(raw))
    print(RESULT_TAG + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------- machine


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(_memory_bytes() / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }
    for name in ("torch", "diffusers", "transformers", "zarr", "numcodecs", "dask", "xarray"):
        info[name] = _version(name)
    info["attention-map-diffusers"] = _version("attention-map-diffusers")
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    with contextlib.suppress(OSError):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return info


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _memory_bytes() -> int:
    import psutil

    return psutil.virtual_memory().total


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def as_dict(geo: Geometry) -> dict[str, Any]:
    return asdict(geo)


if __name__ == "__main__":
    _main(sys.argv[1:])
