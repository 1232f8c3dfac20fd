"""Spans: named groups of text tokens, resolved against the joint attention's text sequence."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from analysis.errors import SpanError
from analysis.spans import WORD, SpanRequest
from analysis.store_format import TokenRow


@dataclass(frozen=True)
class Segment:
    """One tokenized text inside the text sequence (the prompt, or an EliGen entity prompt)."""

    name: str
    text: str
    first: int  # index of the segment's first token in the text sequence
    tokens: tuple[str, ...]
    offsets: tuple[tuple[int, int], ...]  # character range of each token in `text`
    content: tuple[bool, ...]  # True for tokens of the text itself (not padding or specials)
    padding: tuple[bool, ...] = ()  # True for padding tokens (default: none)

    def __post_init__(self) -> None:
        if not self.padding:
            object.__setattr__(self, "padding", (False,) * len(self.tokens))
        if not len(self.tokens) == len(self.offsets) == len(self.content) == len(self.padding):
            raise SpanError("tokens, offsets, content and padding must have the same length")

    @property
    def stop(self) -> int:
        """One past the segment's last position in the text sequence."""
        return self.first + len(self.tokens)


@dataclass(frozen=True)
class TextTokens:
    """The text part of the joint attention sequence, as segments laid end to end."""

    segments: tuple[Segment, ...]
    length: int  # text tokens in the attention sequence (the text_len of the capture)
    # The segments that tokenize the prompt itself, where its words are looked up: one for FLUX,
    # CLIP's and T5's for SD3 (a word then has tokens in each).
    prompt_segments: tuple[str, ...] = ("prompt",)

    def prompts(self) -> list[Segment]:
        """The prompt's segments that this text has."""
        return [s for s in self.segments if s.name in self.prompt_segments]

    def segment(self, name: str) -> Segment:
        """The segment called `name`."""
        for segment in self.segments:
            if segment.name == name:
                return segment
        raise KeyError(name)

    def at(self, index: int) -> Segment | None:
        """The segment holding position `index`, if any."""
        for segment in self.segments:
            if segment.first <= index < segment.stop:
                return segment
        return None

    def token(self, index: int) -> str:
        """The token string at `index` of the text sequence."""
        for segment in self.segments:
            if segment.first <= index < segment.first + len(segment.tokens):
                return segment.tokens[index - segment.first]
        return ""


@dataclass(frozen=True)
class Span:
    """A resolved span: its token indices in the text sequence and their strings."""

    name: str
    indices: tuple[int, ...]
    tokens: tuple[str, ...]


def words(text: str) -> list[tuple[str, int, int]]:
    """The words of `text` with their character ranges."""
    return [(m.group(0), m.start(), m.end()) for m in WORD.finditer(text)]


def _content_indices(segment: Segment) -> list[int]:
    return [segment.first + i for i, is_content in enumerate(segment.content) if is_content]


def _phrase_indices(segment: Segment, phrase: str) -> list[int]:
    """Tokens of `segment` overlapping any whole-word, case-insensitive match of `phrase`."""
    pattern = re.compile(rf"(?<!\w){re.escape(phrase.strip())}(?!\w)", re.IGNORECASE)
    ranges = [(m.start(), m.end()) for m in pattern.finditer(segment.text)]
    return [
        segment.first + i
        for i, ((start, end), is_content) in enumerate(
            zip(segment.offsets, segment.content, strict=True)
        )
        if is_content and any(start < stop and end > begin for begin, stop in ranges)
    ]


def _make_span(name: str, indices: Sequence[int], text: TextTokens) -> Span:
    return Span(name, tuple(indices), tuple(text.token(i) for i in indices))


def default_spans(text: TextTokens) -> list[Span]:
    """One span per segment (its content tokens), then one per distinct word of the prompt,
    holding its tokens in every segment of the prompt."""
    spans = [_make_span(s.name, _content_indices(s), text) for s in text.segments]
    spans = [span for span in spans if span.indices]
    taken = {span.name for span in spans}
    for segment in text.prompts():
        for word, _, _ in words(segment.text):
            name = word.lower()
            if name in taken:
                continue
            indices = _prompt_indices(text, word)
            if indices:
                spans.append(_make_span(name, indices, text))
                taken.add(name)
    return spans


def _prompt_indices(text: TextTokens, phrase: str) -> list[int]:
    """Tokens of every prompt segment overlapping whole-word matches of `phrase`."""
    return sorted({i for segment in text.prompts() for i in _phrase_indices(segment, phrase)})


def resolve_spans(requests: Mapping[str, SpanRequest] | None, text: TextTokens) -> list[Span]:
    """The spans of a run: the defaults when `requests` is None, else segments plus requests.

    A string names the word(s) of the prompt it matches (through the tokenizer's offsets); a
    `(start, stop)` pair is a raw token range of the text sequence, padding included.
    """
    if requests is None:
        return default_spans(text)
    if not isinstance(requests, Mapping):
        raise SpanError(
            f"spans must map names to a word or (start, stop), got {type(requests).__name__}"
        )
    spans = [
        _make_span(s.name, _content_indices(s), text)
        for s in text.segments
        if s.name not in requests and _content_indices(s)
    ]
    for name, request in requests.items():
        if not isinstance(name, str) or not name:
            raise SpanError(f"span names must be non-empty strings, got {name!r}")
        spans.append(_make_span(name, _resolve_one(name, request, text), text))
    return spans


def _resolve_one(name: str, request: SpanRequest, text: TextTokens) -> list[int]:
    if isinstance(request, str):
        indices = _prompt_indices(text, request) if request.strip() else []
        if not indices:
            prompts = text.prompts()
            shown = prompts[0].text if prompts else ""
            known = sorted({w.lower() for s in prompts for w, _, _ in words(s.text)})
            raise SpanError(
                f"span {name!r}: {request!r} matches no word of the prompt {shown!r}; "
                f"words it has: {known}"
            )
        return indices
    if (
        isinstance(request, tuple | list)
        and len(request) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in request)
    ):
        start, stop = request
        if not 0 <= start < stop <= text.length:
            raise SpanError(
                f"span {name!r}: token range ({start}, {stop}) is out of range; the text "
                f"sequence has {text.length} tokens, so 0 <= start < stop <= {text.length}"
            )
        return list(range(start, stop))
    raise SpanError(
        f"span {name!r}: {request!r} is neither a word of the prompt (str) nor a token range "
        f"(start, stop)"
    )


UNSEGMENTED = "text"  # the segment name of positions no tokenized text accounts for


def token_rows(text: TextTokens, text_len: int, keep: Sequence[int] = ()) -> list[TokenRow]:
    """The rows a run stores: one per token, one per run of padding positions not in `keep`.

    Positions past the tokenized text (the model attends more text tokens than the tokenizer
    explains) count as padding of an unnamed segment.
    """
    kept = set(keep)
    rows: list[TokenRow] = []
    for position in range(text_len):
        segment = text.at(position)
        index = position - segment.first if segment is not None else None
        padding = segment is None or segment.padding[index]
        name = segment.name if segment is not None else UNSEGMENTED
        token = segment.tokens[index] if segment is not None else ""
        last = rows[-1] if rows else None
        if (
            padding
            and position not in kept
            and last is not None
            and last.padding
            and last.segment == name
            and last.position + last.count == position
            and last.position not in kept
        ):
            rows[-1] = TokenRow(last.position, last.count + 1, last.text, name, padding=True)
            continue
        rows.append(TokenRow(position, 1, token, name, padding=padding))
    return rows


def split_rows(span: Span, rows: Sequence[TokenRow]) -> list[TokenRow]:
    """The padding rows a span covers only in part (so it can't be computed from them)."""
    chosen = set(span.indices)
    return [
        row
        for row in rows
        if row.count > 1 and 0 < len(chosen.intersection(row.positions)) < row.count
    ]


def word_occurrences(text: TextTokens) -> list[dict[str, object]]:
    """Every word of every segment, in order, with the positions of its tokens."""
    found = []
    for segment in text.segments:
        for word, start, end in words(segment.text):
            positions = [
                segment.first + i
                for i, ((begin, stop), is_content) in enumerate(
                    zip(segment.offsets, segment.content, strict=True)
                )
                if is_content and begin < end and stop > start
            ]
            if positions:
                found.append({"segment": segment.name, "word": word, "tokens": positions})
    return found


def parse_span_argument(argument: str) -> tuple[str, SpanRequest]:
    """Parse a CLI span `NAME=WORDS`, `NAME=START:STOP`, `WORD` or `START:STOP`."""
    name, sep, value = argument.partition("=")
    if not sep:
        name, value = argument, argument
    name, value = name.strip(), value.strip()
    if not name or not value:
        raise SpanError(
            f"bad span {argument!r}: expected NAME=WORDS, NAME=START:STOP, WORD or START:STOP"
        )
    match = re.fullmatch(r"(\d+):(\d+)", value)
    if match:
        return name, (int(match.group(1)), int(match.group(2)))
    return name, value
