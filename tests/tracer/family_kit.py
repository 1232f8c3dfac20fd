"""What the per-family tests share: one small generation at a chosen text length and token grid
(a video's: two latent frames of a small non-square grid)."""

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


VIDEO_FRAMES = 5  # two latent frames: the first video frame alone, then four
VIDEO_GRID = (2, 3, 4)  # latent frames, token rows, token columns: 48 x 64 pixels


def generate_video(pipe: Any, *, seed: int = 0, prompt: str = PROMPT, **kwargs: Any) -> Any:
    """Three steps of a 5-frame video of `prompt` at 16 pixels per token, on VIDEO_GRID."""
    return pipe(
        prompt=prompt,
        height=VIDEO_GRID[1] * 16,
        width=VIDEO_GRID[2] * 16,
        num_frames=VIDEO_FRAMES,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        **kwargs,
    )
