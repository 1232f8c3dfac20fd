"""The capture's cost per attention call at a geometry's shape: counted, and measured on its device.

Counted (`work`): with the kernel's log-sum-exp, a joint attention call's capture is two float32
GEMMs of every text position against the image positions (txt2img: each text query against the
image keys; img2txt: each image query against the text keys) and their reduction to token rows.
Every text position is some row's, the padding's included (its positions summed in one row), so
at FLUX.1-dev's shape that is 512 positions for a 20-word prompt's 26 rows. Beside it, the
model's own attention (QKᵀ and PV over all N tokens), which runs in the model's dtype.

Measured (`measure`): synthetic q, k, v of the geometry's shape and dtype on its device, the
model's attention through the kernel the tap takes the lse from, then the capture
(`tracer.capture.attention_maps`) at several `chunk_size`s, each timed on the device
(bench.overhead's clock: CUDA events there) and checked against a float64 softmax. On CUDA also
the txt2img GEMM alone, in float32 as the capture runs it and from the model's bf16 inputs with
a float32 output (`out_dtype`, tensor cores; bf16 products are exact in float32): what moving
the capture's GEMMs onto tensor cores would gain and cost in error (tracer.capture does so now).

And the padding row both ways (`padding_row`): a prompt's padding row sums hundreds of text
positions, and it is what makes the capture's probability blocks [H, 512, image] rather than
[H, 26, image]. Its two maps are log-sum-exps over those positions, which fused attention
kernels return without writing any block out (tracer.capture's fused spans, the default on
CUDA): the capture at the largest chunks with the padding row from blocks and from fused
kernels, each timed and checked.
"""

from __future__ import annotations

import statistics
from typing import Any

from bench.common import Geometry

ROWS = 26  # a 20-word prompt's token rows: its tokens, </s> and the padding row
CHUNK_SIZES = (64, 128, 256, 512)


def work(geo: Geometry, rows: int = ROWS) -> dict[str, float]:
    """Per attention call at `geo`'s shape: the capture's float32 operations (both directions,
    `rows` token rows over all `geo.text_len` text positions), the model's attention's, and the
    bytes of the capture's float32 probability blocks (one [H, T, image] per direction)."""
    heads, dim, text = geo.num_attention_heads, geo.attention_head_dim, geo.text_len
    image = geo.grid[0] * geo.grid[1]
    return {
        "capture_flop": 4 * heads * text * image * (dim + rows),
        "attention_flop": 4 * heads * geo.tokens**2 * dim,
        "block_bytes": 2 * 4 * heads * text * image,
    }


def measure(geo: Geometry, repeats: int = 5) -> dict[str, Any]:
    """Device seconds per call of the model's attention and of the capture (medians of
    `repeats`), and the capture's largest error against float64, per chunk size."""
    import torch

    import tracer.tap as tap
    from bench.overhead import DeviceClock
    from tracer.capture import attention_maps

    dtype, device = getattr(torch, geo.dtype), torch.device(geo.device)
    heads, dim, text = geo.num_attention_heads, geo.attention_head_dim, geo.text_len
    generator = torch.Generator(device).manual_seed(0)
    q, k, v = (
        torch.randn(1, heads, geo.tokens, dim, generator=generator, device=device).to(dtype)
        for _ in range(3)
    )
    members = torch.zeros(ROWS, text, dtype=torch.bool)
    members[range(ROWS - 1), range(ROWS - 1)] = True
    members[ROWS - 1, ROWS - 1 :] = True  # the padding row
    bound = {"query": q, "key": k, "value": v}
    kernel = tap._lse_kernel(bound)
    if kernel is None:
        raise RuntimeError(f"no lse kernel for this call at {geo.name}: the tap would recompute")
    clock = DeviceClock(geo.device)
    attention = clock.timed(lambda: tap._run_with_lse(kernel, bound), "attention")
    output, lse = attention()
    lse = lse[0]
    # What the tap checks once per call signature before it keeps the kernel's lse.
    same = torch.equal(output, torch.nn.functional.scaled_dot_product_attention(q, k, v))

    def capture(chunk_size: int, fused_spans: bool | None = None) -> dict[str, torch.Tensor]:
        return attention_maps(
            q[0],
            k[0],
            mask=None,
            scale=dim**-0.5,
            text_len=text,
            span_members=members,
            lse=lse,
            chunk_size=chunk_size,
            fused_spans=fused_spans,
        )

    reference = _reference(q[0], k[0], dim**-0.5, text, members)
    out: dict[str, Any] = {
        "kernel": kernel,
        "bit_identical_to_sdpa": same,
        "work": work(geo),
        "chunks": {},
    }
    for _ in range(repeats):
        attention()
    out["attention_seconds"] = _median_of(clock, "attention", repeats)
    for chunk_size in CHUNK_SIZES:
        timed = clock.timed(lambda size=chunk_size: capture(size), f"chunk {chunk_size}")
        maps = timed()
        error = max(_relative_error(maps[d], reference[d]) for d in maps)
        for _ in range(repeats - 1):
            timed()
        seconds = _median_of(clock, f"chunk {chunk_size}", repeats)
        out["chunks"][chunk_size] = {"seconds": seconds, "max_relative_error": error}
    if geo.device == "cuda":
        out["gemm"] = _gemm(q[0], k[0], text, clock, repeats)
    out["padding_row"] = {
        way: _timed_capture(lambda f=fused: capture(max(CHUNK_SIZES), f), way, reference, clock)
        for way, fused in (("blocks", False), ("fused", True))
    }
    return out


def _timed_capture(
    capture: Any, key: str, reference: dict[str, Any], clock: Any, repeats: int = 5
) -> dict[str, Any]:
    """`capture()`'s device seconds (median of `repeats`) and largest error against float64;
    what failed instead, where it cannot run here."""
    timed = clock.timed(capture, key)
    try:
        maps = timed()
    except (RuntimeError, TypeError, ValueError) as exc:  # a fused kernel these inputs lack
        return {"error": str(exc)[:500]}
    for _ in range(repeats - 1):
        timed()
    return {
        "seconds": _median_of(clock, key, repeats),
        "max_relative_error": max(_relative_error(maps[d], reference[d]) for d in maps),
    }


def _median_of(clock: Any, key: str, n: int) -> float:
    return statistics.median(clock.calls(key)[-n:])


def _gemm(q: Any, k: Any, text: int, clock: Any, repeats: int) -> dict[str, float]:
    """txt2img's GEMM for 256 text queries: float32 as the capture runs it, and from the bf16
    inputs with a float32 output; seconds each and the second's largest error against the first."""
    import torch

    rows, keys = q[:, :256], k[:, text:].transpose(1, 2)
    f32 = clock.timed(lambda: torch.bmm(rows.float(), keys.float()), "gemm float32")
    tensor_cores = clock.timed(
        lambda: torch.bmm(rows, keys, out_dtype=torch.float32), "gemm out_dtype"
    )
    want = f32()
    try:
        got = tensor_cores()
    except (RuntimeError, TypeError) as exc:  # an overload this torch lacks: say so, go on
        return {"float32_seconds": clock.calls("gemm float32")[0], "out_dtype_error": str(exc)}
    for _ in range(repeats - 1):
        f32(), tensor_cores()
    return {
        "float32_seconds": _median_of(clock, "gemm float32", repeats),
        "out_dtype_seconds": _median_of(clock, "gemm out_dtype", repeats),
        "out_dtype_max_abs_error": float((got - want).abs().max()),
        "logit_scale": float(want.abs().max()),
    }


def _reference(q: Any, k: Any, scale: float, text: int, members: Any) -> dict[str, Any]:
    """txt2img and img2txt from float64 softmax rows, a head at a time."""
    import torch

    weights = members.to(q.device, torch.float64)
    txt2img, img2txt = [], []
    for head in range(q.shape[0]):
        p = torch.softmax(q[head].double() @ k[head].double().T * scale, dim=-1)
        txt2img.append((weights / weights.sum(1, keepdim=True)) @ p[:text, text:])
        img2txt.append((p[text:, :text] @ weights.T).T)
    return {"txt2img": torch.stack(txt2img), "img2txt": torch.stack(img2txt)}


def _relative_error(got: Any, want: Any) -> float:
    """The largest |got - want| / want over values at least 1e-6 of the largest."""
    want = want.to(got.device)
    big = want.abs() >= 1e-6 * want.abs().max()
    return float(((got.double() - want).abs() / want.abs())[big].max())
