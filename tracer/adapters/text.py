"""Text helpers the adapters share: how a T5 prompt becomes a segment of the joint sequence."""

from __future__ import annotations

from typing import Any

from analysis.errors import UnsupportedModelError
from tracer.spans import Segment


def t5_segment(tokenizer: Any, name: str, text: str, first: int, length: int) -> Segment:
    """One prompt as the FLUX pipelines tokenize it for T5 (padded to `length`), placed at `first`.

    The same call diffusers' `FluxPipeline` and DiffSynth's prompt units make, plus the offsets
    (for words), the special-token mask (for the `prompt` span) and the padding.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise UnsupportedModelError(
            f"attnscope finds words through the tokenizer's offsets, which needs a fast "
            f"tokenizer; tokenizer_2 is {type(tokenizer).__name__}"
        )
    encoded = tokenizer(
        text,
        padding="max_length",
        max_length=length,
        truncation=True,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
    )
    content = tuple(
        bool(keep) and not special
        for keep, special in zip(
            encoded["attention_mask"], encoded["special_tokens_mask"], strict=True
        )
    )
    return Segment(
        name=name,
        text=text,
        first=first,
        tokens=tuple(tokenizer.convert_ids_to_tokens(encoded["input_ids"])),
        offsets=tuple((int(s), int(e)) for s, e in encoded["offset_mapping"]),
        content=content,
        padding=tuple(not keep for keep in encoded["attention_mask"]),
    )
