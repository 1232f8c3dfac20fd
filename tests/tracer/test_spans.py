"""Token rows and spans of the text sequence, on hand-made segments (no tokenizer)."""

from __future__ import annotations

import pytest

from analysis.errors import SpanError
from analysis.store_format import TokenRow
from tracer.spans import (
    Segment,
    Span,
    TextTokens,
    resolve_spans,
    split_rows,
    token_rows,
    word_occurrences,
)


def segment(name: str, text: str, first: int, length: int) -> Segment:
    """`text` split on spaces, one token a word, then `</s>`, then padding up to `length`."""
    words, offsets, at = text.split(), [], 0
    for word in words:
        at = text.index(word, at)
        offsets.append((at, at + len(word)))
        at += len(word)
    n = len(words)
    pad = length - n - 1
    return Segment(
        name=name,
        text=text,
        first=first,
        tokens=(*words, "</s>", *["<pad>"] * pad),
        offsets=(*offsets, (0, 0), *[(0, 0)] * pad),
        content=(True,) * n + (False,) * (pad + 1),
        padding=(False,) * (n + 1) + (True,) * pad,
    )


ENTITY = segment("entity0", "a cat", 0, 8)
PROMPT = segment("prompt", "a cat on a mat", 8, 8)
TEXT = TextTokens((ENTITY, PROMPT), 16)


def test_one_row_per_token_and_one_per_padding_run_of_each_segment():
    assert token_rows(TEXT, 16) == [
        TokenRow(0, 1, "a", "entity0"),
        TokenRow(1, 1, "cat", "entity0"),
        TokenRow(2, 1, "</s>", "entity0"),
        TokenRow(3, 5, "<pad>", "entity0", padding=True),
        TokenRow(8, 1, "a", "prompt"),
        TokenRow(9, 1, "cat", "prompt"),
        TokenRow(10, 1, "on", "prompt"),
        TokenRow(11, 1, "a", "prompt"),
        TokenRow(12, 1, "mat", "prompt"),
        TokenRow(13, 1, "</s>", "prompt"),
        TokenRow(14, 2, "<pad>", "prompt", padding=True),
    ]


def test_kept_positions_split_a_padding_run_and_the_rest_stays_summed():
    rows = token_rows(TEXT, 16, keep=[4, 5])
    assert rows[3:6] == [
        TokenRow(3, 1, "<pad>", "entity0", padding=True),
        TokenRow(4, 1, "<pad>", "entity0", padding=True),
        TokenRow(5, 1, "<pad>", "entity0", padding=True),
    ]
    assert rows[6] == TokenRow(6, 2, "<pad>", "entity0", padding=True)


def test_positions_no_text_explains_are_one_summed_row():
    rows = token_rows(TextTokens((ENTITY,), 8), 12)
    assert rows[-2:] == [
        TokenRow(3, 5, "<pad>", "entity0", padding=True),
        TokenRow(8, 4, "", "text", padding=True),
    ]
    assert token_rows(TextTokens((), 0), 4) == [TokenRow(0, 4, "", "text", padding=True)]


def test_a_span_over_part_of_a_padding_run_names_that_run():
    rows = token_rows(TEXT, 16)
    assert split_rows(Span("x", (2, 3, 4), ()), rows) == [rows[3]]
    assert split_rows(Span("x", tuple(range(0, 8)), ()), rows) == []


def test_every_word_of_every_segment_with_its_positions():
    found = word_occurrences(TEXT)
    assert found[:2] == [
        {"segment": "entity0", "word": "a", "tokens": [0]},
        {"segment": "entity0", "word": "cat", "tokens": [1]},
    ]
    assert [o["tokens"] for o in found if o["segment"] == "prompt"] == [[8], [9], [10], [11], [12]]


def test_named_spans_resolve_against_the_prompt_and_refuse_what_is_not_there():
    spans = {s.name: s.indices for s in resolve_spans({"pet": "cat", "r": (3, 9)}, TEXT)}
    assert spans == {
        "entity0": (0, 1),
        "prompt": (8, 9, 10, 11, 12),
        "pet": (9,),
        "r": tuple(range(3, 9)),
    }
    with pytest.raises(SpanError, match="'dog' matches no word of the prompt"):
        resolve_spans({"d": "dog"}, TEXT)
    with pytest.raises(SpanError, match="out of range"):
        resolve_spans({"far": (10, 40)}, TEXT)
