"""Tracing overhead per model family at one comparable geometry, beside attention-map-diffusers.

Each family's demo pipeline is built with the same transformer width (4 heads × 64), four traced
attentions and a 32×32 token grid (512² with 2×2 packing or patches; 1024² for Sana's factor-32
autoencoder), and called with `max_sequence_length=128`: each family then has its own text
length (T5 padded to 128, SD3 with 77 CLIP positions before, FLUX.2 its chat template padded to
128, Sana 128 of Gemma's; Qwen-Image, Z-Image, Lumina2 and CogView4 unpadded, in their own
templates). Each runs at its pipeline's own guidance defaults (batched, as a second call, or
embedded). attention-map-diffusers runs beside it where it supports the family (not Qwen-Image,
Lumina2 or CogView4, whose processors it refuses). As in bench/overhead.py, each ratio is a pair
(untraced, then traced, in alternating order), and the figure is the median over pairs; the
recorders' pairs are interleaved.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from bench.common import PROMPT_20_WORDS, du, log, median, scratch

TEXT_LEN, SIDE, STEPS = 128, 512, 8
WIDTH = {"num_attention_heads": 4, "attention_head_dim": 64}
DOUBLE_AND_SINGLE = {"num_layers": 2, "num_single_layers": 2}


@dataclass(frozen=True)
class Family:
    """How each family's demo (`record --demo FAMILY`) is built and called for the benchmark."""

    demo: dict[str, Any]
    call: dict[str, Any] = field(default_factory=dict)
    side: int = SIDE
    recorders: tuple[str, ...] = ("attnscope", "amd")


FAMILIES = {
    "flux": Family({"max_sequence_length": TEXT_LEN, **DOUBLE_AND_SINGLE}),
    "sd3": Family({"max_sequence_length": TEXT_LEN, "num_layers": 4}),
    "chroma": Family({"max_sequence_length": TEXT_LEN, **DOUBLE_AND_SINGLE}),
    "flux2": Family(DOUBLE_AND_SINGLE),
    "qwen-image": Family({"num_layers": 4}, recorders=("attnscope",)),
    "z-image": Family({"num_layers": 4}),
    "lumina2": Family({"num_layers": 4}, recorders=("attnscope",)),
    "cogview4": Family({"num_layers": 4}, recorders=("attnscope",)),
    "sana": Family(
        {"num_layers": 4, "num_cross_attention_heads": 4},
        call={"use_resolution_binning": False},
        side=2 * SIDE,
    ),
}


def figures(pairs: int) -> dict[str, Any]:
    """Every family, each in its own interpreter."""
    from bench.common import isolated

    return {
        family: isolated("bench.families:measure", family=family, pairs=pairs)
        for family in FAMILIES
    }


def measure(family: str, pairs: int) -> dict[str, Any]:
    """Run in a fresh interpreter (bench.common.isolated): median traced/untraced per recorder."""
    import torch

    import tracer
    from bench.baselines import attention_map_diffusers
    from tracer.cli import load_demo

    spec = FAMILIES[family]
    pipe = load_demo(family, seed=0, **WIDTH, **spec.demo)

    def generate() -> None:
        pipe(
            prompt=PROMPT_20_WORDS,
            height=spec.side,
            width=spec.side,
            num_inference_steps=STEPS,
            max_sequence_length=TEXT_LEN,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            **spec.call,
        )

    def timed(recorder: str | None) -> tuple[float, int]:
        with scratch(f"family-{family}") as workdir:
            start = time.perf_counter()
            if recorder == "attnscope":
                with tracer.trace(pipe, workdir / "t.zarr", progress=False):
                    generate()
            elif recorder == "amd":
                attention_map_diffusers(pipe, workdir / "amd", generate)
            else:
                generate()
            return time.perf_counter() - start, du(workdir)

    timed(None)  # first-call costs out of pair 1
    ratios: dict[str, list[float]] = {name: [] for name in spec.recorders}
    untraced: list[float] = []
    stored: dict[str, int] = {}
    for i in range(pairs):
        for name in spec.recorders:
            first, second = (None, name) if i % 2 == 0 else (name, None)
            times = {first: timed(first), second: timed(second)}
            untraced.append(times[None][0])
            ratios[name].append(times[name][0] / times[None][0])
            stored[name] = times[name][1]
            log(f"{family} {name} pair {i + 1}: {ratios[name][-1]:.3f}")
    return {
        "family": family,
        "pipeline": type(pipe).__name__,
        "untraced_s": median(untraced),
        "ratio": {name: median(values) for name, values in ratios.items()},
        "bytes": stored,
        "pairs": pairs,
    }
