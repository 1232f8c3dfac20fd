"""Bit rounding in torch and NumPy is numcodecs' BitRound, bit for bit (the reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numcodecs import BitRound

from analysis.errors import UsageError
from tracer.rounding import bitround_, keepbits_for

SPECIAL = np.array(
    [0.0, -0.0, 1.0, -1.0, 1.5, 3.4e38, -3.4e38, 1e-45, 1e-38, np.inf, -np.inf, np.nan],
    dtype=np.float32,
)


@pytest.mark.parametrize("kind", ["torch", "numpy"])
@pytest.mark.parametrize("keepbits", [1, 3, 7, 9, 16, 22])
def test_bitround_equals_numcodecs_bit_for_bit(keepbits, kind):
    rng = np.random.default_rng(keepbits)
    values = np.concatenate(
        [
            rng.lognormal(-8, 3, 100_000).astype(np.float32),
            -rng.lognormal(0, 2, 10_000).astype(np.float32),
            # Exact ties: a kept mantissa then exactly half a quantum.
            (1.0 + (np.arange(64) + 0.5) * 2.0**-keepbits).astype(np.float32),
            SPECIAL,
        ]
    )
    want = BitRound(keepbits=keepbits).encode(values.copy()).view(np.int32)
    maps = torch.from_numpy(values.copy()) if kind == "torch" else values.copy()
    got = np.asarray(bitround_(maps, keepbits)).view(np.int32)
    np.testing.assert_array_equal(got, want)


def test_the_stated_bound_holds_and_lossless_leaves_maps_alone():
    values = np.random.default_rng(0).lognormal(-8, 2, 10_000).astype(np.float32)
    rounded = bitround_(torch.from_numpy(values.copy()), 9).numpy()
    assert np.all(np.abs(rounded - values) <= 2.0**-10 * values)
    assert np.any(rounded != values)
    same = torch.from_numpy(values.copy())
    assert bitround_(same, None) is same and np.array_equal(same.numpy(), values)
    with pytest.raises(TypeError, match=r"float32 maps, got torch\.bfloat16"):
        bitround_(torch.ones(3, dtype=torch.bfloat16), 9)
    with pytest.raises(TypeError, match=r"float32 maps, got float64"):
        bitround_(np.ones(3), 9)


@pytest.mark.parametrize(
    ("dtype", "keepbits"),
    [
        (torch.bfloat16, 7),
        (torch.float16, 9),
        (torch.float32, 9),
        (torch.float8_e4m3fn, 9),
        (None, 9),
    ],
)
def test_the_model_precision_is_bf16s_7_bits_for_a_bf16_model_and_9_otherwise(dtype, keepbits):
    """bf16 has 7 mantissa bits; float16's 10 and float32's 23 are capped at the format's 9."""
    assert keepbits_for("model", dtype) == keepbits
    assert keepbits_for(5, dtype) == 5 and keepbits_for(None, dtype) is None


@pytest.mark.parametrize("setting", [0, 24, "float16", 7.5, True])
def test_a_bad_keepbits_names_what_is_accepted(setting):
    with pytest.raises(UsageError, match=r"1\.\.23 .* None for lossless or 'model'"):
        keepbits_for(setting, torch.bfloat16)
