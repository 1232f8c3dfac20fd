"""Spans chosen when reading (format 2): exact views of the stored token rows, clear refusals.

References are NumPy over the rows read with plain zarr: txt2img of a span is the mean over its
text positions (a padding row stands for its count of positions), img2txt the sum.
"""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from synthetic_trace import PADDING, TOKENS, Run

import analysis
from analysis import spans
from analysis import store_format as sf
from analysis.errors import SelectionError, SpanError
from analysis.verify import format_report, verify

TEXT_LEN = len(TOKENS) + PADDING


def rows(path, direction: str) -> np.ndarray:
    return zarr.open_group(path, path="run-0000", mode="r")[direction][...].astype(np.float64)


def reference(path, positions: list[int]) -> dict[str, np.ndarray]:
    """Per direction, the span's maps from per-position rows (the padding row repeated)."""
    out = {}
    for direction in sf.DIRECTIONS:
        stored = rows(path, direction)
        # Position p's row: its own, or the padding row (index 6), which is the padding's mean
        # for txt2img and its sum for img2txt (one share per padding position).
        per_position = [stored[:, :, :, min(p, len(TOKENS))] for p in positions]
        if direction == "img2txt":
            per_position = [
                r / PADDING if p >= len(TOKENS) else r
                for p, r in zip(positions, per_position, strict=True)
            ]
            out[direction] = np.sum(per_position, axis=0)
        else:
            out[direction] = np.mean(per_position, axis=0)
    return out


@pytest.mark.parametrize(
    ("request_", "positions"),
    [
        ("cat on", [1, 2]),
        ("A", [0, 3]),  # a phrase matches every occurrence, in any case
        ("1:5", [1, 2, 3, 4]),
        ((0, TEXT_LEN), list(range(TEXT_LEN))),  # the whole segment, padding included
        ("4:10", [4, 5, 6, 7, 8, 9]),  # tokens and the whole padding run
        ("mat", [4]),  # a stored span
        ("prompt:all", list(range(TEXT_LEN))),  # a segment's whole block
        ("prompt:Cat on", [1, 2]),  # a phrase of a named segment
    ],
)
def test_any_span_is_exact_from_the_token_rows(store, request_, positions):
    path, _ = store
    ds = analysis.open_trace(path, spans=[request_])
    label = request_ if isinstance(request_, str) else f"{request_[0]}:{request_[1]}"
    assert list(ds.span.values) == [label]
    assert ds.attrs[sf.SPANS][label] == positions
    want = reference(path, positions)
    for direction in sf.DIRECTIONS:
        got = ds[direction].sel(span=label).values
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want[direction], rtol=2**-22)


def test_named_spans_and_a_mapping_of_names(store):
    path, expected = store
    ds = analysis.open_trace(path)
    assert list(ds.span.values) == ["prompt", "cat", "mat"]
    np.testing.assert_array_equal(ds.txt2img.values, expected["txt2img"])
    named = analysis.open_trace(path, spans={"subject": "cat", "ground": (4, 5)})
    np.testing.assert_array_equal(
        named.img2txt.sel(span="subject").values, ds.img2txt.sel(span="cat").values
    )
    np.testing.assert_array_equal(
        named.img2txt.sel(span="ground").values, ds.img2txt.sel(span="mat").values
    )


def test_the_token_rows_are_there_fully_labelled(store):
    path, _ = store
    ds = analysis.open_trace(path, tokens=True)
    assert ds.txt2img.dims == sf.DIMS
    assert list(ds.token.values) == [0, 1, 2, 3, 4, 5, 6]
    assert list(ds.token_text.values) == [*TOKENS, "<pad>"]
    assert list(ds.token_count.values) == [1] * len(TOKENS) + [PADDING]
    assert list(ds.token_padding.values) == [False] * len(TOKENS) + [True]
    np.testing.assert_array_equal(ds.txt2img.values, rows(path, "txt2img").astype(np.float32))
    # Beside the span views, the rows stay reachable.
    views = analysis.open_trace(path)
    assert views.img2txt_tokens.dims == sf.DIMS and views.img2txt.dims == sf.SPAN_DIMS
    np.testing.assert_array_equal(views.img2txt_tokens.values, ds.img2txt.values)


@pytest.mark.parametrize(
    ("request_", "words"),
    [
        ("3:8", ["covers 2 of the 4 padding tokens", "positions 6..9", "keep_tokens=(6, 10)"]),
        ("0:99", ["out of range", "0 <= START < STOP <= 10"]),
        ("dog", ["unknown span 'dog'", "prompt, cat, mat", "words: a, cat, mat, on"]),
        ("prompt:dog", ["unknown span 'prompt:dog'", "segments: prompt"]),
        ("mat cat", ["unknown span 'mat cat'"]),
    ],
)
def test_what_the_rows_cannot_answer_is_refused_naming_what_can(store, request_, words):
    path, _ = store
    with pytest.raises(SpanError) as caught:
        analysis.open_trace(path, spans=[request_])
    for word in words:
        assert word in str(caught.value)


def test_a_format_1_store_still_reads_with_its_recorded_spans(make_store):
    path, expected = make_store(Run(), version=1)
    ds = analysis.open_trace(path)
    assert ds.txt2img.dims == sf.SPAN_DIMS
    np.testing.assert_array_equal(ds.txt2img.values, expected["run-0000"]["txt2img"])
    assert list(analysis.open_trace(path, spans=["cat"]).span.values) == ["cat"]
    with pytest.raises(SpanError, match="format-1 store, whose runs hold only the spans"):
        analysis.open_trace(path, spans=["cat on"])
    with pytest.raises(SelectionError, match="format-1 store"):
        analysis.open_trace(path, tokens=True)
    report = verify(path)
    assert report.ok, format_report(report)


@pytest.mark.parametrize("weights", [[1, 1, 1], [3, 1, 2]])
def test_a_combined_span_is_its_rows_float64_sum_rounded_once(weights):
    """Across several of the sum's blocks, strided rows included: bit for bit the float64
    weighted sum divided, then cast to float32."""
    rng = np.random.default_rng(0)
    shape = (3, 5, spans.SUM_BLOCK // 7 + 1)  # not a whole number of blocks
    rows = [rng.lognormal(-8, 2, shape).astype(np.float32) for _ in weights]
    rows[1] = np.asfortranarray(rows[1])
    divisor = sum(weights)
    want = sum(w * r.astype(np.float64) for w, r in zip(weights, rows, strict=True)) / divisor
    got = spans._weighted_sum(*rows, weights=weights, divisor=divisor)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want.astype(np.float32))
