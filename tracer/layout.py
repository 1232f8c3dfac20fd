"""Putting a joint sequence in the capture's order: text tokens, then image tokens, then the rest.

Families lay their joint attention out differently (SD3 puts the image tokens first, FLUX the
text). The capture math reads text first and image next; other tokens, such as a reference
image's, join the softmax but get no map. A permutation of the keys changes no softmax value, so
reordering q, k, the mask and the log-sum-exp together keeps every map exact.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["canonical_order", "reorder"]


# One layout per run: built (and sent to the device) once, not on every attention call.
@functools.lru_cache(maxsize=16)
def canonical_order(
    n_tokens: int,
    text_start: int,
    text_len: int,
    image_start: int,
    n_image: int,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """The positions of the sequence in capture order, on `device`, or None when it is in that
    order already."""
    text = range(text_start, text_start + text_len)
    image = range(image_start, image_start + n_image)
    if text_start == 0 and image_start == text_len:
        return None
    taken = set(text).union(image)
    rest = [p for p in range(n_tokens) if p not in taken]
    return torch.tensor([*text, *image, *rest], dtype=torch.long, device=device)


def reorder(
    order: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor | None,
    lse: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """q, k `[H, N, D]`, a mask broadcastable to `[H, N, N]` and lse `[H, N]`, in `order` (on
    their device)."""
    n_tokens = query.shape[1]
    query, key = query.index_select(1, order), key.index_select(1, order)
    if lse is not None:
        lse = lse.index_select(1, order)
    if mask is not None:
        index = order.to(mask.device)  # a no-op but for a mask kept elsewhere
        for dim in (-2, -1):
            if mask.dim() >= -dim and mask.shape[dim] == n_tokens:
                mask = mask.index_select(dim, index)
    return query, key, mask, lse
