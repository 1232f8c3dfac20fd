"""Tracing overhead per model family at two comparable geometries, beside attention-map-diffusers.

Each family's demo pipeline is built with four traced attentions at each geometry:
- `small`: 4 heads × 64, a 32×32 token grid (512² with 2×2 packing or patches; 1024² for Sana's
  factor-32 autoencoder), `max_sequence_length=128`, 8 steps: generations of about a second,
  where a run's fixed cost weighs most. attention-map-diffusers runs beside attnscope here,
  where it supports the family (not Qwen-Image, Lumina2, CogView4 or HiDream-I1, whose
  processors it refuses).
- `flux-cpu`: FLUX's CPU benchmark geometry (bench/overhead.py): 8 heads × 128, a 64×64 token
  grid, `max_sequence_length=512`, 2 steps. attnscope only: attention-map-diffusers saves every
  map raw, gigabytes per generation at this size.
Each family has its own text length (T5 padded to the maximum, SD3 with 77 CLIP positions before,
HiDream-I1 with Llama's tokens twice after,
FLUX.2 its chat template padded; Sana Gemma's, padded; Qwen-Image, Z-Image, Lumina2 and CogView4
unpadded, in their own templates), and runs at its pipeline's own guidance defaults (batched, as
a second call, or embedded). As in bench/overhead.py, each ratio is a pair (untraced, then
traced, in alternating order), and the figure is the median over pairs; the recorders' pairs are
interleaved.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.common import PROMPT_20_WORDS, du, log, median, scratch


@dataclass(frozen=True)
class Geometry:
    """The transformer width, token grid, text length and steps every family is run at."""

    heads: int
    head_dim: int
    grid: int  # token grid side
    text_len: int  # max_sequence_length
    steps: int
    peers: bool  # whether attention-map-diffusers runs too


GEOMETRIES = {
    "small": Geometry(heads=4, head_dim=64, grid=32, text_len=128, steps=8, peers=True),
    "flux-cpu": Geometry(heads=8, head_dim=128, grid=64, text_len=512, steps=2, peers=False),
}
DOUBLE_AND_SINGLE = {"num_layers": 2, "num_single_layers": 2}


@dataclass(frozen=True)
class Family:
    """How each family's demo (`record --demo FAMILY`) is built and called for the benchmark."""

    demo: dict[str, Any]
    call: dict[str, Any] = field(default_factory=dict)
    pixels_per_token: int = 16  # 8× autoencoder, 2×2 patches
    padded: bool = False  # whether the demo takes max_sequence_length (its padded text length)
    peer: bool = True  # whether attention-map-diffusers supports it


FAMILIES = {
    "flux": Family(DOUBLE_AND_SINGLE, padded=True),
    "sd3": Family({"num_layers": 4}, padded=True),
    "chroma": Family(DOUBLE_AND_SINGLE, padded=True),
    "flux2": Family(DOUBLE_AND_SINGLE),
    "qwen-image": Family({"num_layers": 4}, peer=False),
    "z-image": Family({"num_layers": 4}),
    "lumina2": Family({"num_layers": 4}, peer=False),
    "cogview4": Family({"num_layers": 4}, peer=False),
    "hidream": Family(DOUBLE_AND_SINGLE, padded=True, peer=False),
    "sana": Family(
        {"num_layers": 4},
        call={"use_resolution_binning": False},
        pixels_per_token=32,
    ),
}


def figures(pairs: int) -> dict[str, Any]:
    """Every family at every geometry, each in its own interpreter."""
    from bench.common import isolated

    return {
        geometry: {
            family: isolated(
                "bench.families:measure", family=family, geometry=geometry, pairs=pairs
            )
            for family in FAMILIES
        }
        for geometry in GEOMETRIES
    }


def measure(family: str, geometry: str, pairs: int) -> dict[str, Any]:
    """Run in a fresh interpreter (bench.common.isolated): median traced/untraced per recorder."""
    import torch

    from tracer.cli import load_demo

    spec, shape = FAMILIES[family], GEOMETRIES[geometry]
    width = {"num_attention_heads": shape.heads, "attention_head_dim": shape.head_dim}
    if family == "sana":  # its cross-attention (the traced one) as wide as the others
        width["num_cross_attention_heads"] = shape.heads
    text = {"max_sequence_length": shape.text_len} if spec.padded else {}
    side = shape.grid * spec.pixels_per_token
    if family == "hidream":  # its pipeline scales every size to this area
        width["sample_size"] = side // 8
    pipe = load_demo(family, seed=0, **width, **spec.demo, **text)
    recorders = ("attnscope", "amd") if shape.peers and spec.peer else ("attnscope",)

    def generate() -> None:
        pipe(
            prompt=PROMPT_20_WORDS,
            height=side,
            width=side,
            num_inference_steps=shape.steps,
            max_sequence_length=shape.text_len,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            **spec.call,
        )

    return paired(pipe, generate, recorders, pairs, f"{family} at {geometry}")


def paired(
    pipe: Any,
    generate: Callable[[], None],
    recorders: Sequence[str],
    pairs: int,
    label: str,
    amd_relations: tuple[str, ...] = ("image->text", "text->image"),
) -> dict[str, Any]:
    """`generate()` untraced and recorded by each of `recorders` (attnscope, amd), in pairs of
    alternating order: the median traced/untraced ratio per recorder and the bytes each wrote.
    `amd_relations`: attention-map-diffusers' names for the directions."""
    import tracer
    from bench.baselines import attention_map_diffusers

    def timed(recorder: str | None) -> tuple[float, int]:
        with scratch("pairs") as workdir:
            start = time.perf_counter()
            if recorder == "attnscope":
                with tracer.trace(pipe, workdir / "t.zarr", progress=False):
                    generate()
            elif recorder == "amd":
                recorded = attention_map_diffusers(
                    pipe, workdir / "amd", generate, relations=amd_relations
                )
                if not recorded["records"]:
                    raise RuntimeError(f"attention-map-diffusers recorded nothing: {recorded}")
            else:
                generate()
            return time.perf_counter() - start, du(workdir)

    timed(None)  # first-call costs out of pair 1
    ratios: dict[str, list[float]] = {name: [] for name in recorders}
    untraced: list[float] = []
    stored: dict[str, int] = {}
    for i in range(pairs):
        for name in recorders:
            first, second = (None, name) if i % 2 == 0 else (name, None)
            times = {first: timed(first), second: timed(second)}
            untraced.append(times[None][0])
            ratios[name].append(times[name][0] / times[None][0])
            stored[name] = times[name][1]
            log(f"{label}, {name} pair {i + 1}: {ratios[name][-1]:.3f}")
    return {
        "pipeline": type(pipe).__name__,
        "untraced_s": median(untraced),
        "ratio": {name: median(values) for name, values in ratios.items()},
        "bytes": stored,
        "pairs": pairs,
    }
