"""Spans as views of a run's token rows: any word, phrase or token range, chosen when reading.

A version-2 run stores one row per text token and one per run of padding tokens. Both stored
quantities are linear in the tokens, so a span is computed exactly from the rows it covers:
`txt2img` is the mean over its tokens (a padding row, itself their mean, weighs its count) and
`img2txt` the sum. A span must hold a padding row whole or not at all.

    ds = analysis.open_trace("cat.zarr", spans=["cat", "red chair", "0:512", "entity0:all"])
    ds.txt2img.sel(span="red chair")
"""

from __future__ import annotations

import functools
import re
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

from . import store_format as sf
from .errors import SpanError

SpanRequest = str | tuple[int, int]
Spans = Sequence[SpanRequest] | Mapping[str, SpanRequest]

_RANGE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
WORD = re.compile(r"\w+(?:['’]\w+)*")  # a word of a prompt, for the tracer's spans too
PROMPT_SEGMENT = "prompt"
TOKENS_SUFFIX = "_tokens"  # the stored rows beside a view: `txt2img_tokens`, `img2txt_tokens`


def _label(request: SpanRequest) -> str:
    return request if isinstance(request, str) else f"{request[0]}:{request[1]}"


def _phrase(phrase: str, attrs: Mapping[str, Any], segment: str | None = None) -> list[int]:
    """Positions of every occurrence of `phrase` (whole words, any case) in `segment`; by
    default in the prompt, else in every other segment that has it."""
    if segment is None:
        found = _phrase(phrase, attrs, PROMPT_SEGMENT)
        if found:
            return found
        others = {str(o["segment"]) for o in attrs.get(sf.WORDS, [])} - {PROMPT_SEGMENT}
        return sorted({p for name in others for p in _phrase(phrase, attrs, name)})
    wanted = [w.lower() for w in WORD.findall(phrase)]
    occurrences = [o for o in attrs.get(sf.WORDS, []) if o["segment"] == segment]
    found: set[int] = set()
    for i in range(len(occurrences) - len(wanted) + 1):
        window = occurrences[i : i + len(wanted)]
        if wanted and [str(o["word"]).lower() for o in window] == wanted:
            for occurrence in window:
                found.update(int(p) for p in occurrence["tokens"])
    return sorted(found)


def positions(request: SpanRequest, attrs: Mapping[str, Any]) -> list[int]:
    """The text positions a span request names: a stored span's name; text positions
    `START:STOP` or `(start, stop)`; `SEGMENT:all` (a segment's whole block, padding included,
    such as an EliGen entity's rows); `SEGMENT:PHRASE`; or a phrase, found in the prompt, else
    in every other segment that has it."""
    named = attrs.get(sf.SPANS) or {}
    text_len = int(attrs.get(sf.TEXT_LEN, 0))
    if isinstance(request, str) and request in named:
        return [int(p) for p in named[request]]
    match = _RANGE.match(request) if isinstance(request, str) else None
    if match is not None:
        request = (int(match.group(1)), int(match.group(2)))
    if isinstance(request, tuple | list):
        start, stop = request
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop <= text_len):
            raise SpanError(
                f"span {_label(request)!r} is out of range: the run has {text_len} text tokens, "
                f"so a range START:STOP needs 0 <= START < STOP <= {text_len}"
            )
        return list(range(start, stop))
    if not isinstance(request, str):
        raise SpanError(f"a span is a name, a phrase or (start, stop), not {request!r}")
    segments = attrs.get(sf.SEGMENTS) or {}
    segment, sep, rest = request.partition(":")
    if sep and segment in segments:
        if rest.strip() == "all":
            first, stop = segments[segment]
            return list(range(first, stop))  # the whole block, padding included
        found = _phrase(rest, attrs, segment)
    else:
        found = _phrase(request, attrs)
    if not found:
        words = sorted({str(o["word"]).lower() for o in attrs.get(sf.WORDS, [])})
        raise SpanError(
            f"unknown span {request!r}: it is no stored span ({', '.join(named) or 'none'}), "
            f"no token range START:STOP, no SEGMENT:all or SEGMENT:PHRASE (segments: "
            f"{', '.join(segments) or 'none'}) and no phrase of the text (words: "
            f"{', '.join(words) or 'none'})"
        )
    return found


def _rows_covered(chosen: Sequence[int], rows: Sequence[sf.TokenRow]) -> dict[int, int]:
    """{row index: how many of its text positions `chosen` holds}, for the rows it touches."""
    row_of = _row_of(tuple(rows))
    covered: dict[int, int] = {}
    for index in (row_of[p] for p in chosen if p in row_of):
        covered[index] = covered.get(index, 0) + 1
    return covered


def check_answerable(name: str, chosen: Sequence[int], rows: Sequence[sf.TokenRow]) -> None:
    """Raise SpanError if the positions split a padding row (stored only as a whole)."""
    for index, inside in _rows_covered(sorted(set(chosen)), rows).items():
        row = rows[index]
        if row.count > 1 and inside < row.count:
            last = row.position + row.count - 1
            raise SpanError(
                f"span {name!r} covers {inside} of the {row.count} padding tokens of "
                f"{row.segment!r} (positions {row.position}..{last}), which the run stores "
                f"as one sum: a span may hold content tokens, whole segments or padding runs, "
                f"or any mix of them; to ask about single padding tokens, record with "
                f"keep_tokens=({row.position}, {last + 1})"
            )


@functools.lru_cache(maxsize=8)
def _row_of(rows: tuple[sf.TokenRow, ...]) -> Mapping[int, int]:
    """Which token row holds each text position (built once per run's rows)."""
    return types.MappingProxyType({p: i for i, row in enumerate(rows) for p in row.positions})


def _requests(spans: Spans | None, attrs: Mapping[str, Any]) -> dict[str, SpanRequest]:
    if spans is None:
        return {name: name for name in attrs.get(sf.SPANS) or {}}
    if isinstance(spans, str | tuple):
        spans = [spans]
    if isinstance(spans, Mapping):
        return dict(spans)
    return {_label(request): request for request in spans}


RowReader = Callable[[xr.DataArray, int], xr.DataArray]


def _row(maps: xr.DataArray, index: int) -> xr.DataArray:
    """Token row `index` of `maps`, as a token dim of one."""
    return maps.isel(token=slice(index, index + 1))


def _combine(
    maps: xr.DataArray,
    picked: list[int],
    rows: Sequence[sf.TokenRow],
    direction: str,
    read: RowReader,
) -> xr.DataArray:
    """The span of rows `picked`: their sum (img2txt), or their mean over positions (txt2img).

    Each row is read as `read` gives it (the same rows as the spans of one token each, so
    they are read once). Sums of float32 values (times small integers) are exact in float64,
    so the one rounding is the final division and cast to float32.
    """
    weights = [rows[i].count if direction == "txt2img" else 1 for i in picked]
    divisor = sum(rows[i].count for i in picked) if direction == "txt2img" else 1
    terms = [read(maps, i).squeeze("token", drop=True) for i in picked]
    return xr.apply_ufunc(
        functools.partial(_weighted_sum, weights=weights, divisor=divisor),
        *terms,
        dask="parallelized",
        output_dtypes=[np.float32],
    )


# Values summed per block: the float64 running sums of a block (512 KiB) stay in the core's cache
# while each row's values are added, instead of streaming a chunk-sized float64 buffer through
# memory once per row. Six 8 MiB row chunks (the benchmark store's): 11-12 ms, against 16-18 ms.
SUM_BLOCK = 2**16


def _weighted_sum(*terms: np.ndarray, weights: Sequence[int], divisor: int) -> np.ndarray:
    """sum(w * t) / divisor of same-shaped arrays, accumulated in float64, as float32."""
    out = np.empty(terms[0].shape, dtype=np.float32)
    flat_out = out.reshape(-1)
    flat = [np.ravel(term) for term in terms]  # views, unless a term is not contiguous
    total = np.empty(min(SUM_BLOCK, out.size), dtype=np.float64)
    scaled = np.empty_like(total)
    for start in range(0, out.size, SUM_BLOCK):
        block = slice(start, start + SUM_BLOCK)
        acc = total[: flat[0][block].size]
        np.multiply(flat[0][block], weights[0], out=acc, dtype=np.float64)
        for term, weight in zip(flat[1:], weights[1:], strict=True):
            if weight == 1:
                np.add(acc, term[block], out=acc)
            else:
                np.multiply(term[block], weight, out=scaled[: acc.size], dtype=np.float64)
                np.add(acc, scaled[: acc.size], out=acc)
        np.divide(acc, divisor, out=acc)
        flat_out[block] = acc  # the one rounding to float32
    return out


def _span_pieces(
    maps: xr.DataArray,
    picks: list[list[int]],
    rows: Sequence[sf.TokenRow],
    direction: str,
    read: RowReader,
) -> list[xr.DataArray]:
    """The spans' maps (dim `span`, in order): a span of one stored row is that row's own
    values, as `read` gives them; a span of several rows is combined (`_combine`)."""
    pieces: list[xr.DataArray] = []
    for picked in picks:
        if len(picked) == 1:  # a row's own mean and sum: the stored values themselves
            row = read(maps, picked[0])
            stale = [name for name, coord in row.coords.items() if "token" in coord.dims]
            pieces.append(row.drop_vars(stale).rename(token="span"))
            continue
        combined = _combine(maps, picked, rows, direction, read)
        # Where the rows' token dim is, so that no piece is transposed to join the others.
        pieces.append(combined.expand_dims("span", axis=maps.dims.index("token")))
    return pieces


def span_view(
    tokens: xr.Dataset, spans: Spans | None = None, *, read_row: RowReader = _row
) -> xr.Dataset:
    """The run of `tokens` (dims step, layer, head, token, [frame,] y, x) with its maps per span
    too (dims step, layer, head, span, [frame,] y, x).

    `spans`: a list of requests (a stored span's name, a phrase of the prompt, `"3:7"` or
    `(3, 7)` for text positions 3..6), a mapping of names to requests, or None for the run's
    stored spans. Lazy when `tokens` is; values stay float32. The rows themselves stay in the
    result as `txt2img_tokens` and `img2txt_tokens`.

    `read_row(maps, index)`: the maps of one direction at token row `index` (a token dim of
    one); `open_trace` reads each row from the store as an array of its own, so that a span's
    maps read only its rows, and what is selected from them later only that.
    """
    attrs = tokens.attrs
    rows = sf.token_rows({name: tokens[name].values for name in ("token", *sf.TOKEN_COORDS)})
    requests = _requests(spans, attrs)
    if not requests:
        raise SpanError("no spans to show: the run names none; ask for a phrase or START:STOP")
    text_at = {p: row.text for row in rows for p in row.positions}
    chosen: dict[str, list[int]] = {}
    picks: list[list[int]] = []  # each span's stored rows, in the order of the spans
    for name, request in requests.items():
        wanted = positions(request, attrs)
        check_answerable(name, wanted, rows)
        chosen[name] = wanted
        picks.append(sorted(_rows_covered(sorted(set(wanted)), rows)))
    labels = xr.DataArray(np.array(list(chosen), dtype=object), dims="span")
    directions = [d for d in sf.DIRECTIONS if d in tokens]
    # The stored variable's own dims, token's place taken by span (video runs keep frame).
    order = ["span" if d == "token" else d for d in tokens[directions[0]].dims]
    data = {}
    for d in directions:
        pieces = _span_pieces(tokens[d], picks, rows, d, read_row)
        data[d] = xr.concat(pieces, dim="span").transpose(*order, ...)
    # The stored rows stay beside the views, as `txt2img_tokens` and `img2txt_tokens`.
    ds = tokens.rename({d: f"{d}{TOKENS_SUFFIX}" for d in directions}).assign(data)
    ds = ds.assign_coords(span=labels)
    strings = {name: [text_at[p] for p in wanted] for name, wanted in chosen.items()}
    ds.attrs = dict(attrs) | {sf.SPANS: chosen, sf.SPAN_TOKENS: strings}
    return ds
