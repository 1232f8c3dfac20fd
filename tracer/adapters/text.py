"""Text helpers the adapters share: a tokenized prompt as a segment of the joint sequence."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from analysis.errors import UnsupportedModelError
from tracer.spans import Segment


def _require_fast(tokenizer: Any, name: str) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise UnsupportedModelError(
            f"attnscope finds words through the tokenizer's offsets, which needs a fast "
            f"tokenizer; the {name!r} tokenizer is {type(tokenizer).__name__}"
        )


def padded_segment(tokenizer: Any, name: str, text: str, first: int, length: int) -> Segment:
    """One prompt tokenized as the pipelines do for T5 or CLIP (padded to `length`), at `first`.

    The same call diffusers' FLUX and SD3 pipelines and DiffSynth's prompt units make, plus the
    offsets (for words), the special-token mask (for the segment's span) and the padding.
    """
    _require_fast(tokenizer, name)
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


def prompt_template(before: str, after: str = "") -> str:
    """A `str.format` template putting the prompt between `before` and `after` (taken as they
    are, braces included)."""

    def literal(text: str) -> str:
        return text.replace("{", "{{").replace("}", "}}")

    return literal(before) + "{}" + literal(after)


def chat_template(render: Callable[[str], str]) -> str:
    """The prompt template of `render`, which turns a prompt into the text the pipeline's chat
    template makes of it."""
    marker = "\ue000"  # a private-use character: in no template
    return prompt_template(*render(marker).split(marker))


def user_turn(tokenizer: Any, **options: Any) -> Callable[[str], str]:
    """`render` for `chat_template`: one user message in `tokenizer`'s chat template, with a
    generation prompt and the pipeline's `options` (`enable_thinking`)."""

    def render(text: str) -> str:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}],
            tokenize=False,
            add_generation_prompt=True,
            **options,
        )

    return render


def with_padding(segment: Segment, count: int, token: str, *, before: bool = False) -> Segment:
    """`segment` with `count` padding positions of `token` after it (or `before` it): padding the
    model adds to the tokenizer's text itself."""
    pad = {
        "tokens": (token,) * count,
        "offsets": ((0, 0),) * count,
        "content": (False,) * count,
        "padding": (True,) * count,
    }

    def joined(name: str) -> tuple:
        return pad[name] + getattr(segment, name) if before else getattr(segment, name) + pad[name]

    return replace(segment, **{name: joined(name) for name in pad})


def templated_segment(
    tokenizer: Any,
    name: str,
    text: str,
    template: str,
    length: int,
    *,
    keep: slice | Sequence[int] = slice(None),
    padded: bool = False,
    padding_side: str | None = None,
    add_special_tokens: bool = True,
) -> Segment:
    """`text` inside a prompt `template` (`{}` marks where), tokenized as the pipelines that wrap
    prompts in a template do: up to `length` tokens, padded to `length` when `padded` (FLUX.2,
    Sana), of which the positions `keep` stay (Qwen-Image drops the system part, Sana keeps
    the first token and the last ones), at position 0. `padding_side` as the pipeline sets it
    (default: the tokenizer's own); `add_special_tokens=False` where the template has them.

    Only the tokens of `text` itself are content; the template's tokens that stay are kept as
    tokens of their own (the model attends them), with offsets relative to `text`.
    """
    _require_fast(tokenizer, name)
    at = template.index("{}")
    encoded = tokenizer(
        template.format(text),
        max_length=length,
        truncation=True,
        padding="max_length" if padded else False,
        return_offsets_mapping=True,
        add_special_tokens=add_special_tokens,
        **({} if padding_side is None else {"padding_side": padding_side}),
    )
    positions = range(len(encoded["input_ids"]))
    positions = positions[keep] if isinstance(keep, slice) else [positions[i] for i in keep]
    ids = [encoded["input_ids"][i] for i in positions]
    padding = tuple(not encoded["attention_mask"][i] for i in positions)
    offsets = tuple(
        (int(encoded["offset_mapping"][i][0]) - at, int(encoded["offset_mapping"][i][1]) - at)
        for i in positions
    )
    return Segment(
        name=name,
        text=text,
        first=0,
        tokens=tuple(tokenizer.convert_ids_to_tokens(ids)),
        offsets=offsets,
        content=tuple(
            not pad and start < len(text) and end > max(start, 0)
            for (start, end), pad in zip(offsets, padding, strict=True)
        ),
        padding=padding,
    )


def padding_segment(name: str, first: int, count: int, token: str = "<pad>") -> Segment:
    """`count` positions from `first` that no tokenizer made (masked context, a model's image
    tokens), as one segment of padding: they are stored as one summed row."""
    return Segment(
        name=name,
        text="",
        first=first,
        tokens=(token,) * count,
        offsets=((0, 0),) * count,
        content=(False,) * count,
        padding=(True,) * count,
    )
