"""Joint sequences in any order: image first (SD3), a reference image after (FLUX.2, Kontext)."""

from __future__ import annotations

import pytest
import torch
from references import NEG_INF, reference_at

from tracer.capture import attention_maps
from tracer.layout import canonical_order, reorder

# (text_start, text_len, image_start, n_image, n_tokens): where the tokens sit.
LAYOUTS = {
    "text, image": (0, 7, 7, 12, 19),
    "image, text": (12, 7, 0, 12, 19),
    "text, image, reference": (0, 7, 7, 12, 25),
    "image, text, reference": (12, 7, 0, 12, 25),
    "reference, text, image": (6, 7, 13, 12, 25),
}


def _mask(kind: str, gen: torch.Generator, heads: int, n: int) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "bool keys [1, 1, 1, N]":
        keys = torch.rand(1, 1, 1, n, generator=gen) < 0.7
        keys[..., 0] = True
        return keys
    allowed = torch.rand(heads, n, n, generator=gen) < 0.7
    allowed[0, 3] = False  # a query row forbidden entirely, in one head
    return torch.where(allowed, torch.randn(heads, n, n, generator=gen), NEG_INF)


@pytest.mark.parametrize("kernel_lse", [False, True], ids=["recompute", "kernel lse"])
@pytest.mark.parametrize("mask_kind", ["none", "bool keys [1, 1, 1, N]", "float [H, N, N]"])
@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_every_layout_matches_float64(layout: str, mask_kind: str, kernel_lse: bool) -> None:
    text_start, text_len, image_start, n_image, n = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(11)
    heads, dim = 3, 8
    q = torch.randn(heads, n, dim, generator=gen)
    k = torch.randn(heads, n, dim, generator=gen)
    mask = _mask(mask_kind, gen, heads, n)
    members = torch.rand(4, text_len, generator=gen) < 0.4
    members[:, 0] = True
    scale = dim**-0.5
    text = range(text_start, text_start + text_len)
    image = range(image_start, image_start + n_image)
    lse = None
    if kernel_lse:
        # What a kernel hands over: each row's log-sum-exp over all keys (0 for a dead row).
        logits = torch.einsum("hid,hjd->hij", q.double(), k.double()) * scale
        if mask is not None:
            m = mask[0] if mask.dim() == 4 else mask
            logits = logits.masked_fill(~m, NEG_INF) if m.dtype == torch.bool else logits + m
        lse = torch.logsumexp(logits, dim=-1).float().nan_to_num(neginf=0.0)

    order = canonical_order(n, text_start, text_len, image_start, n_image)
    assert (order is None) == (text_start == 0 and image_start == text_len)
    q2, k2, mask2, lse2 = (q, k, mask, lse) if order is None else reorder(order, q, k, mask, lse)
    got = attention_maps(
        q2, k2, mask=mask2, scale=scale, text_len=text_len, n_image=n_image,
        span_members=members, lse=lse2,
    )  # fmt: skip

    want = reference_at(q, k, mask, scale, text, image, members)
    for direction, expected in want.items():
        assert got[direction].shape == (heads, 4, n_image)
        torch.testing.assert_close(got[direction].double(), expected, atol=1e-6, rtol=1e-5)


def test_n_image_out_of_range_names_the_bound() -> None:
    q = torch.randn(2, 10, 4)
    members = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"n_image must be in \[1, 7\].*got 8"):
        attention_maps(q, q, mask=None, scale=0.5, text_len=3, n_image=8, span_members=members)
