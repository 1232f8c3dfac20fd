"""What per-token rows (format 2) cost against per-span rows (format 1), at FLUX.1-dev's shape.

For a 6-, a 20- and a 60-word prompt, tokenized by the demo's T5 tokenizer (trained on
image-prompt English) to FLUX's 512 text positions:
- rows per step: format 1 stored `prompt` plus one span per distinct word; format 2 stores one
  row per token (the prompt's tokens and `</s>`) plus one summed row for the padding;
- bytes per generation (28 steps, 57 layers, 24 heads, 64×64, both directions), decoded, and as
  stored: one layer-step of real capture output encoded with the format's codecs;
- capture time of one joint attention (the capture math, `tracer.capture.attention_maps`, with
  the kernel's log-sum-exp given, as on the default path) for each layout, in one process,
  interleaved. Fresh interpreter.
"""

from __future__ import annotations

import time
from typing import Any

PROMPTS = {
    6: "a black cat sleeping on sofa",
    20: "a portrait of an old man with a white beard and a hat sitting on a red chair in the park",
    60: "a painting of a house by the sea with a green door next to a mountain lake under a "
    "blue sky with white clouds and a small brown dog running on the beach at sunset while "
    "a woman with long hair wearing a red dress sits on a wooden table with a bowl of fruit "
    "and a glass of water in the morning light",
}
TEXT_LEN, IMAGE_TOKENS, HEADS, HEAD_DIM = 512, 64 * 64, 24, 128
LAYERS, STEPS, DIRECTIONS = 57, 28, 2
ROUNDS = 3


def _layouts(prompt: str) -> dict[str, Any]:
    """Format 1's span members and format 2's token rows for `prompt`, as bool [rows, 512]."""
    import torch

    from tracer.adapters.text import padded_segment
    from tracer.demo import demo_t5_tokenizer
    from tracer.spans import TextTokens, default_spans, token_rows

    segment = padded_segment(demo_t5_tokenizer(TEXT_LEN), "prompt", prompt, 0, TEXT_LEN)
    text = TextTokens((segment,), TEXT_LEN)
    spans = [span.indices for span in default_spans(text)]
    rows = [list(row.positions) for row in token_rows(text, TEXT_LEN)]
    members = {}
    for name, groups in (("v1", spans), ("v2", rows)):
        matrix = torch.zeros(len(groups), TEXT_LEN, dtype=torch.bool)
        for i, positions in enumerate(groups):
            matrix[i, positions] = True
        members[name] = matrix
    return {"words": len(prompt.split()), "tokens": sum(segment.content) + 1, **members}


def measure() -> dict[str, Any]:
    import numpy as np
    import torch
    import zarr

    from analysis import store_format as fmt
    from tracer.capture import attention_maps
    from tracer.rounding import bitround_

    generator = torch.Generator().manual_seed(0)
    n = TEXT_LEN + IMAGE_TOKENS
    q = torch.randn(HEADS, n, HEAD_DIM, generator=generator)
    k = torch.randn(HEADS, n, HEAD_DIM, generator=generator)
    scale = HEAD_DIM**-0.5
    # The lse of every query row, computed in blocks (a full N×N logit tensor is 2 GB).
    lse = torch.cat(
        [
            torch.logsumexp(torch.einsum("hnd,hmd->hnm", q[:, i : i + 512], k) * scale, dim=-1)
            for i in range(0, n, 512)
        ],
        dim=1,
    )
    results: dict[str, Any] = {"geometry": [LAYERS, HEADS, TEXT_LEN, IMAGE_TOKENS, STEPS]}
    for words, prompt in PROMPTS.items():
        layout = _layouts(prompt)
        entry: dict[str, Any] = {"words": layout["words"], "tokens": layout["tokens"]}
        times: dict[str, list[float]] = {"v1": [], "v2": []}
        maps: dict[str, dict[str, torch.Tensor]] = {}
        for _ in range(ROUNDS):
            for name in ("v1", "v2"):
                start = time.perf_counter()
                maps[name] = attention_maps(
                    q,
                    k,
                    mask=None,
                    scale=scale,
                    text_len=TEXT_LEN,
                    span_members=layout[name],
                    lse=lse,
                )
                times[name].append(time.perf_counter() - start)
        for name in ("v1", "v2"):
            rows = int(layout[name].shape[0])
            decoded = rows * LAYERS * HEADS * IMAGE_TOKENS * 4 * STEPS * DIRECTIONS
            # One layer-step encoded with the format's codecs: the stored bytes per value.
            rounded = bitround_(maps[name]["txt2img"].clone(), fmt.DEFAULT_KEEPBITS)
            values = rounded.reshape(1, 1, HEADS, rows, 64, 64).numpy()
            array = zarr.create_array(
                zarr.storage.MemoryStore(),
                shape=values.shape,
                **fmt.attention_encoding(values.shape),
            )
            array[...] = values
            ratio = values.nbytes / array.nbytes_stored()
            entry[name] = {
                "rows": rows,
                "decoded_bytes": decoded,
                "stored_bytes": decoded / ratio,
                "compression": ratio,
                "capture_seconds": float(np.median(times[name])),
                "capture_all": times[name],
            }
        results[str(words)] = entry
    return results
