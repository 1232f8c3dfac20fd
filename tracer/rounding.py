"""Bit rounding of float32 maps in torch, on whatever device they are: before they are copied.

The same rounding as numcodecs' `BitRound` (keep `keepbits` mantissa bits, round half to even),
done where the maps are made, so that the bytes leaving the GPU already compress and the store
needs no codec outside the Zarr v3 spec. Relative error <= 2**-(keepbits + 1).
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

from analysis import store_format as fmt
from analysis.errors import UsageError

MANTISSA_BITS = 23  # float32

# The keepbits setting that keeps the precision the model computes in (keepbits_for), and what it
# keeps: bf16's 7 mantissa bits; the format's default for float32 and float16 (10 bits) models.
MODEL_PRECISION = "model"
_MODEL_KEEPBITS = {torch.bfloat16: 7}

Maps = TypeVar("Maps", torch.Tensor, np.ndarray)


def keepbits_for(setting: int | str | None, dtype: torch.dtype | None) -> int | None:
    """The mantissa bits a recording keeps of a model computing in `dtype` (None: unknown):
    `setting` itself (None: lossless), or for MODEL_PRECISION bf16's 7 for a bf16 model and the
    format's default (9) otherwise. A bf16 attention kernel rounds its probabilities to bf16
    before they weigh the values: bits past those the model never used."""
    if isinstance(setting, str) and setting == MODEL_PRECISION:
        return _MODEL_KEEPBITS.get(dtype, fmt.DEFAULT_KEEPBITS)
    try:
        return fmt.check_keepbits(setting)
    except UsageError:
        raise UsageError(
            f"keepbits must be an integer in 1..{MANTISSA_BITS} (float32 mantissa bits kept), "
            f"None for lossless or {MODEL_PRECISION!r} (the model's own precision), got {setting!r}"
        ) from None


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
