"""The ways one generation is run: untraced, traced by attnscope, and by the two baselines.

Each variant runs one whole generation (recording and saving included) with its output under
`workdir`, and returns what it recorded. Importing this module imports no torch (the report uses
its labels).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import Geometry, generate

Variant = Callable[[Any, Geometry, Path, int | None], dict[str, Any]]


def untraced(pipe: Any, geo: Geometry, workdir: Path, steps: int | None = None) -> dict[str, Any]:
    generate(pipe, geo, steps)
    return {}


def attnscope(
    pipe: Any, geo: Geometry, workdir: Path, steps: int | None = None, **options: Any
) -> dict[str, Any]:
    """Every layer, head and step, both directions, every token row, compressed on disk;
    `options` are `tracer.trace`'s, its defaults otherwise."""
    import tracer

    path = workdir / "trace.zarr"
    with tracer.trace(pipe, path, progress=False, **options):
        generate(pipe, geo, steps)
    return {"path": str(path)}


def decoded(path: str) -> dict[str, Any]:
    """Token rows and decoded bytes of the trace at `path`, and its traced attention calls by
    where their normalisers came from (metadata only; not timed)."""
    import analysis
    from analysis.store_format import KEEPBITS, LSE_USED

    recorded = analysis.open_trace(path, tokens=True)
    return {
        "keepbits": recorded.txt2img.attrs.get(KEEPBITS),
        "token_rows": recorded.sizes["token"],
        "decoded_bytes": int(recorded.txt2img.nbytes + recorded.img2txt.nbytes),
        "lse_used": recorded.attrs.get(LSE_USED),
    }


def attnscope_recompute(
    pipe: Any, geo: Geometry, workdir: Path, steps: int | None = None
) -> dict[str, Any]:
    """attnscope without the kernel's log-sum-exp: img2txt reruns attention over all keys."""
    return attnscope(pipe, geo, workdir, steps, lse="recompute")


def attnscope_deep(
    pipe: Any, geo: Geometry, workdir: Path, steps: int | None = None
) -> dict[str, Any]:
    """attnscope with as many steps in flight as half the host's cores (at least the default
    2): a step's shard is encoded on about one core, so the default keeps four cores busy."""
    return attnscope(pipe, geo, workdir, steps, max_pending_steps=deep_pending_steps())


def attnscope_float32_bits(
    pipe: Any, geo: Geometry, workdir: Path, steps: int | None = None
) -> dict[str, Any]:
    """attnscope keeping 9 mantissa bits whatever the model's dtype (a bf16 model's default is
    7): what the two bits more cost where the disk is what the generation waits for."""
    from analysis.store_format import DEFAULT_KEEPBITS  # a float32 model's (tracer.rounding)

    return attnscope(pipe, geo, workdir, steps, keepbits=DEFAULT_KEEPBITS)


def attnscope_unsynced(
    pipe: Any, geo: Geometry, workdir: Path, steps: int | None = None
) -> dict[str, Any]:
    """attnscope with fsync off (`record --no-fsync`): steps left in the page cache, so the
    generation does not wait for the disk to sync each one."""
    return attnscope(pipe, geo, workdir, steps, fsync=False)


def deep_pending_steps() -> int:
    """The steps in flight of `attnscope_deep` on this host."""
    return max(2, len(os.sched_getaffinity(0)) // 2)


def seed(pipe: Any, geo: Geometry, workdir: Path, steps: int | None = None) -> dict[str, Any]:
    from bench.baselines import seed_method

    with seed_method(pipe, workdir / "seed", geo.text_len):
        generate(pipe, geo, steps)
    return {"path": str(workdir / "seed")}


def amd(pipe: Any, geo: Geometry, workdir: Path, steps: int | None = None) -> dict[str, Any]:
    from bench.baselines import attention_map_diffusers

    out = workdir / "amd"
    recorded = attention_map_diffusers(pipe, out, lambda: generate(pipe, geo, steps))
    return {"path": str(out), **recorded}


VARIANTS: dict[str, Variant] = {
    "untraced": untraced,
    "attnscope": attnscope,
    "attnscope-recompute": attnscope_recompute,
    "attnscope-deep": attnscope_deep,
    "attnscope-keepbits9": attnscope_float32_bits,
    "attnscope-unsynced": attnscope_unsynced,
    "seed": seed,
    "amd": amd,
}

LABELS = {
    "untraced": "untraced",
    "attnscope": "attnscope",
    "attnscope-recompute": "attnscope, lse recomputed (old path)",
    "attnscope-deep": "attnscope, half the cores' steps in flight",
    "attnscope-keepbits9": "attnscope, keepbits 9 (a float32 model's)",
    "attnscope-unsynced": "attnscope, fsync off",
    "seed": "seed method",
    "amd": "attention-map-diffusers",
}


def describe(name: str, geo: Geometry) -> str:
    """What the variant records on `geo`, for the report."""
    layers = geo.num_layers + geo.num_single_layers
    return {
        "untraced": "nothing",
        "attnscope": (
            f"all {layers} layers, all heads and steps, txt2img + img2txt per text token (the "
            "padding summed in one row), Zarr with bit-rounding + LZ4"
        ),
        "attnscope-recompute": "same as attnscope",
        "attnscope-deep": "same as attnscope",
        "attnscope-keepbits9": "same as attnscope, 9 mantissa bits kept whatever the dtype",
        "attnscope-unsynced": "same as attnscope, its steps left unsynced in the page cache",
        "seed": (
            f"all {layers} layers, heads and steps: the whole text-rows × image-columns block and "
            "the image-rows × text-columns block of every map, per token, .npy"
        ),
        "amd": (
            f"image->text and text->image, all heads and timesteps, per token, .pt; its FLUX "
            f"processor records the double-stream blocks only ({geo.num_layers} of {layers})"
        ),
    }[name]
