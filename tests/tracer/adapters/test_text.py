"""The T5 segment of a prompt: tokens, offsets, content and padding as the tokenizer gives them."""

from __future__ import annotations

import pytest

from analysis.errors import UnsupportedModelError
from tracer.adapters.text import padded_segment
from tracer.demo import demo_t5_tokenizer


def test_a_segment_is_the_tokenizer_s_padded_encoding_placed_at_first():
    tokenizer = demo_t5_tokenizer(16)
    segment = padded_segment(tokenizer, "prompt", "a cat on a red chair", 32, 16)
    encoded = tokenizer(
        "a cat on a red chair", padding="max_length", max_length=16, return_special_tokens_mask=True
    )
    assert segment.first == 32 and segment.stop == 48
    assert segment.tokens == tuple(tokenizer.convert_ids_to_tokens(encoded["input_ids"]))
    assert segment.padding == tuple(m == 0 for m in encoded["attention_mask"])
    real = sum(encoded["attention_mask"])
    # Content: the text's own tokens, neither `</s>` (the last real one) nor padding.
    assert segment.content == tuple(i < real - 1 for i in range(16))
    assert segment.tokens[real - 1] == "</s>"


def test_a_slow_tokenizer_is_refused_naming_it():
    class Slow:
        is_fast = False

    refused = pytest.raises(
        UnsupportedModelError, match="fast tokenizer; the 'prompt' tokenizer is Slow"
    )
    with refused:
        padded_segment(Slow(), "prompt", "a cat", 0, 8)
