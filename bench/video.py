"""Video models: tracing overhead and bytes per generation beside attention-map-diffusers, and the
capture's memory on a Wan-sized attention.

Overhead: the demo Wan (cross-attention: img2txt only) and CogVideoX (joint: both directions)
pipelines at one tiny geometry, 4 heads × 64, four traced attentions, 9 frames (3 latent frames)
of 256×448 pixels (a 16×28 token grid per latent frame: 1,344 video tokens),
`max_sequence_length=128`, 8 steps, guided, latents out. attnscope and attention-map-diffusers
record every step, layer and head; each ratio is a pair (untraced, then traced, in alternating
order), the figure the median over pairs, as in bench/families.py.

Memory: one cross-attention call of Wan 2.1 at 480p and 81 frames (40 heads × 128, 32,760 video
queries, 512 text keys, bfloat16, as the model hands them over), captured with several chunk
sizes; the figure is the largest block the capture allocates besides the maps it returns, from
torch's profiler (on the CPU here; the same allocations are made on an accelerator).
"""

from __future__ import annotations

import time
from typing import Any

from bench.common import PROMPT_20_WORDS, log

FAMILIES = ("wan", "cogvideox")
WIDTH = {"num_attention_heads": 4, "attention_head_dim": 64, "num_layers": 4}
TEXT_LEN, STEPS = 128, 8
CALL = {"height": 256, "width": 448, "num_frames": 9, "guidance_scale": 5.0}
# Wan 2.1 at 480p (480 × 832, 81 frames): 21 latent frames of 30 × 52 tokens.
WAN_480P = {"heads": 40, "head_dim": 128, "video_tokens": 21 * 30 * 52, "text_len": 512}
CHUNKS = (64, 256, 1024)


def figures(pairs: int) -> dict[str, Any]:
    """Both families' overhead, and the capture's memory, each in its own interpreter."""
    from bench.common import isolated

    return {
        "overhead": {
            family: isolated("bench.video:overhead", family=family, pairs=pairs)
            for family in FAMILIES
        },
        "memory": isolated("bench.video:capture_memory"),
    }


def overhead(family: str, pairs: int) -> dict[str, Any]:
    """Run in a fresh interpreter: median traced/untraced per recorder, and bytes written."""
    import torch

    from bench.families import paired
    from tracer.cli import load_demo

    pipe = load_demo(family, seed=0, max_sequence_length=TEXT_LEN, **WIDTH)

    def generate() -> None:
        pipe(
            prompt=PROMPT_20_WORDS,
            num_inference_steps=STEPS,
            max_sequence_length=TEXT_LEN,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            **CALL,
        )

    relations = ("video->text", "text->video")
    return paired(pipe, generate, ("attnscope", "amd"), pairs, f"video {family}", relations)


def capture_memory() -> dict[str, Any]:
    """Run in a fresh interpreter: the capture's largest block at each chunk size."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from tracer.capture import cross_attention_maps

    shape = WAN_480P
    heads, n_video, text_len = shape["heads"], shape["video_tokens"], shape["text_len"]
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(heads, n_video, shape["head_dim"], generator=gen).to(torch.bfloat16)
    k = torch.randn(heads, text_len, shape["head_dim"], generator=gen).to(torch.bfloat16)
    # A 20-word prompt's rows: each content token one row, the padding one.
    members = torch.zeros(27, text_len, dtype=torch.bool)
    for row in range(26):
        members[row, row] = True
    members[26, 26:] = True
    maps_bytes = heads * len(members) * n_video * 4
    found: dict[str, Any] = {"shape": shape, "maps_bytes": maps_bytes, "chunks": {}}
    for chunk in CHUNKS:
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            cross_attention_maps(
                q,
                k,
                mask=None,
                scale=shape["head_dim"] ** -0.5,
                span_members=members,
                chunk_size=chunk,
            )
        seconds = time.perf_counter() - start
        sizes = sorted(_allocations(prof), reverse=True)
        besides = [s for s in sizes if s != maps_bytes]
        found["chunks"][str(chunk)] = {"largest_block": besides[0], "seconds": seconds}
        log(f"video capture memory, chunk {chunk}: largest block {besides[0] / 2**20:.1f} MiB")
    found["queries_in_float32"] = heads * n_video * shape["head_dim"] * 4
    return found


def _allocations(prof: Any) -> list[int]:
    """Bytes of every allocation a torch profiler saw (its event tree: a private API, the one
    tests/tracer/references.py reads too)."""
    from torch._C._profiler import _EventType

    sizes, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.alloc_size > 0:
            sizes.append(node.extra_fields.alloc_size)
    return sizes
