"""Tracing overhead per model family at one comparable geometry, beside attention-map-diffusers.

Each family's demo pipeline is built with the same transformer width (4 heads × 64), four joint
attentions, 128 T5 tokens (SD3 adds its 77 CLIP positions) and a 32×32 token grid (512², FLUX's
and Chroma's 2×2 packing, SD3's 2×2 patches), and run at its pipeline's own guidance defaults:
SD3 batches its guided pair, Chroma runs it as a second call, FLUX.1-dev embeds it. As in
bench/overhead.py, each ratio is a pair (untraced, then traced, in alternating order), and the
figure is the median over pairs; the recorders' pairs are interleaved.
"""

from __future__ import annotations

import time
from typing import Any

from bench.common import PROMPT_20_WORDS, du, log, median, scratch

# Each family's demo (`record --demo FAMILY`) with four joint attentions.
FAMILIES = {
    "flux": {"num_layers": 2, "num_single_layers": 2},
    "sd3": {"num_layers": 4},
    "chroma": {"num_layers": 2, "num_single_layers": 2},
}
TEXT_LEN, SIDE, STEPS = 128, 512, 8
RECORDERS = ("attnscope", "amd")


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

    pipe = load_demo(
        family,
        seed=0,
        max_sequence_length=TEXT_LEN,
        num_attention_heads=4,
        attention_head_dim=64,
        **FAMILIES[family],
    )

    def generate() -> None:
        pipe(
            PROMPT_20_WORDS,
            height=SIDE,
            width=SIDE,
            num_inference_steps=STEPS,
            max_sequence_length=TEXT_LEN,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
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
    ratios: dict[str, list[float]] = {name: [] for name in RECORDERS}
    untraced: list[float] = []
    stored: dict[str, int] = {}
    for i in range(pairs):
        for name in RECORDERS:
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
