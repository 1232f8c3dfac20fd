"""What the per-family tests share: one small generation at a chosen text length and token grid."""

from __future__ import annotations

from typing import Any

import torch

PROMPT = "a cat on a red chair"


def generate(
    pipe: Any,
    *,
    text_len: int,
    grid: tuple[int, int],
    seed: int = 0,
    prompt: str | list[str] = PROMPT,
    **kwargs: Any,
) -> Any:
    """Three steps of `prompt` at 16 pixels per token (VAE factor 8, 2x2 packing or patches)."""
    return pipe(
        prompt=prompt,
        height=grid[0] * 16,
        width=grid[1] * 16,
        num_inference_steps=3,
        max_sequence_length=text_len,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        **kwargs,
    )
