"""Capture math: exact text/image attention maps of one joint-attention call.

Pure torch, no I/O. See docs/architecture.md ("Capture math") for what it guarantees and
docs/store-format.md for the definitions of ``txt2img`` and ``img2txt``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import operator
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from analysis.store_format import DIRECTIONS, check_directions
from tracer import kernels

__all__ = ["attention_maps", "cross_attention_maps"]

_NEG_INF = float("-inf")

# Below this many flops a call's capture runs on one CPU thread (see _cpu_threads_for).
_SMALL_WORK_FLOPS = 1e7

# A span of at least this many text positions (a prompt's padding row: hundreds of them) is a
# fused span where fused spans are used (attention_maps): its maps come from fused kernels.
FUSED_SPAN_POSITIONS = 32


def attention_maps(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    mask: torch.Tensor | None,
    scale: float,
    text_len: int,
    span_members: torch.Tensor,
    directions: Sequence[str] = DIRECTIONS,
    chunk_size: int = 256,
    lse: torch.Tensor | None = None,
    n_image: int | None = None,
    fused_spans: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Text/image attention maps of one batch element of a joint attention.

    ``q``, ``k``: ``[H, N, D]`` post-RoPE queries and keys; tokens ``[0, text_len)`` are text, the
    next ``n_image`` (default: all the rest) image; any after those (a reference image's tokens)
    take part in the softmax but get no map. ``mask``: ``None`` or broadcastable to
    ``[H, N, N]``, boolean (True = may attend) or additive float. ``span_members``: bool
    ``[S, text_len]``, the text tokens of each span.

    With P = softmax over all N keys of ``q·kᵀ·scale + mask`` (float32), returns for each asked
    direction a float32 ``[H, S, n_image]`` tensor on ``q``'s device:

    - ``txt2img[h, s, p]``: mean over the span's text queries i of ``P[h, i, text_len + p]``;
    - ``img2txt[h, s, p]``: sum over the span's text keys j of ``P[h, text_len + p, j]``.

    A query row that the mask forbids entirely contributes zeros. ``chunk_size`` queries are
    processed at a time (and taken to float32 then), which bounds the extra memory to about
    ``H * chunk_size * N`` floats, besides the maps returned and a float32 copy of the keys of a
    half-precision model (``H * N * D``).

    ``lse``: optional float ``[H, N]``, each query row's natural log-sum-exp over all keys of
    ``q·kᵀ·scale + mask``, as the model's attention kernel computed it (see ``tracer.tap``).
    Given, ``img2txt`` is ``exp(logit - lse)`` summed over the span keys, computed for those key
    columns only, instead of a second pass of attention over all keys.

    Keep ``span_members`` on the CPU (it is fixed for a run): it is then checked and turned into
    weights without waiting for the accelerator.

    ``fused_spans``: with the ``lse`` and no mask, compute each span of at least
    ``FUSED_SPAN_POSITIONS`` text positions (a prompt's padding row) from two fused attention
    calls' log-sum-exps (``_fused_span_maps``) instead of blocks of its positions' rows, which
    are most of the capture's work at FLUX's shape (485 of 512 text positions for a 20-word
    prompt's 28 rows). ``None``: on CUDA only; on the CPU it was no faster (bench/capture_cost.py).
    """
    wanted = check_directions(directions)
    heads, n_tokens, _ = _check_qk(q, k)
    text_len = _as_int("text_len", text_len)
    chunk_size = _as_int("chunk_size", chunk_size)
    if not 0 < text_len < n_tokens:
        raise ValueError(
            f"text_len must be in [1, {n_tokens - 1}] for N = {n_tokens} tokens (at least one "
            f"text and one image token), got {text_len}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size}")
    n_image = n_tokens - text_len if n_image is None else _as_int("n_image", n_image)
    if not 0 < n_image <= n_tokens - text_len:
        raise ValueError(
            f"n_image must be in [1, {n_tokens - text_len}] for N = {n_tokens} tokens and "
            f"text_len = {text_len}, got {n_image}"
        )
    _check_span_members(span_members, text_len)
    mask3 = _as_3d_mask(mask, heads, n_tokens)
    if lse is not None:
        _check_lse(lse, q)

    with torch.no_grad():
        fused = _fused_span_maps(
            q, k, lse, mask3, scale, text_len, n_image, span_members, wanted, fused_spans
        )
    if fused is None:
        return _block_maps(
            q, k, mask3, scale, text_len, n_image, span_members, wanted, chunk_size, lse
        )
    long, fused_maps = fused
    if long.rest_members is None:
        return fused_maps
    maps = _block_maps(
        q, k, mask3, scale, text_len, n_image, long.rest_members, wanted, chunk_size, lse
    )
    for name, block_rows in maps.items():
        out = q.new_empty(q.shape[0], span_members.shape[0], n_image, dtype=torch.float32)
        out.index_copy_(1, long.rest, block_rows)
        out.index_copy_(1, long.index, fused_maps[name])
        maps[name] = out
    return maps


def _block_maps(
    q: torch.Tensor,
    k: torch.Tensor,
    mask3: torch.Tensor | None,
    scale: float,
    text_len: int,
    n_image: int,
    span_members: torch.Tensor,
    wanted: Sequence[str],
    chunk_size: int,
    lse: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """attention_maps' maps from blocks of probabilities of the spans' positions' rows."""
    heads, n_tokens = q.shape[0], q.shape[1]
    maps: dict[str, torch.Tensor] = {}
    n_rows = int(span_members.any(dim=0).sum())  # text queries (txt2img) = span keys (img2txt)
    work = (
        2
        * heads
        * q.shape[-1]
        * (
            ("txt2img" in wanted) * n_rows * n_tokens
            + ("img2txt" in wanted) * n_image * (n_rows if lse is not None else 2 * n_tokens)
        )
    )
    # Observation only: no autograd graph (it would keep every chunk's block alive).
    with torch.no_grad(), _cpu_threads_for(work, q.device), _float32_matmuls():
        # The keys in float32 once per call (every chunk reads all of them); the queries a chunk
        # at a time, so a half-precision model's extra memory stays within the chunk's bound.
        # With the lse on CUDA, half-precision q and k go into the GEMMs as they are, with a
        # float32 output (tensor cores): their products are exact in float32, so the logits are
        # a float32 GEMM's up to the order of the sums, at several times the speed.
        gemm_keys = k if lse is not None and _half_gemms(q, k) else k.to(torch.float32)
        for direction in wanted:
            if direction == "txt2img":
                maps[direction] = _txt2img(
                    q, gemm_keys, mask3, scale, text_len, n_image, span_members, chunk_size, lse
                )
            elif lse is not None:
                maps[direction] = _img2txt_from_lse(
                    q, gemm_keys, mask3, scale, text_len, n_image, span_members, chunk_size, lse
                )
            else:
                maps[direction] = _img2txt(
                    q, gemm_keys, mask3, scale, text_len, n_image, span_members, chunk_size
                )
    return maps


def _fused_span_maps(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor | None,
    mask3: torch.Tensor | None,
    scale: float,
    text_len: int,
    n_image: int,
    span_members: torch.Tensor,
    wanted: Sequence[str],
    fused_spans: bool | None,
) -> tuple[_LongSpans, dict[str, torch.Tensor]] | None:
    """The fused spans (see attention_maps) and their maps ``[H, fused spans, n_image]``; None
    where there are none, or no fused kernel returns a log-sum-exp for these inputs.

    A span's img2txt is the sum over its keys j of exp(q_p·k_j·scale - lse_p), that is
    exp(LSE_j(q_p·k_j·scale) - lse_p): the image queries attending the span's keys alone. Its
    txt2img is the mean over its queries i of exp(q_i·k_p·scale - lse_i): the image keys, as
    queries, attending the span's queries, as keys, each with a bias -lse_i. The bias enters the
    kernel's dot product as three extra dims of those keys (-lse_i / scale, split into parts of
    q's dtype whose sum keeps float32's precision) against ones, since the kernels that return a
    log-sum-exp take no float32 bias beside half-precision inputs.
    """
    use = q.device.type == "cuda" if fused_spans is None else fused_spans
    if not use or lse is None or mask3 is not None:
        return None
    long = _long_spans(span_members, q.device)
    if long is None:
        return None
    heads, _, dim = q.shape
    image = slice(text_len, text_len + n_image)
    width = -(-(dim + 3) // 8) * 8  # the CUDA kernels' alignment
    if "txt2img" in wanted:
        image_keys = k.new_zeros(1, heads, n_image, width)  # the image keys, as queries
        image_keys[0, :, :, :dim] = k[:, image]
        image_keys[0, :, :, dim : dim + 3] = 1
    n_long = len(long.positions)
    out = {name: q.new_empty(heads, n_long, n_image, dtype=torch.float32) for name in wanted}
    for index, positions in enumerate(long.positions):
        if "txt2img" in wanted:
            remainder = -lse[:, positions].double() / scale
            span_queries = q.new_zeros(1, heads, len(positions), width)  # as keys
            span_queries[0, :, :, :dim] = q[:, positions]
            for part in range(3):
                span_queries[0, :, :, dim + part] = remainder.to(q.dtype)
                remainder -= span_queries[0, :, :, dim + part].double()
            summed = _lse_of(image_keys, span_queries, scale)
            if summed is None:
                return None
            out["txt2img"][:, index] = (summed - math.log(len(positions))).exp()
        if "img2txt" in wanted:
            span_keys = k[:, positions].unsqueeze(0)
            summed = _lse_of(q[:, image].unsqueeze(0), span_keys, scale)
            if summed is None:
                return None
            out["img2txt"][:, index] = (summed - lse[:, image].to(torch.float32)).exp()
    return long, out


def _once_per_run(build: Callable[..., Any]) -> Callable[..., Any]:
    """`build(span_members, ...)` made once per span members' values (and arguments), and reused:
    a run's span members are the same at every call. What it builds lives on the device, sent
    there once: CUDA may make a copy from pageable host memory wait for the stream, which at
    every call would hold the generation's thread."""

    @functools.lru_cache(maxsize=16)
    def cached(members: bytes, shape: tuple[int, int], *args: Any, **kwargs: Any) -> Any:
        span_members = torch.frombuffer(bytearray(members), dtype=torch.bool).reshape(shape)
        return build(span_members, *args, **kwargs)

    @functools.wraps(build)
    def once(span_members: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        members = span_members.cpu().contiguous().numpy().tobytes()
        return cached(members, tuple(span_members.shape), *args, **kwargs)

    once.cache_info = cached.cache_info  # what the tests read
    return once


class _LongSpans(NamedTuple):
    """The spans of at least FUSED_SPAN_POSITIONS positions (long) and the others, indices on
    the device, for attention_maps to put their maps together without a copy from the host."""

    positions: list[torch.Tensor]  # each long span's text positions
    index: torch.Tensor  # the long spans' indices among all spans
    rest: torch.Tensor  # the other spans' indices
    rest_members: torch.Tensor | None  # the other spans' members (on the CPU); None: none


@_once_per_run
def _long_spans(span_members: torch.Tensor, device: torch.device) -> _LongSpans | None:
    """The long spans of these span members and the others; None where none is long."""
    long = span_members.sum(dim=1) >= FUSED_SPAN_POSITIONS
    if not long.any():
        return None
    rest = (~long).nonzero().flatten()
    return _LongSpans(
        positions=[members.nonzero().flatten().to(device) for members in span_members[long]],
        index=long.nonzero().flatten().to(device),
        rest=rest.to(device),
        rest_members=span_members[rest] if len(rest) else None,
    )


def _lse_of(queries: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor | None:
    """``[H, L]``: each of ``queries``' (``[1, H, L, D]``) float32 log-sum-exp over ``keys``
    from a fused kernel; None where none returns one for these inputs."""
    bound = {"query": queries, "key": keys, "value": torch.zeros_like(keys), "scale": scale}
    kernel = kernels.lse_kernel(bound)
    if kernel is None:
        return None
    return kernels.run_with_lse(kernel, bound)[1][0].to(torch.float32)


def cross_attention_maps(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    mask: torch.Tensor | None,
    scale: float,
    span_members: torch.Tensor,
    chunk_size: int = 256,
) -> dict[str, torch.Tensor]:
    """Image-to-text maps of one batch element of a cross-attention (image queries, text keys).

    ``q``: ``[H, P, D]`` queries of the image tokens (row-major on the grid); ``k``: ``[H, T, D]``
    keys of the text tokens. ``mask``: ``None`` or broadcastable to ``[H, P, T]``, boolean (True
    = may attend) or additive float. ``span_members``: bool ``[S, T]``.

    With P = softmax over the T text keys of ``q·kᵀ·scale + mask`` (float32), returns
    ``{"img2txt": [H, S, P]}``: the sum over the span's text keys j of ``P[h, p, j]``. No text
    query attends the image, so there is no ``txt2img``. A query row the mask forbids entirely
    contributes zeros; ``chunk_size`` queries are processed at a time.
    """
    heads, n_image, _ = _check_qk(q, k, joint=False)
    text_len = k.shape[1]
    chunk_size = _as_int("chunk_size", chunk_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size}")
    _check_span_members(span_members, text_len)
    mask3 = _as_3d_mask(mask, heads, n_image, text_len)
    work = 4 * heads * q.shape[-1] * n_image * text_len
    with torch.no_grad(), _cpu_threads_for(work, q.device), _float32_matmuls():
        maps = _img2txt(
            q,
            k.to(torch.float32),
            mask3,
            scale,
            text_len,
            n_image,
            span_members,
            chunk_size,
            first_query=0,
        )
    return {"img2txt": maps}


def _half_gemms(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether q·kᵀ goes to a float32-output GEMM of q and k as they are (see attention_maps)."""
    return (
        q.device.type == "cuda"
        and q.dtype == k.dtype
        and q.dtype in (torch.float16, torch.bfloat16)
        and _half_gemms_work(q.device, q.dtype)
    )


@functools.lru_cache(maxsize=8)
def _half_gemms_work(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch runs `_probs_from_lse`'s GEMM (a float32 output and a broadcast
    input from half-precision operands: CUDA, torch >= 2.8) right on `device`; tried once."""
    ones = torch.ones(2, 3, 8, dtype=dtype, device=device)
    bias = torch.full((2, 3, 1), -1.0, device=device)
    got = torch.empty(2, 3, 3, device=device)
    try:
        torch.baddbmm(bias, ones, ones.transpose(1, 2), alpha=0.5, out=got, out_dtype=got.dtype)
    except (RuntimeError, TypeError):
        return False
    return bool((got == 3.0).all())


def _matmul_backends() -> list[Any] | None:
    """torch's per-backend float32 matmul settings (torch >= 2.9) of the backends that may run
    float32 matmuls in lower precision by the process's choice: TF32 on CUDA, bf16 (or TF32)
    through oneDNN on the CPU. None where torch has only the global setting."""
    backends = [
        getattr(getattr(torch.backends, name), "matmul", None) for name in ("cuda", "mkldnn")
    ]
    return backends if all(hasattr(b, "fp32_precision") for b in backends) else None


# Looked up once: _float32_matmuls runs on every traced attention call.
_MATMUL_BACKENDS = _matmul_backends()


@contextlib.contextmanager
def _float32_matmuls() -> Iterator[None]:
    """The capture's float32 matmuls in float32 whatever the process allows its model.

    Diffusion scripts often allow TF32 (`torch.backends.cuda.matmul.allow_tf32 = True`): it
    rounds q and k to 10 mantissa bits inside a float32 GEMM, a logit error of about 1e-3 of its
    size, several times the store's bound on the maps. The capture asks each backend for IEEE
    float32 and gives back its previous setting after, through torch's per-backend settings
    (torch >= 2.9), which leave the legacy ones as they were; older torch has only the global
    one. Set process-wide: a matmul on another thread meanwhile runs in float32 too.
    """
    if _MATMUL_BACKENDS is None:
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(before)
        return
    before = [b.fp32_precision for b in _MATMUL_BACKENDS]
    for backend in _MATMUL_BACKENDS:
        backend.fp32_precision = "ieee"
    try:
        yield
    finally:
        for backend, precision in zip(_MATMUL_BACKENDS, before, strict=True):
            backend.fp32_precision = precision


@contextlib.contextmanager
def _cpu_threads_for(flops: float, device: torch.device) -> Iterator[None]:
    """One intra-op thread for a tiny capture on the CPU, the current number otherwise.

    Spread over OpenMP threads, each op ends at a barrier that waits for every thread, and when
    other processes share the cores that wait can cost more than a tiny op. Past about 1e7 flops
    the model's threads win all the same: on 2 idle cores a call of 4 heads × 64, 128 text and
    1,024 image tokens (1.4e8 flops) took 2.8 ms on one thread and 1.4 ms on two, and the
    families' small FLUX traced/untraced read 1.48 against 1.38 (bench.families' geometry).
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1 or flops >= _SMALL_WORK_FLOPS:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# Validation


def _as_int(name: str, value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got a bool")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name} must be an int, got {type(value).__name__}") from None


def _check_qk(q: torch.Tensor, k: torch.Tensor, *, joint: bool = True) -> tuple[int, int, int]:
    """[H, N, D] of q; a joint attention's k has q's shape, a cross-attention's its own N."""
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(
                f"{name} must be [H, N, D] (one batch element), got shape {tuple(t.shape)}"
            )
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    # A cross-attention's keys are as many as its text tokens, not its queries.
    if any(q.shape[d] != k.shape[d] for d in ((0, 1, 2) if joint else (0, 2))):
        same = "shape [H, N, D]" if joint else "heads and head dim [H, ·, D]"
        raise ValueError(
            f"q and k must have the same {same}, got q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    if q.device != k.device:
        raise ValueError(f"q and k must be on the same device, got {q.device} and {k.device}")
    heads, n_tokens, dim = q.shape
    if heads == 0 or n_tokens == 0 or dim == 0 or k.shape[1] == 0:
        raise ValueError(
            f"q and k must be non-empty [H, N, D], got q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    return heads, n_tokens, dim


def _check_span_members(span_members: torch.Tensor, text_len: int) -> None:
    if not isinstance(span_members, torch.Tensor):
        raise ValueError(
            f"span_members must be a bool torch.Tensor, got {type(span_members).__name__}"
        )
    if span_members.dtype != torch.bool:
        raise ValueError(f"span_members must be bool, got {span_members.dtype}")
    if span_members.dim() != 2 or span_members.shape[1] != text_len or span_members.shape[0] < 1:
        raise ValueError(
            f"span_members must be [S, text_len] = [S >= 1, {text_len}], got shape "
            f"{tuple(span_members.shape)}"
        )
    # A host sync if span_members lives on an accelerator; it is small and fixed per run, so the
    # caller is expected to keep it on the CPU.
    empty = (~span_members.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"span(s) at index {empty} of span_members select no text token")


def _check_lse(lse: torch.Tensor, q: torch.Tensor) -> None:
    if not isinstance(lse, torch.Tensor) or not lse.is_floating_point():
        raise ValueError(f"lse must be None or a floating-point torch.Tensor, got {lse!r:.80}")
    if tuple(lse.shape) != tuple(q.shape[:2]) or lse.device != q.device:
        raise ValueError(
            f"lse must be [H, N] = {list(q.shape[:2])} on {q.device}, got {list(lse.shape)} on "
            f"{lse.device}"
        )


def _as_3d_mask(
    mask: torch.Tensor | None, heads: int, n_tokens: int, n_keys: int | None = None
) -> torch.Tensor | None:
    """The mask as a view ``[1 or H, 1 or N, 1 or K]`` (broadcast dims kept at size 1); K = N
    unless the keys are others (cross-attention)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be None or a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise ValueError(f"mask must be bool or floating point, got {mask.dtype}")
    expected = (heads, n_tokens, n_tokens if n_keys is None else n_keys)
    leading, trailing = mask.shape[:-3], mask.shape[-3:]
    try:
        broadcast = torch.broadcast_shapes(trailing, expected)
    except RuntimeError:
        broadcast = None
    if any(size != 1 for size in leading) or broadcast != torch.Size(expected):
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to [H, N, K] = {list(expected)}"
        )
    if leading:
        mask = mask.reshape(trailing)
    while mask.dim() < 3:
        mask = mask.unsqueeze(0)
    return mask


# --------------------------------------------------------------------------------------------
# The two directions


def _mask_rows(mask3: torch.Tensor | None, rows: slice | torch.Tensor) -> torch.Tensor | None:
    """The mask restricted to some query rows: ``[1 or H, rows or 1, 1 or N]``."""
    if mask3 is None or mask3.shape[1] == 1:
        return mask3
    if isinstance(rows, slice):
        return mask3[:, rows]
    return mask3[:, rows]  # not index_select, which copies a broadcast (expanded) mask whole


def _dead_rows(mask_rows: torch.Tensor) -> torch.Tensor:
    """``[1 or H, rows or 1]``: True where the mask forbids every key of the query row."""
    if mask_rows.dtype == torch.bool:
        return ~mask_rows.any(dim=-1)
    return mask_rows.amax(dim=-1) == _NEG_INF


class _SpanRows:
    """How each span's map comes from the maps of the text positions it holds.

    `positions`: the text positions some span holds, ascending: the rows (txt2img) or keys
    (img2txt) a direction computes. A span of one position (each token row of a prompt) is that
    position's map, copied; a longer one (the padding's, a span named over several tokens) is the
    weighted sum of its positions' maps, a GEMM with as many rows as there are such spans. One
    GEMM over every span would do a multiply-add per span for each value of a block, most of
    them by zero weights. Indices and weights are built where span_members lives (the CPU,
    normally: no accelerator sync), then sent without blocking. `mean`: a span's map is the mean
    over its positions (txt2img), else their sum (img2txt). `chunk_size`: the positions of a
    block.
    """

    def __init__(
        self, span_members: torch.Tensor, device: torch.device, *, mean: bool, chunk_size: int
    ) -> None:
        positions = span_members.any(dim=0).nonzero().flatten()
        members = span_members[:, positions]
        counts = members.sum(dim=1)
        single, several = (counts == 1).nonzero().flatten(), (counts > 1).nonzero().flatten()
        single_position = members[single].to(torch.uint8).argmax(dim=1)
        weights = members[several].to(torch.float32)
        if mean:
            weights /= counts[several].unsqueeze(1)

        def send(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=True)

        self.n_spans, self.n_positions = members.shape
        self.positions = send(positions)
        # Per block of positions: its single-position spans, as runs (span, row in the block,
        # length) of consecutive spans on consecutive rows, each copied as one slice: a prompt's
        # token rows are one run. (index_copy_ took several times as long on the CPU.)
        self._singles: list[list[tuple[int, int, int]]] = []
        for start in range(0, self.n_positions, chunk_size):
            runs: list[tuple[int, int, int]] = []
            for span, position in zip(single.tolist(), single_position.tolist(), strict=True):
                row = position - start
                if not 0 <= row < chunk_size:
                    continue
                if runs and runs[-1][0] + runs[-1][2] == span and runs[-1][1] + runs[-1][2] == row:
                    runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
                else:
                    runs.append((span, row, 1))
            self._singles.append(runs)
        self._several = send(several) if len(several) else None
        self._weights = send(weights)  # [spans of several positions, positions]

    def add_rows(
        self,
        out: torch.Tensor,
        block: torch.Tensor,
        index: int,
        start: int,
        row_scale: torch.Tensor | None = None,
    ) -> None:
        """Add to `out` [H, S, P] the spans' share of `block` [H, rows, P], block `index` of
        the positions (from `start`), each row times `row_scale` [H, rows] if given."""
        for span, row, length in self._singles[index]:
            rows, target = slice(row, row + length), out[:, span : span + length]
            if row_scale is None:
                target.copy_(block[:, rows])
            else:
                torch.mul(block[:, rows], row_scale[:, rows, None], out=target)
        if self._several is not None:
            weights = self._weights[:, start : start + block.shape[1]]
            weights = (
                weights.expand(block.shape[0], -1, -1)
                if row_scale is None
                else weights * row_scale.unsqueeze(1)
            )
            out.index_add_(1, self._several, torch.bmm(weights, block))

    def set_columns(self, out: torch.Tensor, block: torch.Tensor) -> None:
        """Set `out` [H, S, rows] to the spans' share of `block` [H, rows, positions]."""
        for span, column, length in self._singles[0]:
            out[:, span : span + length] = block[:, :, column : column + length].transpose(1, 2)
        if self._several is not None:
            sums = torch.matmul(block, self._weights.t())
            out.index_copy_(1, self._several, sums.transpose(1, 2))


@_once_per_run
def _span_rows(
    span_members: torch.Tensor, device: torch.device, *, mean: bool, chunk_size: int
) -> _SpanRows:
    """`_SpanRows` of these span members (building them, a few dozen small ops, cost half a
    millisecond, twice per call)."""
    return _SpanRows(span_members, device, mean=mean, chunk_size=chunk_size)


def _txt2img(
    q: torch.Tensor,
    gemm_keys: torch.Tensor,
    mask3: torch.Tensor | None,
    scale: float,
    text_len: int,
    n_image: int,
    span_members: torch.Tensor,
    chunk_size: int,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Text queries of some span against the image keys. With the kernel's `lse`, each row's
    probabilities are exp(logit - lse) over the image keys alone; else the whole softmax row.
    `gemm_keys`: k as the GEMMs take it (float32, or half precision: see attention_maps)."""
    heads = q.shape[0]
    # Only the text queries of some span are needed.
    spans = _span_rows(span_members, q.device, mean=True, chunk_size=chunk_size)
    rows, n_rows = spans.positions, spans.n_positions

    out = torch.zeros(heads, spans.n_spans, n_image, dtype=torch.float32, device=q.device)
    k_t = gemm_keys.transpose(1, 2)
    image = slice(text_len, text_len + n_image)
    # With the lse only the image keys are needed: a view, which the GEMM reads as it is laid
    # out (a transposed copy of the keys cost a third of this direction's time on the CPU).
    k_image = None if lse is None else k_t[:, :, image]
    block = None if lse is None else _block_memory(heads * min(chunk_size, n_rows) * n_image, q)
    for index, start in enumerate(range(0, n_rows, chunk_size)):
        chunk = rows[start : start + chunk_size]
        # Indexing, not index_select, which first copies a strided q (heads not outermost) whole.
        q_rows = q[:, chunk].to(gemm_keys.dtype)
        mask_rows = _mask_rows(mask3, chunk)
        if lse is None:
            exps, inv_sums = _unnormalised_probs(q_rows, k_t, mask_rows, scale)
            # Each row's 1/sum goes with its share, not over the block: that saves a pass.
            spans.add_rows(out, exps[:, :, image], index, start, row_scale=inv_sums)
            continue
        # A mask broadcast over the keys (last dim 1) applies to the image keys as it is.
        mask_image = (
            mask_rows if mask_rows is None or mask_rows.shape[-1] == 1 else mask_rows[..., image]
        )
        probs = _probs_from_lse(q_rows, k_image, mask_image, scale, lse[:, chunk], block)
        spans.add_rows(out, probs, index, start)
    return out


def _unnormalised_probs(
    q_rows: torch.Tensor, k_t: torch.Tensor, mask_rows: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``E [H, rows, N]`` and ``r [H, rows]`` with softmax = E * r; a fully masked row has r = 0.

    Built in place in one ``[H, rows, N]`` float32 buffer, the only large allocation.
    """
    if mask_rows is not None and mask_rows.dtype != torch.bool:
        # Fused q·kᵀ·scale + mask in one pass over the block.
        logits = torch.baddbmm(mask_rows.to(torch.float32), q_rows, k_t, beta=1.0, alpha=scale)
    else:
        logits = torch.matmul(q_rows * scale, k_t)
        if mask_rows is not None:
            logits.masked_fill_(~mask_rows, _NEG_INF)
    row_max = logits.amax(dim=-1, keepdim=True)
    # A fully masked row has max -inf: shifting by 0 instead keeps exp at 0 (not NaN), sum 0.
    row_max.masked_fill_(row_max == _NEG_INF, 0.0)
    exps = logits.sub_(row_max).exp_()
    sums = exps.sum(dim=-1)
    inv_sums = torch.where(sums > 0, sums.reciprocal(), 0.0)
    return exps, inv_sums


def _img2txt(
    q: torch.Tensor,
    k32: torch.Tensor,
    mask3: torch.Tensor | None,
    scale: float,
    text_len: int,
    n_image: int,
    span_members: torch.Tensor,
    chunk_size: int,
    first_query: int | None = None,
) -> torch.Tensor:
    """Image queries from `first_query` (default: right after the text) against all keys of k,
    whose first `text_len` are the text; the queries taken to float32 a chunk at a time."""
    heads, _, dim = q.shape
    n_keys = k32.shape[1]
    first_query = text_len if first_query is None else first_query
    device = q.device
    n_spans = span_members.shape[0]

    # sum_{j in s} P[i, j] = (P @ V)[i, s] with V[j, s] = 1 if text key j is in span s: a fused
    # attention kernel computes it exactly, normalised over all keys, without the N x N map.
    # The fused kernels want 4-D inputs and V as wide as q and k (else torch falls back to the
    # unfused one): pad V with zero columns or, when there are more spans than head dims, pad q
    # and k with zero dims (q·k is unchanged), to a multiple of 8 for the CUDA kernels' alignment.
    width = dim if n_spans <= dim else -(-n_spans // 8) * 8
    values = _span_values(span_members, n_keys, width, device).expand(1, heads, -1, -1)
    k4 = F.pad(k32, (0, width - dim)).unsqueeze(0)

    out = torch.empty(heads, n_spans, n_image, dtype=torch.float32, device=device)
    for start in range(0, n_image, chunk_size):
        stop = min(start + chunk_size, n_image)
        mask_rows = _mask_rows(mask3, slice(first_query + start, first_query + stop))
        attn_mask = None
        if mask_rows is not None:
            attn_mask = mask_rows.unsqueeze(0)
            if attn_mask.dtype != torch.bool:
                attn_mask = attn_mask.to(torch.float32)
        rows = q[:, first_query + start : first_query + stop].to(torch.float32)
        rows = F.pad(rows, (0, width - dim)).unsqueeze(0)
        sums = F.scaled_dot_product_attention(rows, k4, values, attn_mask=attn_mask, scale=scale)[
            0, :, :, :n_spans
        ]
        if mask_rows is not None:
            # Kernels disagree on fully masked rows (NaN or 0); the contract says zeros.
            sums = sums.masked_fill(_dead_rows(mask_rows).unsqueeze(-1), 0.0)
        out[:, :, start:stop] = sums.transpose(1, 2)
    return out


@_once_per_run
def _span_values(
    span_members: torch.Tensor, n_keys: int, width: int, device: torch.device
) -> torch.Tensor:
    """``V [n_keys, width]`` float32 on `device`: V[j, s] = 1 where text key j is in span s
    (the first ``text_len`` keys are the text), zero elsewhere."""
    values = torch.zeros(n_keys, width, dtype=torch.float32)
    values[: span_members.shape[1], : span_members.shape[0]] = span_members.t()
    return values.to(device)


def _block_memory(n_floats: int, like: torch.Tensor) -> torch.Tensor:
    """Float32 memory for blocks of up to `n_floats` values, on `like`'s device: one per call,
    reused by its chunks (see _probs_from_lse)."""
    return torch.empty(n_floats, dtype=torch.float32, device=like.device)


def _probs_from_lse(
    q_rows: torch.Tensor,
    k_t: torch.Tensor,
    mask_rows: torch.Tensor | None,
    scale: float,
    lse_rows: torch.Tensor,
    memory: torch.Tensor,
) -> torch.Tensor:
    """Softmax probabilities ``[H, rows, K]`` of these query rows at the keys of ``k_t``
    (``[H, D, K]``), from each row's log-sum-exp over all keys: exp(q·kᵀ·scale + mask - lse).

    Written into `memory` (``_block_memory``): on the CPU a new block for each chunk is fresh
    pages, which the kernel faults in at about a third of the GEMM's own time.
    """
    heads, rows, n_keys = q_rows.shape[0], q_rows.shape[1], k_t.shape[-1]
    logits = memory[: heads * rows * n_keys].view(heads, rows, n_keys)
    lse_rows = lse_rows.to(torch.float32).unsqueeze(-1)
    # Half-precision q and k (attention_maps): a float32 output all the same.
    gemm = {} if q_rows.dtype == torch.float32 else {"out_dtype": torch.float32}
    if mask_rows is not None and mask_rows.dtype != torch.bool:
        torch.baddbmm(mask_rows.to(torch.float32), q_rows, k_t, alpha=scale, out=logits, **gemm)
        logits.sub_(lse_rows)
    else:
        # q·kᵀ·scale - lse as the GEMM writes its output (beta·input + alpha·q·kᵀ): no further
        # passes over the block for the scale and the normaliser.
        torch.baddbmm(lse_rows.neg(), q_rows, k_t, alpha=scale, out=logits, **gemm)
        if mask_rows is not None:
            logits.masked_fill_(~mask_rows, _NEG_INF)
    probs = logits.exp_()
    if mask_rows is not None:
        # A row the mask forbids entirely has logits -inf (and the CPU kernel's lse 0): exp
        # gives 0 there, but a kernel's lse of -inf would give NaN; the contract says zeros.
        probs.nan_to_num_(nan=0.0)
    return probs


def _img2txt_from_lse(
    q: torch.Tensor,
    gemm_keys: torch.Tensor,
    mask3: torch.Tensor | None,
    scale: float,
    text_len: int,
    n_image: int,
    span_members: torch.Tensor,
    chunk_size: int,
    lse: torch.Tensor,
) -> torch.Tensor:
    heads, n_tokens, _ = q.shape
    # sum_{j in s} P[i, j] = sum_{j in s} exp(q_i·k_j·scale + mask_ij - lse_i): only the text keys
    # of some span are needed, with lse_i, the kernel's normaliser over all keys.
    spans = _span_rows(span_members, q.device, mean=False, chunk_size=text_len)
    keys, n_keys = spans.positions, spans.n_positions
    k_t = gemm_keys[:, keys].transpose(1, 2).contiguous()  # [H, D, K]; see _txt2img on indexing
    lse_image = lse[:, text_len : text_len + n_image]
    if mask3 is not None and mask3.shape[2] > 1:
        mask3 = mask3[:, :, keys]

    # Blocks are [H, rows, K] (and [H, rows, S]), not [H, rows, N]: as many rows as keep a block
    # within the H * chunk_size * N floats the other paths use, in few large (fast) steps.
    rows_per_block = max(chunk_size, chunk_size * n_tokens // max(n_keys, spans.n_spans))
    out = torch.empty(heads, spans.n_spans, n_image, dtype=torch.float32, device=q.device)
    block = _block_memory(heads * min(rows_per_block, n_image) * n_keys, q)
    for start in range(0, n_image, rows_per_block):
        stop = min(start + rows_per_block, n_image)
        mask_rows = _mask_rows(mask3, slice(text_len + start, text_len + stop))
        q_rows = q[:, text_len + start : text_len + stop].to(gemm_keys.dtype)
        probs = _probs_from_lse(q_rows, k_t, mask_rows, scale, lse_image[:, start:stop], block)
        spans.set_columns(out[:, :, start:stop], probs)
    return out
