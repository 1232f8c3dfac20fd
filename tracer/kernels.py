"""Which fused attention kernel gives each query's log-sum-exp, and running it as SDPA would.

`bound` is a `scaled_dot_product_attention` call's arguments by name. The tap runs the model's
own attention through these (tracer.tap); the capture runs the few fused calls of its own
through them (tracer.capture).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.nn.attention import SDPBackend

__all__ = ["lse_kernel", "run_with_lse"]


def lse_kernel(bound: dict[str, Any]) -> str | None:
    """Which log-sum-exp-returning kernel SDPA would run for this call, if one: cpu_flash,
    cuda_flash, cuda_efficient or cuda_cudnn; None when the call must run as made."""
    query, key, value = bound["query"], bound["key"], bound["value"]
    mask = bound.get("attn_mask")
    dropout = bound.get("dropout_p", 0.0)
    causal = bound.get("is_causal", False)
    gqa = bound.get("enable_gqa", False)
    tensors = [t for t in (query, key, value, mask) if t is not None]
    if (
        dropout
        or causal
        or gqa
        or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
    ):
        return None
    try:
        choice = SDPBackend(
            torch._fused_sdp_choice(
                query, key, value, mask, dropout, causal, scale=bound.get("scale"), enable_gqa=gqa
            )
        )
    except (RuntimeError, IndexError, ValueError):
        return None  # a call SDPA refuses: let the model's own call raise its own error
    if query.device.type == "cpu":
        return "cpu_flash" if choice == SDPBackend.FLASH_ATTENTION else None
    if query.device.type != "cuda" or mask is not None:
        # SDPA pads CUDA masks for the efficient kernel; not replicated here.
        return None
    if choice == SDPBackend.FLASH_ATTENTION and query.shape[-1] % 8 == 0:
        return "cuda_flash"  # a head dim SDPA would pad is left alone
    if choice == SDPBackend.EFFICIENT_ATTENTION:
        return "cuda_efficient"
    if choice == SDPBackend.CUDNN_ATTENTION:
        # SDPA's first choice on Hopper. Asked for the lse, cuDNN may build another graph: the
        # check against SDPA's own output (tracer.tap's _SdpaCalls) keeps it only where it is not.
        return "cuda_cudnn"
    return None


def run_with_lse(kernel: str, bound: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The output SDPA would return for this call, and its float32 log-sum-exp [B, H, N].

    Each branch is what `torch.nn.functional.scaled_dot_product_attention` itself does for that
    kernel (aten/src/ATen/native/transformers/attention.cpp), keeping the kernel's lse.
    """
    query, key, value = bound["query"], bound["key"], bound["value"]
    scale = bound.get("scale")
    if kernel == "cpu_flash":
        mask = bound.get("attn_mask")
        if mask is not None and mask.dtype == torch.bool:
            # SDPA's convert_boolean_attn_mask: True = may attend -> 0, False -> -inf.
            zero = torch.zeros((), dtype=query.dtype, device=mask.device)
            mask = torch.where(mask.logical_not(), -math.inf, zero)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, False, attn_mask=mask, scale=scale
        )
        return out, lse
    if kernel == "cuda_flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, 0.0, False, False, scale=scale
        )[:2]
        return out, lse
    if kernel == "cuda_cudnn":
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
            query, key, value, None, True, 0.0, False, False, scale=scale
        )[:2]
        return out, lse.reshape(query.shape[:-1])  # cuDNN's statistics are [B, H, N, 1]
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, None, True, 0.0, False, scale=scale
    )[:2]
    return out, lse[..., : query.shape[-2]]  # rows are padded to a multiple of 32
