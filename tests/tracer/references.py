"""Independent references for the capture tests: float64 maps, and single allocations."""

from __future__ import annotations

from typing import Any

import pytest
import torch

NEG_INF = float("-inf")

# The relative error bound of the default store, stated here rather than read from the code under
# test: bit rounding keeps 9 of float32's 23 mantissa bits, so a stored value is within 2^-10.
DEFAULT_BOUND = 2.0**-10


def stated_bound(attrs) -> float:
    """DEFAULT_BOUND, after checking that the run's `error_bound` attribute says the same."""
    assert attrs["error_bound"] == DEFAULT_BOUND, attrs["error_bound"]
    return DEFAULT_BOUND


def reference(
    q: torch.Tensor,
    k: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    text_len: int,
    members: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The definitions, literally, for text tokens first and image tokens after them."""
    n = q.shape[1]
    return reference_at(q, k, mask, scale, range(text_len), range(text_len, n), members)


def reference_at(
    q: torch.Tensor,
    k: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    text: range,
    image: range,
    members: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The definitions, literally: float64 softmax of the whole N x N map, then the text rows
    against the image columns (and back), wherever in the sequence they are."""
    logits = torch.einsum("hid,hjd->hij", q.double(), k.double()) * scale
    if mask is not None:
        m = mask
        while m.dim() > 3:
            m = m[0]
        is_bool = m.dtype == torch.bool
        logits = logits.masked_fill(~m, NEG_INF) if is_bool else logits + m.double()
    dead = torch.isneginf(logits).all(dim=-1, keepdim=True)
    probs = torch.softmax(logits, dim=-1).masked_fill(dead, 0.0)
    w = members.double()
    text, image = list(text), list(image)
    txt2img = torch.einsum("si,hip->hsp", w / w.sum(1, keepdim=True), probs[:, text][:, :, image])
    img2txt = torch.einsum("sj,hpj->hsp", w, probs[:, image][:, :, text])
    return {"txt2img": txt2img, "img2txt": img2txt}


def allocation_sizes(prof) -> list[int]:
    """Bytes of every single CPU allocation the profiler saw."""
    try:
        from torch._C._profiler import _EventType

        roots = prof.profiler.kineto_results.experimental_event_tree()
    except (ImportError, AttributeError) as exc:  # private API; skip rather than lie
        pytest.skip(f"profiler event tree unavailable: {exc}")
    sizes, stack = [], list(roots)
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.alloc_size > 0:
            sizes.append(node.extra_fields.alloc_size)
    return sizes


def stored_rows(ds: Any) -> list[list[int]]:
    """The text positions each stored token row of a run covers (docs/store-format.md)."""
    return [
        list(range(p, p + c))
        for p, c in zip(ds.token.values.tolist(), ds.token_count.values.tolist(), strict=True)
    ]
