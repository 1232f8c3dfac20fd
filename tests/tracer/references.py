"""Independent references for the capture tests: float64 maps, and single allocations."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

NEG_INF = float("-inf")

# The relative error bound of the default store, stated here rather than read from the code under
# test: bit rounding keeps 9 of float32's 23 mantissa bits, so a stored value is within 2^-10.
DEFAULT_BOUND = 2.0**-10
# A bf16 model's default store keeps bf16's 7 mantissa bits: within 2^-8.
BF16_BOUND = 2.0**-8


def stated_bound(attrs, bound: float = DEFAULT_BOUND) -> float:
    """`bound` (the default store's), after checking that the run's `error_bound` attribute says
    the same."""
    assert attrs["error_bound"] == bound, attrs["error_bound"]
    return bound


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


def cross_reference(
    q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float, members: torch.Tensor
) -> torch.Tensor:
    """img2txt of a cross-attention, literally: float64 softmax of the image queries over the
    text keys, summed over each span's keys: ``[H, S, P]``."""
    logits = torch.einsum("hpd,htd->hpt", q.double(), k.double()) * scale
    if mask is not None:
        m = mask
        while m.dim() > 3:
            m = m[0]
        logits = logits.masked_fill(~m, NEG_INF) if m.dtype == torch.bool else logits + m.double()
    dead = torch.isneginf(logits).all(dim=-1, keepdim=True)
    probs = torch.softmax(logits, dim=-1).masked_fill(dead, 0.0)
    return torch.einsum("hpt,st->hsp", probs, members.double())


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


class SdpaLog:
    """Records q, k, mask, scale of every joint attention SDPA call (the test's own tap).

    Calls made inside a logged call (the capture's own, run by the tracer's tap from within the
    model's call) are not the model's, and are not logged.
    """

    def __init__(self, n_tokens: int, n_keys: int | None = None):
        self.n_tokens = n_tokens
        self.n_keys = n_tokens if n_keys is None else n_keys  # others: a cross-attention's
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]] = []

    def install(self, monkeypatch):
        original = torch.nn.functional.scaled_dot_product_attention
        inside = []

        def logged(query, key, value, attn_mask=None, *args, scale=None, **kwargs):
            if not inside and query.shape[-2] == self.n_tokens and key.shape[-2] == self.n_keys:
                s = 1.0 / query.shape[-1] ** 0.5 if scale is None else scale
                mask = None if attn_mask is None else attn_mask.clone()
                self.calls.append((query.clone(), key.clone(), mask, s))
            inside.append(True)
            try:
                return original(query, key, value, attn_mask, *args, scale=scale, **kwargs)
            finally:
                inside.pop()

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", logged)


def assert_rows_match_float64(
    ds, calls, text: range | None = None, image: range | None = None, batch: int = 0
) -> None:
    """Every stored token row of the run `ds`, at every step, layer and head, equals the
    float64 softmax of the logged call (one per layer and step, in order) within the bound;
    `text` and `image` are where those tokens sit in the joint sequence, omitted for a
    cross-attention (image queries against text keys: img2txt only)."""
    bound = stated_bound(ds.attrs)
    rows = stored_rows(ds)
    members = torch.zeros(len(rows), ds.attrs["text_len"], dtype=torch.bool)
    for i, row in enumerate(rows):
        members[i, row] = True
    n_layers = ds.sizes["layer"]
    assert len(calls) == ds.sizes["step"] * n_layers
    for step in range(ds.sizes["step"]):
        for layer in range(n_layers):
            q, k, mask, scale = calls[step * n_layers + layer]
            if mask is not None and mask.dim() == 4:
                mask = mask[batch if mask.shape[0] > 1 else 0]
            if text is None:
                want = {"img2txt": cross_reference(q[batch], k[batch], mask, scale, members)}
            else:
                want = reference_at(q[batch], k[batch], mask, scale, text, image, members)
            for direction, expected in want.items():
                stored = ds[f"{direction}_tokens"].isel(step=step, layer=layer).values
                np.testing.assert_allclose(
                    stored, expected.numpy().reshape(stored.shape), rtol=bound + 1e-5, atol=1e-6
                )
