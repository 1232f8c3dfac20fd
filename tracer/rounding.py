"""Bit rounding of float32 maps in torch, on whatever device they are: before they are copied.

The same rounding as numcodecs' `BitRound` (keep `keepbits` mantissa bits, round half to even),
done where the maps are made, so that the bytes leaving the GPU already compress and the store
needs no codec outside the Zarr v3 spec. Relative error <= 2**-(keepbits + 1).
"""

from __future__ import annotations

import torch

MANTISSA_BITS = 23  # float32


def bitround_(maps: torch.Tensor, keepbits: int | None) -> torch.Tensor:
    """Round a float32 tensor in place to `keepbits` mantissa bits (None: leave it); returns it."""
    if keepbits is None or keepbits >= MANTISSA_BITS:
        return maps
    if maps.dtype != torch.float32:
        raise TypeError(f"bit rounding works on float32 maps, got {maps.dtype}")
    drop = MANTISSA_BITS - keepbits
    bits = maps.view(torch.int32)
    # Add half a quantum less one, plus the lowest kept bit: ties go to the even neighbour.
    bits.add_(bits.bitwise_right_shift(drop).bitwise_and_(1).add_((1 << (drop - 1)) - 1))
    bits.bitwise_and_(-(1 << drop))
    return maps
