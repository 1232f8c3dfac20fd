"""tracer.capture against an explicit float64 reference (full N x N softmax, then slice)."""

from __future__ import annotations

import math
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from references import NEG_INF, allocation_sizes, cross_reference, reference

from tracer.capture import attention_maps, cross_attention_maps

ATOL, RTOL = 1e-6, 1e-5

MASK_KINDS = (
    "none",
    "bool [N, N]",
    "bool [H, N, N]",
    "bool [1, 1, N, N]",
    "bool [N] (keys)",
    "float [1, N, N]",
    "float [H, N, N]",
    "float [1, 1, N, N]",
    "float [H, N, 1]",
)


# --------------------------------------------------------------------------------------------
# Reference and input builders


def make_members(gen: torch.Generator, n_spans: int, text_len: int, density: float) -> torch.Tensor:
    members = torch.rand(n_spans, text_len, generator=gen) < density
    # Every span needs a token; pick one at random so spans do not all start at token 0.
    first = torch.randint(0, text_len, (n_spans,), generator=gen)
    members[torch.arange(n_spans), first] = True
    return members


def make_mask(
    kind: str, gen: torch.Generator, heads: int, n: int, dead_rows: int, dtype: torch.dtype
) -> torch.Tensor | None:
    """A random mask of `kind`; `dead_rows` query rows forbidden entirely (some heads for
    per-head masks), at random positions among text and image queries."""
    if kind == "none":
        return None
    if kind == "bool [N] (keys)":
        keys = torch.rand(n, generator=gen) < 0.8
        keys[torch.randint(0, n, (1,), generator=gen)] = True
        return keys
    shape = {
        "bool [N, N]": (n, n),
        "bool [H, N, N]": (heads, n, n),
        "bool [1, 1, N, N]": (1, 1, n, n),
        "float [1, N, N]": (1, n, n),
        "float [H, N, N]": (heads, n, n),
        "float [1, 1, N, N]": (1, 1, n, n),
        "float [H, N, 1]": (heads, n, 1),
    }[kind]
    allowed = torch.rand(shape, generator=gen) < 0.7
    rows = torch.randint(0, n, (dead_rows,), generator=gen)
    if kind.endswith("[H, N, N]"):
        # Per-head masks: the row dies in head 0 only, the other heads keep it.
        allowed[0, rows] = False
    else:
        allowed[..., rows, :] = False
    if kind.startswith("bool"):
        return allowed
    bias = torch.randn(shape, generator=gen, dtype=torch.float32)
    return torch.where(allowed, bias, NEG_INF).to(dtype)


def assert_matches(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, expected in want.items():
        actual = got[name]
        assert actual.dtype == torch.float32, name
        assert actual.shape == expected.shape, name
        assert not actual.isnan().any(), name
        torch.testing.assert_close(
            actual.double(), expected, atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"{n}: {m}"
        )


# --------------------------------------------------------------------------------------------
# Exactness against the reference


@settings(max_examples=120, deadline=None)
@given(
    heads=st.integers(1, 3),
    dim=st.integers(1, 9),
    text_len=st.integers(1, 12),
    n_image=st.integers(1, 24),
    n_spans=st.integers(1, 12),  # more spans than head dims is exercised (dim >= 1)
    density=st.sampled_from([0.0, 0.3, 1.0]),
    chunk_size=st.sampled_from([1, 2, 3, 5, 7, 64, 256]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    mask_kind=st.sampled_from(MASK_KINDS),
    dead_rows=st.integers(0, 3),
    scale_factor=st.floats(0.25, 2.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_float64_reference(
    heads: int,
    dim: int,
    text_len: int,
    n_image: int,
    n_spans: int,
    density: float,
    chunk_size: int,
    dtype: torch.dtype,
    mask_kind: str,
    dead_rows: int,
    scale_factor: float,
    seed: int,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    n = text_len + n_image
    q = torch.randn(heads, n, dim, generator=gen).to(dtype)
    k = torch.randn(heads, n, dim, generator=gen).to(dtype)
    members = make_members(gen, n_spans, text_len, density)
    mask = make_mask(mask_kind, gen, heads, n, dead_rows, dtype)
    scale = scale_factor / math.sqrt(dim)
    inputs = [t.clone() for t in (q, k, members) + ((mask,) if mask is not None else ())]

    got = attention_maps(
        q, k, mask=mask, scale=scale, text_len=text_len, span_members=members, chunk_size=chunk_size
    )

    assert_matches(got, reference(q, k, mask, scale, text_len, members))
    # The model's tensors are only read.
    for before, after in zip(inputs, (q, k, members, mask), strict=False):
        assert torch.equal(before, after)


@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("chunk_size", [1, 5, 256])
def test_every_mask_kind(mask_kind: str, chunk_size: int) -> None:
    gen = torch.Generator().manual_seed(7)
    heads, dim, text_len, n_image = 3, 8, 9, 30
    n = text_len + n_image
    q = torch.randn(heads, n, dim, generator=gen)
    k = torch.randn(heads, n, dim, generator=gen)
    members = make_members(gen, 4, text_len, 0.3)
    mask = make_mask(mask_kind, gen, heads, n, 2, torch.float32)
    got = attention_maps(
        q, k, mask=mask, scale=dim**-0.5, text_len=text_len, span_members=members,
        chunk_size=chunk_size,
    )  # fmt: skip
    assert_matches(got, reference(q, k, mask, dim**-0.5, text_len, members))


def test_flux_like_shapes_bf16() -> None:
    # FLUX's text length, a non-square grid, more spans than fit one chunk of rows.
    gen = torch.Generator().manual_seed(3)
    heads, dim, text_len, n_image = 2, 64, 512, 6 * 10
    n = text_len + n_image
    q = torch.randn(heads, n, dim, generator=gen).bfloat16()
    k = torch.randn(heads, n, dim, generator=gen).bfloat16()
    members = make_members(gen, 6, text_len, 0.05)
    members[0, :77] = True  # a whole-prompt span
    mask = make_mask("bool [N, N]", gen, heads, n, 3, torch.bfloat16)
    got = attention_maps(
        q, k, mask=mask, scale=dim**-0.5, text_len=text_len, span_members=members, chunk_size=48
    )
    assert_matches(got, reference(q, k, mask, dim**-0.5, text_len, members))


def test_more_spans_than_head_dims() -> None:
    gen = torch.Generator().manual_seed(11)
    heads, dim, text_len, n_image = 2, 4, 40, 17
    n = text_len + n_image
    q = torch.randn(heads, n, dim, generator=gen)
    k = torch.randn(heads, n, dim, generator=gen)
    members = torch.eye(text_len, dtype=torch.bool)  # one span per token: S = 40 > D = 4
    got = attention_maps(
        q, k, mask=None, scale=0.5, text_len=text_len, span_members=members, chunk_size=6
    )
    assert_matches(got, reference(q, k, None, 0.5, text_len, members))
    # One span per text key: summed over spans, img2txt is the text share of each image query.
    text_share = reference(q, k, None, 0.5, text_len, torch.ones(1, text_len, dtype=torch.bool))
    torch.testing.assert_close(
        got["img2txt"].double().sum(1, keepdim=True), text_share["img2txt"], atol=ATOL, rtol=RTOL
    )


# --------------------------------------------------------------------------------------------
# Fully masked rows


@pytest.mark.parametrize("boolean", [True, False])
def test_fully_masked_rows_give_exact_zeros(boolean: bool) -> None:
    gen = torch.Generator().manual_seed(5)
    heads, dim, text_len, n_image = 2, 8, 6, 20
    n = text_len + n_image
    q = torch.randn(heads, n, dim, generator=gen)
    k = torch.randn(heads, n, dim, generator=gen)
    members = torch.zeros(2, text_len, dtype=torch.bool)
    members[0, [1, 2]] = True
    members[1, [2, 4]] = True
    allowed = torch.ones(heads, n, n, dtype=torch.bool)
    allowed[:, [1, 2]] = False  # every query of span 0: its txt2img map must be zeros
    allowed[1, 4] = False  # span 1 loses one of its queries in head 1 only
    allowed[:, text_len + 3] = False  # one image query in every head
    allowed[0, text_len + 7] = False  # another image query, in head 0 only
    mask = allowed if boolean else torch.zeros(heads, n, n).masked_fill(~allowed, NEG_INF)

    got = attention_maps(
        q, k, mask=mask, scale=0.3, text_len=text_len, span_members=members, chunk_size=4
    )

    assert torch.equal(got["txt2img"][:, 0], torch.zeros(heads, n_image))
    assert torch.equal(got["img2txt"][:, :, 3], torch.zeros(heads, 2))
    assert torch.equal(got["img2txt"][0, :, 7], torch.zeros(2))
    assert (got["img2txt"][1, :, 7] > 0).all()
    # A dead query still counts in its span's mean (as zeros), it does not renormalise it.
    assert_matches(got, reference(q, k, mask, 0.3, text_len, members))


def test_everything_masked_gives_zeros_not_nan() -> None:
    heads, n, text_len = 2, 12, 4
    q = torch.randn(heads, n, 4)
    k = torch.randn(heads, n, 4)
    members = torch.ones(1, text_len, dtype=torch.bool)
    for mask in (torch.zeros(n, n, dtype=torch.bool), torch.full((1, n, n), NEG_INF)):
        got = attention_maps(
            q, k, mask=mask, scale=1.0, text_len=text_len, span_members=members, chunk_size=3
        )
        for name, value in got.items():
            assert torch.equal(value, torch.zeros(heads, 1, n - text_len)), name


def test_kernels_returning_nan_for_masked_rows_are_zeroed(monkeypatch) -> None:
    # Torch's CPU kernels return 0 for a fully masked row; others (older or CUDA ones) give NaN.
    import tracer.capture as capture

    real = torch.nn.functional.scaled_dot_product_attention

    def nan_for_dead_rows(query, key, value, attn_mask=None, **kwargs):
        out = real(query, key, value, attn_mask=attn_mask, **kwargs)
        if attn_mask is not None:
            allowed = attn_mask if attn_mask.dtype == torch.bool else ~torch.isneginf(attn_mask)
            out = out.masked_fill(~allowed.any(-1, keepdim=True), float("nan"))
        return out

    # White box: capture reaches the kernel through its module-level `F`.
    fake = types.SimpleNamespace(
        scaled_dot_product_attention=nan_for_dead_rows, pad=torch.nn.functional.pad
    )
    monkeypatch.setattr(capture, "F", fake)
    gen = torch.Generator().manual_seed(9)
    heads, dim, text_len, n_image = 2, 8, 5, 12
    n = text_len + n_image
    q = torch.randn(heads, n, dim, generator=gen)
    k = torch.randn(heads, n, dim, generator=gen)
    members = make_members(gen, 3, text_len, 0.5)
    for kind in ("bool [H, N, N]", "float [1, N, N]"):
        mask = make_mask(kind, gen, heads, n, 4, torch.float32)
        mask[..., text_len + 2, :] = False if mask.dtype == torch.bool else NEG_INF
        got = attention_maps(
            q, k, mask=mask, scale=0.4, text_len=text_len, span_members=members, chunk_size=3
        )
        assert torch.equal(got["img2txt"][..., 2], torch.zeros(heads, 3))
        assert_matches(got, reference(q, k, mask, 0.4, text_len, members))


@pytest.mark.parametrize("backend", ["MATH", "FLASH_ATTENTION"])
def test_each_cpu_attention_kernel(backend: str) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator().manual_seed(4)
    heads, dim, text_len, n_image = 3, 16, 20, 37
    n = text_len + n_image
    q = torch.randn(heads, n, dim, generator=gen).bfloat16()
    k = torch.randn(heads, n, dim, generator=gen).bfloat16()
    members = make_members(gen, 5, text_len, 0.2)
    mask = make_mask("float [H, N, N]", gen, heads, n, 3, torch.bfloat16)
    with sdpa_kernel(getattr(SDPBackend, backend)):
        got = attention_maps(
            q, k, mask=mask, scale=0.25, text_len=text_len, span_members=members, chunk_size=8
        )
    assert_matches(got, reference(q, k, mask, 0.25, text_len, members))


# --------------------------------------------------------------------------------------------
# Interface


def test_directions_shapes_and_placement() -> None:
    heads, n, text_len, dim = 3, 20, 5, 8
    q = torch.randn(heads, n, dim)
    k = torch.randn(heads, n, dim)
    members = torch.ones(2, text_len, dtype=torch.bool)
    kwargs = {"mask": None, "scale": 0.3, "text_len": text_len, "span_members": members}
    both = attention_maps(q, k, **kwargs)
    assert list(both) == ["txt2img", "img2txt"]
    for value in both.values():
        assert value.shape == (heads, 2, n - text_len)
        assert value.dtype == torch.float32
        assert value.device == q.device
        assert value.is_contiguous()
    only = attention_maps(q, k, directions=("img2txt",), **kwargs)
    assert list(only) == ["img2txt"]
    assert torch.equal(only["img2txt"], both["img2txt"])
    only = attention_maps(q, k, directions=["txt2img"], **kwargs)
    assert list(only) == ["txt2img"]
    assert torch.equal(only["txt2img"], both["txt2img"])


def test_probabilities_sum_as_expected() -> None:
    # Independent of the reference: one span holding every text token.
    gen = torch.Generator().manual_seed(1)
    heads, n, text_len, dim = 2, 30, 10, 8
    q = torch.randn(heads, n, dim, generator=gen)
    k = torch.randn(heads, n, dim, generator=gen)
    members = torch.ones(1, text_len, dtype=torch.bool)
    got = attention_maps(q, k, mask=None, scale=1.0, text_len=text_len, span_members=members)
    # Text queries spread their mass over text and image keys: image share in (0, 1).
    share = got["txt2img"].sum(-1)
    assert ((share > 0) & (share < 1)).all()
    # With text keys removed, no image query reads text at all.
    no_text = torch.ones(n, n, dtype=torch.bool)
    no_text[text_len:, :text_len] = False
    got = attention_maps(q, k, mask=no_text, scale=1.0, text_len=text_len, span_members=members)
    assert torch.equal(got["img2txt"], torch.zeros(heads, 1, n - text_len))


def test_requires_grad_inputs_give_plain_outputs() -> None:
    q = torch.randn(2, 10, 4, requires_grad=True)
    k = torch.randn(2, 10, 4, requires_grad=True)
    members = torch.ones(1, 3, dtype=torch.bool)
    got = attention_maps(q, k, mask=None, scale=0.5, text_len=3, span_members=members)
    assert not any(value.requires_grad for value in got.values())


# --------------------------------------------------------------------------------------------
# Errors


def _call(**overrides):
    heads, n, text_len, dim = 2, 10, 4, 8
    kwargs = {
        "q": torch.randn(heads, n, dim),
        "k": torch.randn(heads, n, dim),
        "mask": None,
        "scale": 0.3,
        "text_len": text_len,
        "span_members": torch.ones(2, text_len, dtype=torch.bool),
    }
    kwargs.update(overrides)
    q, k = kwargs.pop("q"), kwargs.pop("k")
    return attention_maps(q, k, **kwargs)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"q": torch.randn(1, 2, 10, 8)}, r"q must be \[H, N, D\].*\(1, 2, 10, 8\)"),
        ({"k": torch.randn(2, 10)}, r"k must be \[H, N, D\].*\(2, 10\)"),
        ({"k": torch.randn(2, 11, 8)}, r"same shape.*\(2, 10, 8\).*\(2, 11, 8\)"),
        ({"q": torch.ones(2, 10, 8, dtype=torch.int64)}, r"q must be a floating-point"),
        ({"mask": torch.ones(10, 11, dtype=torch.bool)}, r"\(10, 11\).*\[2, 10, 10\]"),
        ({"mask": torch.ones(3, 10, 10, dtype=torch.bool)}, r"\(3, 10, 10\).*\[2, 10, 10\]"),
        ({"mask": torch.ones(2, 1, 10, 10, dtype=torch.bool)}, r"\(2, 1, 10, 10\)"),
        ({"mask": torch.ones(10, 10, dtype=torch.int32)}, r"mask must be bool or floating"),
        ({"text_len": 0}, r"text_len must be in \[1, 9\].*got 0"),
        ({"text_len": 10}, r"text_len must be in \[1, 9\].*got 10"),
        ({"text_len": -1}, r"text_len must be in \[1, 9\].*got -1"),
        ({"text_len": 4.0}, r"text_len must be an int"),
        ({"span_members": torch.ones(2, 5, dtype=torch.bool)}, r"\[S >= 1, 4\].*\(2, 5\)"),
        ({"span_members": torch.ones(4, dtype=torch.bool)}, r"\[S >= 1, 4\].*\(4,\)"),
        ({"span_members": torch.ones(0, 4, dtype=torch.bool)}, r"\[S >= 1, 4\].*\(0, 4\)"),
        ({"span_members": torch.ones(2, 4)}, r"span_members must be bool"),
        (
            {"span_members": torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)},
            r"span\(s\) at index \[1\].*no text token",
        ),
        (
            {"directions": ("txt2img", "img2img")},
            r"directions must name each of .*\['img2img'\] unknown",
        ),
        ({"directions": ()}, r"at least one; got \[\]"),
        ({"chunk_size": 0}, r"chunk_size must be a positive int"),
    ],
)
def test_bad_arguments_raise_value_error(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _call(**overrides)


# --------------------------------------------------------------------------------------------
# Memory


@pytest.mark.parametrize("mask_kind", ["none", "bool [N, N]", "float [1, N, N]"])
def test_memory_is_bounded_by_the_chunk(mask_kind: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator().manual_seed(2)
    heads, dim, text_len, n_image, chunk = 2, 8, 64, 960, 16
    n = text_len + n_image
    q = torch.randn(heads, n, dim, generator=gen)
    k = torch.randn(heads, n, dim, generator=gen)
    members = make_members(gen, 3, text_len, 0.5)  # ~ 40 text queries: several chunks
    mask = make_mask(mask_kind, gen, heads, n, 0, torch.float32)
    block = heads * chunk * n * 4  # one chunk of float32 rows
    full = heads * n * n * 4  # what a per-head N x N map would take
    assert full >= 32 * block

    # The measurement itself must see a materialised map.
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.softmax(q @ k.transpose(1, 2), dim=-1)
    assert max(allocation_sizes(prof)) >= full

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        attention_maps(
            q, k, mask=mask, scale=0.3, text_len=text_len, span_members=members, chunk_size=chunk
        )
    largest = max(allocation_sizes(prof))
    assert largest <= 1.5 * block, f"largest allocation {largest} B > 1.5 x {block} B"


# --------------------------------------------------------------------------------------------
# Cross-attention: image queries against text keys only (Sana)


@pytest.mark.parametrize(
    "mask_kind", ["none", "bool keys", "float [1, H, 1, T]", "bool [P, T] with dead rows"]
)
@pytest.mark.parametrize("n_spans", [3, 40], ids=["few spans", "more spans than head dims"])
def test_cross_attention_img2txt_matches_float64_reference(mask_kind, n_spans) -> None:
    gen = torch.Generator().manual_seed(11)
    heads, n_image, text_len, dim = 3, 35, 13, 16
    q = torch.randn(heads, n_image, dim, generator=gen)
    k = torch.randn(heads, text_len, dim, generator=gen)
    mask = {
        "none": None,
        "bool keys": torch.arange(text_len) < 9,
        # Sana's: padding as an additive -10000 bias, per head.
        "float [1, H, 1, T]": torch.where(torch.arange(text_len) < 9, 0.0, -10000.0).expand(
            1, heads, 1, text_len
        ),
        "bool [P, T] with dead rows": (torch.rand(n_image, text_len, generator=gen) < 0.6)
        & (torch.arange(n_image) % 7 != 0)[:, None],
    }[mask_kind]
    members = make_members(gen, n_spans, text_len, 0.3)
    scale = dim**-0.5
    got = cross_attention_maps(q, k, mask=mask, scale=scale, span_members=members, chunk_size=8)
    assert list(got) == ["img2txt"]
    want = cross_reference(q, k, mask, scale, members)
    torch.testing.assert_close(got["img2txt"].double(), want, atol=ATOL, rtol=RTOL)
    if mask_kind == "bool [P, T] with dead rows":
        assert not got["img2txt"][:, :, ::7].any()  # rows the mask forbids: exactly zero


def test_cross_attention_rejects_keys_of_another_width() -> None:
    q, k = torch.randn(2, 5, 8), torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"same heads and head dim \[H, ·, D\]"):
        cross_attention_maps(
            q, k, mask=None, scale=1.0, span_members=torch.ones(1, 3, dtype=torch.bool)
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_video_cross_attentions_memory_is_bounded_by_the_chunk(dtype) -> None:
    """Many video queries against a few text keys (Wan): besides the maps returned, nothing the
    capture allocates grows with the number of queries, whatever the model's precision."""
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator().manual_seed(5)
    heads, n_video, text_len, dim, chunk, n_spans = 2, 6144, 24, 32, 64, 3
    q = torch.randn(heads, n_video, dim, generator=gen).to(dtype)
    k = torch.randn(heads, text_len, dim, generator=gen).to(dtype)
    members = make_members(gen, n_spans, text_len, 0.3)
    maps_bytes = heads * n_spans * n_video * 4  # the result itself
    queries_in_float32 = heads * n_video * dim * 4  # what converting all queries at once takes
    assert queries_in_float32 >= 8 * maps_bytes // 3
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        got = cross_attention_maps(
            q, k, mask=None, scale=dim**-0.5, span_members=members, chunk_size=chunk
        )
    sizes = sorted(allocation_sizes(prof), reverse=True)
    assert sizes[0] == maps_bytes
    assert sizes[1] <= 4 * heads * chunk * max(dim, text_len) * 4, sizes[:4]
    want = cross_reference(q.float(), k.float(), None, dim**-0.5, members)
    torch.testing.assert_close(got["img2txt"].double(), want, atol=ATOL, rtol=RTOL)
