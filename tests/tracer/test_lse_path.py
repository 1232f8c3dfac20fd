"""The log-sum-exp path: the tap fetches each row's normaliser from the model's own kernel, and
img2txt is computed from it for the span keys only. Each path is forced here and must give the
model's output bit for bit and the same maps as the float64 definition."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from references import NEG_INF, allocation_sizes, reference, stated_bound
from torch.nn.attention import SDPBackend, sdpa_kernel

import tracer
import tracer.capture as capture
import tracer.tap as tap
from tracer.capture import attention_maps
from tracer.demo import demo_pipeline

TEXT_LEN = 32


def exact_lse(q, k, mask, scale):
    """float64 log-sum-exp of every query row, 0 for a fully masked row (as the CPU kernel)."""
    logits = torch.einsum("hid,hjd->hij", q.double(), k.double()) * scale
    if mask is not None:
        logits = logits.masked_fill(~mask, NEG_INF) if mask.dtype == torch.bool else logits + mask
    lse = torch.logsumexp(logits, dim=-1)
    return lse.masked_fill(torch.isneginf(lse), 0.0)


def members_for(gen, n_spans, text_len):
    members = torch.rand(n_spans, text_len, generator=gen) < 0.3
    members[torch.arange(n_spans), torch.randint(0, text_len, (n_spans,), generator=gen)] = True
    return members


def make_mask(kind, gen, heads, n, dtype=torch.float32):
    """A mask as a model passes it to SDPA, with two query rows forbidden entirely."""
    if kind == "none":
        return None
    shape = {"bool [N, N]": (n, n), "bool [1, 1, N, N]": (1, 1, n, n)}.get(kind, (1, heads, n, n))
    allowed = torch.rand(shape, generator=gen) < 0.7
    allowed[..., [3, n - 2], :] = False
    if kind.startswith("bool"):
        return allowed
    bias = torch.randn(shape, generator=gen)
    return torch.where(allowed, bias, NEG_INF).to(dtype)


def squeeze_mask(mask):
    return None if mask is None else mask.reshape(mask.shape[-3:] if mask.dim() > 2 else mask.shape)


def assert_maps_close(got, want, rtol=1e-5):
    for name, expected in want.items():
        assert not got[name].isnan().any(), name
        torch.testing.assert_close(got[name].double(), expected, atol=1e-6, rtol=rtol)


# --------------------------------------------------------------------------------------------
# capture: img2txt from a given lse


@pytest.mark.parametrize("kind", ["none", "bool [N, N]", "bool [1, 1, N, N]", "float [1, H, N, N]"])
@pytest.mark.parametrize("chunk_size", [1, 7, 256])
def test_img2txt_from_exact_lse_matches_float64(kind, chunk_size):
    gen = torch.Generator().manual_seed(1)
    heads, dim, text_len, n_image = 3, 16, 11, 29
    n = text_len + n_image
    q = torch.randn(heads, n, dim, generator=gen)
    k = torch.randn(heads, n, dim, generator=gen)
    members = members_for(gen, 4, text_len)
    mask = squeeze_mask(make_mask(kind, gen, heads, n))
    lse = exact_lse(q, k, mask, 0.3).float()
    got = attention_maps(
        q, k, mask=mask, scale=0.3, text_len=text_len, span_members=members,
        chunk_size=chunk_size, lse=lse,
    )  # fmt: skip
    assert_maps_close(got, reference(q, k, mask, 0.3, text_len, members))


def token_row_members(text_len: int = 16) -> torch.Tensor:
    """Spans as a recording lays them out (one per token, in order, then the padding's) and
    more: a span over several tokens, a kept padding position (also in the padding's span) and
    a token that is a span twice, out of order."""
    spans = [[i] for i in range(9)] + [[2, 3, 4], list(range(9, text_len)), [12], [5]]
    members = torch.zeros(len(spans), text_len, dtype=torch.bool)
    for row, positions in enumerate(spans):
        members[row, positions] = True
    return members


@pytest.mark.parametrize("lse", ["from the kernel", "recomputed"])
@pytest.mark.parametrize("kind", ["none", "bool [N, N]", "float [1, H, N, N]"])
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 256])
def test_token_row_spans_match_float64(lse, kind, chunk_size):
    """Single-token spans are copied in runs that blocks of positions split; the others summed."""
    gen = torch.Generator().manual_seed(5)
    heads, dim, text_len, n_image = 3, 8, 16, 21
    n = text_len + n_image
    q = torch.randn(heads, n, dim, generator=gen)
    k = torch.randn(heads, n, dim, generator=gen)
    members = token_row_members(text_len)
    mask = squeeze_mask(make_mask(kind, gen, heads, n))
    exact = exact_lse(q, k, mask, 0.3).float() if lse == "from the kernel" else None
    got = attention_maps(
        q, k, mask=mask, scale=0.3, text_len=text_len, span_members=members,
        chunk_size=chunk_size, lse=exact,
    )  # fmt: skip
    assert_maps_close(got, reference(q, k, mask, 0.3, text_len, members))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_img2txt_from_the_cpu_kernels_lse_matches_float64(dtype):
    gen = torch.Generator().manual_seed(2)
    heads, dim, text_len, n_image = 4, 64, 64, 96
    n = text_len + n_image
    q = torch.randn(1, heads, n, dim, generator=gen).to(dtype)
    k = torch.randn(1, heads, n, dim, generator=gen).to(dtype)
    members = members_for(gen, 5, text_len)
    _, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, k, scale=0.125)
    assert lse.dtype == torch.float32
    got = attention_maps(
        q[0], k[0], mask=None, scale=0.125, text_len=text_len, span_members=members, lse=lse[0]
    )
    # The maps are as exact as the kernel's lse: torch's CPU kernel computes bf16/fp16 rows with
    # a fast exp (about 2e-5 relative), float32 ones to float32 rounding.
    rtol = 1e-5 if dtype == torch.float32 else 1e-4
    assert_maps_close(got, reference(q[0], k[0], None, 0.125, text_len, members), rtol=rtol)


def padded_prompt_members(text_len: int, tokens: int) -> torch.Tensor:
    """A recording's token rows: one per token, then the padding's row over all the rest."""
    members = torch.zeros(tokens + 1, text_len, dtype=torch.bool)
    members[range(tokens), range(tokens)] = True
    members[tokens, tokens:] = True
    return members


def kernel_lse(q, k, scale):
    """The CPU kernel's output and lse of one [1, H, N, D] attention, as the tap gets them."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, k, scale=scale)[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("directions", [("txt2img", "img2txt"), ("txt2img",), ("img2txt",)])
def test_a_padding_row_from_fused_kernels_matches_float64(monkeypatch, dtype, directions):
    """The padding's row (54 positions here) from two fused calls' log-sum-exps, the token rows
    from blocks: together the float64 definition, in the spans' order."""
    gen = torch.Generator().manual_seed(4)
    heads, dim, text_len, n_image = 3, 64, 64, 80
    n = text_len + n_image
    q = torch.randn(1, heads, n, dim, generator=gen).to(dtype)
    k = torch.randn(1, heads, n, dim, generator=gen).to(dtype)
    members = padded_prompt_members(text_len, tokens=10)
    lse = kernel_lse(q, k, 0.125)[0]
    fused = []
    real = capture.kernels.run_with_lse
    monkeypatch.setattr(
        capture.kernels,
        "run_with_lse",
        lambda kernel, bound: fused.append(kernel) or real(kernel, bound),
    )
    got = attention_maps(
        q[0], k[0], mask=None, scale=0.125, text_len=text_len, span_members=members, lse=lse,
        directions=directions, fused_spans=True,
    )  # fmt: skip
    assert fused == ["cpu_flash"] * len(directions)  # one fused call per direction, one row
    # A run's long spans go to the device once, not at every call (CUDA may make a pageable
    # copy wait for the stream).
    built = capture._long_spans.cache_info().misses
    attention_maps(
        q[0], k[0], mask=None, scale=0.125, text_len=text_len, span_members=members.clone(),
        lse=lse, directions=directions, fused_spans=True,
    )  # fmt: skip
    assert capture._long_spans.cache_info().misses == built
    want = reference(q[0], k[0], None, 0.125, text_len, members)
    # As exact as the kernels' lse (see the test above).
    rtol = 1e-5 if dtype == torch.float32 else 1e-4
    assert_maps_close(got, {name: want[name] for name in directions}, rtol=rtol)
    # Only fused rows: the padding's alone.
    alone = attention_maps(
        q[0], k[0], mask=None, scale=0.125, text_len=text_len, span_members=members[-1:],
        lse=lse, directions=directions, fused_spans=True,
    )  # fmt: skip
    assert_maps_close(alone, {name: want[name][:, -1:] for name in directions}, rtol=rtol)


def test_short_spans_a_mask_or_no_lse_keep_to_blocks(monkeypatch):
    gen = torch.Generator().manual_seed(6)
    heads, dim, text_len, n_image = 2, 16, 40, 30
    n = text_len + n_image
    q = torch.randn(1, heads, n, dim, generator=gen)
    k = torch.randn(1, heads, n, dim, generator=gen)
    monkeypatch.setattr(capture.kernels, "run_with_lse", None)  # never called
    short = padded_prompt_members(text_len, tokens=20)  # a padding row of 20 positions
    mask = squeeze_mask(make_mask("bool [N, N]", gen, heads, n))
    cases = [
        (short, None, exact_lse(q[0], k[0], None, 0.3).float()),
        (padded_prompt_members(text_len, tokens=4), mask, exact_lse(q[0], k[0], mask, 0.3).float()),
        (padded_prompt_members(text_len, tokens=4), None, None),
    ]
    for members, mask, lse in cases:
        got = attention_maps(
            q[0], k[0], mask=mask, scale=0.3, text_len=text_len, span_members=members, lse=lse,
            fused_spans=True,
        )  # fmt: skip
        assert_maps_close(got, reference(q[0], k[0], mask, 0.3, text_len, members))


@pytest.mark.cuda
def test_on_cuda_a_padding_row_comes_from_fused_kernels():
    gen = torch.Generator().manual_seed(8)
    heads, dim, text_len, n_image = 4, 128, 128, 256
    n = text_len + n_image
    q, k = (torch.randn(1, heads, n, dim, generator=gen).to("cuda", torch.bfloat16) for _ in "qk")
    members = padded_prompt_members(text_len, tokens=12)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.no_grad():
        _, call = tapped(Attention(), q, k, k)
    fused = []
    real = capture.kernels.run_with_lse
    capture.kernels.run_with_lse = lambda kernel, bound: fused.append(kernel) or real(kernel, bound)
    try:
        got = attention_maps(
            q[0], k[0], mask=None, scale=dim**-0.5, text_len=text_len, span_members=members,
            lse=call.lse[0],
        )  # fmt: skip
    finally:
        capture.kernels.run_with_lse = real
    assert len(fused) == 2  # the default on CUDA
    want = reference(q[0].cpu(), k[0].cpu(), None, dim**-0.5, text_len, members)
    for name, expected_map in want.items():
        torch.testing.assert_close(got[name].cpu().double(), expected_map, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("kind", ["none", "bool [1, N, N]", "float [1, N, N]"])
def test_strided_inputs_and_a_broadcast_mask_are_read_in_place(kind):
    """q and k as SDPA gets them from a [B, N, H, D] projection (heads not outermost) and a mask
    broadcast over the query rows: the maps equal the float64 definition, and no input is copied
    whole (a broadcast [N, N] mask would be materialised)."""
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator().manual_seed(4)
    heads, dim, text_len, n_image = 2, 64, 12, 500
    n = text_len + n_image
    q = torch.randn(n, heads, dim, generator=gen).transpose(0, 1)
    k = torch.randn(n, heads, dim, generator=gen).transpose(0, 1)
    assert not q.is_contiguous() and not k.is_contiguous()
    members = members_for(gen, 3, text_len)
    keys = torch.rand(n, generator=gen) < 0.8
    keys[[0, text_len]] = True  # every row keeps a key
    mask = None
    if kind != "none":
        bias = torch.randn(n, generator=gen)
        row = keys if kind.startswith("bool") else torch.where(keys, bias, NEG_INF)
        mask = row.expand(1, n, n)
    lse = exact_lse(q, k, mask, 0.3).float()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        got = attention_maps(
            q, k, mask=mask, scale=0.3, text_len=text_len, span_members=members, lse=lse
        )
    assert_maps_close(got, reference(q, k, mask, 0.3, text_len, members))
    whole_mask = n * n  # bytes of a bool [N, N]: the smallest input copied whole
    assert max(allocation_sizes(prof)) < min(whole_mask, q.numel() * 4)


def test_lse_of_minus_infinity_for_a_dead_row_gives_zeros():
    # Kernels other than the CPU one may report -inf for a fully masked row.
    gen = torch.Generator().manual_seed(3)
    heads, dim, text_len, n_image = 2, 8, 5, 9
    n = text_len + n_image
    q = torch.randn(heads, n, dim, generator=gen)
    k = torch.randn(heads, n, dim, generator=gen)
    members = members_for(gen, 2, text_len)
    mask = torch.ones(n, n, dtype=torch.bool)
    mask[text_len + 4] = False
    lse = exact_lse(q, k, mask, 0.5).float()
    lse[:, text_len + 4] = NEG_INF
    got = attention_maps(
        q, k, mask=mask, scale=0.5, text_len=text_len, span_members=members, lse=lse
    )
    assert torch.equal(got["img2txt"][:, :, 4], torch.zeros(heads, 2))
    assert_maps_close(got, reference(q, k, mask, 0.5, text_len, members))


@pytest.mark.parametrize("lse_shape", [(2, 20), (3, 19), (3,)])
def test_lse_of_the_wrong_shape_is_refused(lse_shape):
    q = torch.randn(3, 20, 8)
    with pytest.raises(ValueError, match="lse must be"):
        attention_maps(
            q, q, mask=None, scale=0.3, text_len=5, span_members=torch.ones(1, 5, dtype=bool),
            lse=torch.zeros(lse_shape),
        )  # fmt: skip


def test_lse_path_memory_stays_within_the_chunk_bound():
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator().manual_seed(4)
    heads, dim, text_len, n_image, chunk = 2, 8, 64, 960, 16
    n = text_len + n_image
    q = torch.randn(heads, n, dim, generator=gen)
    k = torch.randn(heads, n, dim, generator=gen)
    members = torch.ones(3, text_len, dtype=torch.bool)  # every text key: K = text_len
    lse = exact_lse(q, k, None, 0.3).float()
    block = heads * chunk * n * 4  # the bound the other paths keep
    output = heads * 3 * n_image * 4
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        attention_maps(
            q, k, mask=None, scale=0.3, text_len=text_len, span_members=members,
            directions=["img2txt"], chunk_size=chunk, lse=lse,
        )  # fmt: skip
    sizes = allocation_sizes(prof)
    assert max(sizes) <= max(1.5 * block, output)


@pytest.fixture
def capture_threads(monkeypatch):
    """The intra-op thread counts the capture's img2txt ran with, one per call."""
    seen = []
    real = capture._img2txt_from_lse

    def spy(*args):
        seen.append(torch.get_num_threads())
        return real(*args)

    monkeypatch.setattr(capture, "_img2txt_from_lse", spy)
    return seen


def test_small_captures_run_on_one_thread_and_restore_the_count(capture_threads):
    before = torch.get_num_threads()
    q = torch.randn(2, 30, 8)
    attention_maps(
        q, q, mask=None, scale=0.3, text_len=6, span_members=torch.ones(1, 6, dtype=bool),
        lse=exact_lse(q, q, None, 0.3).float(),
    )  # fmt: skip
    assert capture_threads == [1]
    assert torch.get_num_threads() == before


def test_larger_captures_run_on_the_models_threads(capture_threads):
    """Past a tiny call the capture keeps the model's thread count: on 2 idle cores a call of
    1.4e8 flops took half as long on two threads as on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        q = torch.randn(4, 32 + 512, 64)  # 4 heads × 64, 32 text and 512 image tokens
        attention_maps(
            q, q, mask=None, scale=0.125, text_len=32, span_members=torch.ones(1, 32, dtype=bool),
            lse=exact_lse(q, q, None, 0.125).float(),
        )  # fmt: skip
    finally:
        torch.set_num_threads(before)
    assert capture_threads == [2]


@pytest.fixture
def reduced_precision_matmuls():
    """The process lets float32 matmuls run in lower precision, as diffusion scripts often do
    (TF32 on CUDA, bf16 through oneDNN on the CPU); torch's defaults again afterwards."""
    torch.set_float32_matmul_precision("medium")
    yield {b: getattr(torch.backends, b).matmul.fp32_precision for b in ("cuda", "mkldnn")}
    torch.set_float32_matmul_precision("highest")
    for b in ("cuda", "mkldnn"):
        getattr(torch.backends, b).matmul.fp32_precision = "none"


def test_the_capture_computes_in_float32_whatever_the_process_allows(
    monkeypatch, reduced_precision_matmuls
):
    assert reduced_precision_matmuls == {"cuda": "tf32", "mkldnn": "bf16"}
    seen = []
    for name in ("_txt2img", "_img2txt_from_lse", "_img2txt"):
        real = getattr(capture, name)

        def spy(*args, real=real, **kwargs):
            seen.append(
                {b: getattr(torch.backends, b).matmul.fp32_precision for b in ("cuda", "mkldnn")}
            )
            return real(*args, **kwargs)

        monkeypatch.setattr(capture, name, spy)
    q = torch.randn(2, 30, 8)
    members = torch.ones(1, 6, dtype=bool)
    lse = exact_lse(q, q, None, 0.3).float()
    attention_maps(q, q, mask=None, scale=0.3, text_len=6, span_members=members, lse=lse)
    attention_maps(q, q, mask=None, scale=0.3, text_len=6, span_members=members)
    capture.cross_attention_maps(q, q[:, :6], mask=None, scale=0.3, span_members=members)
    assert len(seen) == 5 and all(s == {"cuda": "ieee", "mkldnn": "ieee"} for s in seen)
    # The process's own choice is given back, and its legacy setting agrees with it still (torch
    # raises where the two disagree).
    after = {b: getattr(torch.backends, b).matmul.fp32_precision for b in ("cuda", "mkldnn")}
    assert after == reduced_precision_matmuls
    assert torch.get_float32_matmul_precision() == "medium"
    assert torch.backends.cuda.matmul.allow_tf32


@pytest.mark.cuda
def test_maps_stay_exact_on_cuda_where_the_process_allows_tf32(reduced_precision_matmuls):
    gen = torch.Generator().manual_seed(3)
    heads, n, dim, text_len = 4, 600, 64, 88
    q, k = (torch.randn(heads, n, dim, generator=gen) * 2 for _ in range(2))
    members = members_for(torch.Generator().manual_seed(0), 3, text_len)
    lse = exact_lse(q, k, None, dim**-0.5).float()
    got = attention_maps(
        q.cuda(), k.cuda(), mask=None, scale=dim**-0.5, text_len=text_len, span_members=members,
        lse=lse.cuda(),
    )  # fmt: skip
    assert_maps_close(
        {d: m.cpu() for d, m in got.items()}, reference(q, k, None, dim**-0.5, text_len, members)
    )


# --------------------------------------------------------------------------------------------
# tap: the model's call through the kernel that returns the lse


class Attention(torch.nn.Module):
    """Calls SDPA the way diffusers does: q, k, v [B, H, N, D], optional mask."""

    def __init__(self, mask=None, scale=None):
        super().__init__()
        self.mask, self.scale = mask, scale

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, scale=self.scale)


def tapped(module, q, k, v, fetch_lse=True):
    calls = []
    tap_ = tap.AttentionTap(
        {"a": module}, lambda name: True, lambda n, c: calls.append(c), fetch_lse=fetch_lse
    )
    tap_.attach()
    try:
        out = module(q, k, v)
    finally:
        tap_.detach()
    assert len(calls) == 1
    return out, calls[0]


MASKS = ["none", "bool [N, N]", "bool [1, 1, N, N]", "float [1, H, N, N]"]


@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("scale", [None, 0.2])
def test_cpu_flash_call_is_bit_identical_and_gives_the_lse(kind, dtype, scale):
    gen = torch.Generator().manual_seed(5)
    heads, n, dim = 3, 45, 16
    q, k, v = (torch.randn(2, heads, n, dim, generator=gen).to(dtype) for _ in range(3))
    mask = make_mask(kind, gen, heads, n, dtype)
    module = Attention(mask, scale)
    with torch.no_grad():
        expected = module(q, k, v)
        assert tap._lse_kernel({"query": q, "key": k, "value": v, "attn_mask": mask}) == (
            "cpu_flash"
        )
        out, call = tapped(module, q, k, v)
    assert torch.equal(out, expected)
    assert call.lse is not None and call.lse.shape == (2, heads, n)
    s = dim**-0.5 if scale is None else scale
    m = squeeze_mask(mask)
    live = torch.isfinite(exact_lse(q[0], k[0], m, s)) & (exact_lse(q[0], k[0], m, s) != 0)
    torch.testing.assert_close(
        call.lse[0].double()[live], exact_lse(q[0], k[0], m, s)[live], atol=2e-2, rtol=0
    )


@pytest.mark.parametrize(
    "how",
    ["lse=recompute", "math kernel asked", "3-d mask (math kernel)", "autograd", "dropout"],
)  # fmt: skip
def test_other_calls_run_as_made_without_lse(how, monkeypatch):
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 30, 8, generator=gen) for _ in range(3))
    mask = torch.randn(2, 30, 30, generator=gen) if how.startswith("3-d") else None
    module = Attention(mask)
    if how == "autograd":
        q.requires_grad_(True)
    if how == "dropout":
        module.forward = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
        assert tap._lse_kernel({"query": q, "key": k, "value": v, "dropout_p": 0.5}) is None
        return
    context = sdpa_kernel(SDPBackend.MATH) if how == "math kernel asked" else torch.no_grad()
    grad = torch.enable_grad() if how == "autograd" else torch.no_grad()
    with context, grad:
        expected = module(q, k, v)
        out, call = tapped(module, q, k, v, fetch_lse=how != "lse=recompute")
    assert torch.equal(out, expected)
    assert call.lse is None


def test_a_call_sdpa_refuses_raises_its_own_error():
    q = torch.randn(1, 2, 30, 8)
    module = Attention(torch.ones(30, dtype=torch.bool))  # 1-d masks: SDPA refuses them
    with pytest.raises(IndexError), torch.no_grad():
        tapped(module, q, q, q)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"])
def test_cuda_kernels_are_bit_identical_and_give_the_lse(backend):
    gen = torch.Generator().manual_seed(7)
    heads, n, dim, text_len = 4, 300, 64, 44
    q, k, v = (
        torch.randn(1, heads, n, dim, generator=gen).to("cuda", torch.bfloat16) for _ in range(3)
    )
    module = Attention()
    with sdpa_kernel(getattr(SDPBackend, backend)), torch.no_grad():
        expected = module(q, k, v)
        out, call = tapped(module, q, k, v)
    assert torch.equal(out, expected)
    assert call.lse is not None and call.lse.shape == (1, heads, n)
    members = members_for(torch.Generator().manual_seed(0), 3, text_len)
    # bf16 q and k go into float32-output GEMMs on tensor cores (torch >= 2.8).
    assert capture._half_gemms(q[0], k[0]) == hasattr(torch.ops.aten.baddbmm, "dtype_out")
    got = attention_maps(
        q[0], k[0], mask=None, scale=dim**-0.5, text_len=text_len, span_members=members,
        lse=call.lse[0],
    )  # fmt: skip
    want = reference(q[0].cpu(), k[0].cpu(), None, dim**-0.5, text_len, members)
    for name, expected_map in want.items():
        torch.testing.assert_close(got[name].cpu().double(), expected_map, atol=1e-5, rtol=1e-3)


# --------------------------------------------------------------------------------------------
# end to end: each path through a real FLUX pipeline


@pytest.fixture(scope="module")
def pipe():
    return demo_pipeline(seed=0, max_sequence_length=TEXT_LEN)


def generate(pipe):
    return pipe(
        "a cat on a red chair",
        num_inference_steps=2,
        height=96,
        width=160,
        max_sequence_length=TEXT_LEN,
        generator=torch.Generator().manual_seed(3),
        output_type="np",
    ).images


PATHS = ["lse from the kernel", "lse=recompute", "math kernel"]


@pytest.fixture(scope="module")
def runs(pipe, tmp_path_factory):
    """Per path: (untraced output, traced output, the store's maps, lse kernels used, bound)."""
    import xarray as xr

    results = {}
    for path_name in PATHS:
        fetched = []
        real = tap._run_with_lse

        def spy(kernel, bound, real=real, fetched=fetched):
            fetched.append(kernel)
            return real(kernel, bound)

        store = tmp_path_factory.mktemp("lse") / "t.zarr"
        math_only = path_name == "math kernel"
        with sdpa_kernel(SDPBackend.MATH) if math_only else torch.no_grad():
            plain = generate(pipe)
            tap._run_with_lse = spy
            lse = "recompute" if path_name == "lse=recompute" else "kernel"
            try:
                with tracer.trace(pipe, store, progress=False, lse=lse) as rec:
                    traced = generate(pipe)
            finally:
                tap._run_with_lse = real
        ds = xr.open_zarr(store, group=rec.last_run, consolidated=False)
        maps = {name: ds[name].values for name in ("txt2img", "img2txt")}
        results[path_name] = (plain, traced, maps, fetched, stated_bound(ds.attrs))
    return results


@pytest.mark.parametrize("path_name", PATHS)
def test_each_path_leaves_the_output_bit_for_bit_unchanged(runs, path_name):
    plain, traced, _, fetched, _ = runs[path_name]
    assert np.array_equal(traced, plain)
    expected = ["cpu_flash"] * 2 * 5 if path_name == "lse from the kernel" else []
    assert fetched == expected


@pytest.mark.parametrize("path_name", PATHS[1:])
def test_each_path_stores_the_same_maps(runs, path_name):
    reference_maps, bound = runs["lse from the kernel"][2], runs["lse from the kernel"][4]
    maps = runs[path_name][2]
    for name, values in maps.items():
        # Both are exact up to float32 rounding; bit rounding may then differ by one kept bit.
        np.testing.assert_allclose(values, reference_maps[name], rtol=2 * bound + 1e-5, atol=1e-7)
        assert math.isfinite(float(values.sum()))
