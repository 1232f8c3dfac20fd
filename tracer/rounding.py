"""Bit rounding of float32 maps in torch, on whatever device they are: before they are copied.

The same rounding as numcodecs' `BitRound` (keep `keepbits` mantissa bits, round half to even),
done where the maps are made, so that the bytes leaving the GPU already compress and the store
needs no codec outside the Zarr v3 spec. Relative error <= 2**-(keepbits + 1).
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

MANTISSA_BITS = 23  # float32

Maps = TypeVar("Maps", torch.Tensor, np.ndarray)


def bitround_(maps: Maps, keepbits: int | None) -> Maps:
    """Round float32 maps in place to `keepbits` mantissa bits (None: leave them); returns them.

    A torch tensor is rounded where it is (on the GPU, before the copy); a NumPy array (a host
    buffer the writer's threads fill) with NumPy: a torch op on a thread other than the
    model's starts an OpenMP team of that thread's own, and while it lives the model's own
    team is throttled (each of its parallel regions waits on a sleeping worker), which slowed
    every denoiser call by a third on a 2-core CPU.
    """
    if keepbits is None or keepbits >= MANTISSA_BITS:
        return maps
    if maps.dtype not in (torch.float32, np.float32):
        raise TypeError(f"bit rounding works on float32 maps, got {maps.dtype}")
    drop = MANTISSA_BITS - keepbits
    # Add half a quantum less one, plus the lowest kept bit: ties go to the even neighbour.
    half = (1 << (drop - 1)) - 1
    if isinstance(maps, np.ndarray):
        bits = maps.view(np.int32)
        carry = np.right_shift(bits, drop)
        np.bitwise_and(carry, 1, out=carry)
        carry += half
        bits += carry
        np.bitwise_and(bits, -(1 << drop), out=bits)
        return maps
    bits = maps.view(torch.int32)
    bits.add_(bits.bitwise_right_shift(drop).bitwise_and_(1).add_(half))
    bits.bitwise_and_(-(1 << drop))
    return maps
