"""The selection syntax: one grammar for every verb (record included), the CLI and the API.

A selector picks labels along one dim of a trace. From Python it is a label, a list of labels, a
`slice` of labels, or a string in the CLI's syntax; on the CLI it is always that string:

- a name or a number: `cat`, `transformer_blocks.10`, `3` (one label: the dim is dropped, like
  `.sel(head=3)`);
- a comma-separated list: `0,3,5`, `cat,dog`;
- a range of numeric labels `a:b`, inclusive at both ends like xarray's label slices, either
  end optional (`10:20`, `:5`, `20:`), or `a:b:k` for every k-th label in it (`::2`);
- a glob over names: `single_transformer_blocks.*`, `*.1?`;
- for layers, a kind (`double`, `single`): every block of that kind; `KIND:GLOB`: `single:*` is
  every single-stream block, `double:1?` the two-stream blocks 10..19 (the glob matches the block's
  number or its whole name);
- `*` or `all`: every label.

Every unknown label raises `SelectionError` naming what the run has; a number or a range that
reaches outside the labels is refused (`head 2:9` on heads 0..3), never cut short. Ranges are
inclusive because they select labels, as `.sel(step=slice(0, 10))` does: `record --steps 0:10`
records the same steps that `heatmap --step 0:10` later shows.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import xarray as xr

from . import store_format as sf
from .errors import SelectionError

T = TypeVar("T", xr.DataArray, xr.Dataset)

_GLOB_CHARS = re.compile(r"[*?\[]")
_NUMBERED = re.compile(r"^(.*?)(\d+)$")

REDUCTIONS = ("mean", "max", "min", "sum", "std", "median")


def describe_values(values: Iterable[Any], limit: int = 400) -> str:
    """A compact, readable list of labels: runs of numbers and of `name.N` collapse to `a..b`."""
    values = [v.item() if isinstance(v, np.generic) else v for v in values]
    parts: list[str] = []
    i = 0
    while i < len(values):
        prefix, start = _split_number(values[i])
        j = i
        while j + 1 < len(values) and start is not None:
            nxt_prefix, nxt = _split_number(values[j + 1])
            if nxt_prefix != prefix or nxt != start + (j + 1 - i):
                break
            j += 1
        if j - i >= 2:
            parts.append(f"{values[i]}..{_split_number(values[j])[1]}")
        else:
            parts.extend(str(v) for v in values[i : j + 1])
        i = j + 1
    text = ", ".join(parts)
    return text if len(text) <= limit else text[: limit - 5] + ", ..."


def _split_number(value: Any) -> tuple[str, int | None]:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return "", int(value)
    match = _NUMBERED.match(str(value))
    return (match.group(1), int(match.group(2))) if match else (str(value), None)


def _labels(obj: xr.DataArray | xr.Dataset, dim: str) -> list[Any]:
    return [v.item() if isinstance(v, np.generic) else v for v in obj[dim].values]


def _is_numeric(labels: Sequence[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in labels)


def _unknown(dim: str, item: Any, labels: Sequence[Any], what: str = "") -> SelectionError:
    return SelectionError(
        f"unknown {dim} {item!r}{what}; this trace has {dim} {describe_values(labels)}"
    )


def _parse_number(dim: str, text: str, labels: Sequence[Any]) -> int:
    try:
        return int(text)
    except ValueError:
        raise SelectionError(
            f"{dim} {text!r} is not a number; {dim} takes numbers, lists (0,3,5), ranges (a:b) "
            f"or *; this trace has {dim} {describe_values(labels)}"
        ) from None


def _outside(dim: str, item: Any, labels: Sequence[Any]) -> SelectionError:
    return SelectionError(
        f"{dim} {item!r} is out of range: {dim} must be in {min(labels)}..{max(labels)} "
        f"(this trace has {dim} {describe_values(labels)})"
    )


def _numeric_item(dim: str, item: str, labels: Sequence[Any]) -> list[Any]:
    if ":" not in item:
        value = _parse_number(dim, item, labels)
        if labels and not min(labels) <= value <= max(labels):
            raise _outside(dim, value, labels)
        if value not in labels:
            raise _unknown(dim, value, labels)
        return [value]
    pieces = item.split(":")
    if len(pieces) > 3:
        raise SelectionError(f"bad {dim} range {item!r}; ranges read a:b or a:b:k")
    lo, hi, *rest = (_parse_number(dim, p, labels) if p else None for p in pieces)
    stride = rest[0] if rest else None
    if stride is not None and stride <= 0:
        raise SelectionError(f"bad {dim} range {item!r}: the stride must be positive")
    # A range reaching past either end is refused, never cut short: one rule with single labels.
    if labels and any(v is not None and not min(labels) <= v <= max(labels) for v in (lo, hi)):
        raise _outside(dim, item, labels)
    picked = [v for v in labels if (lo is None or v >= lo) and (hi is None or v <= hi)]
    picked = picked[:: stride or 1]
    if not picked:
        raise _unknown(dim, item, labels, " (the range matches nothing)")
    return picked


def _name_item(
    dim: str, item: str, labels: Sequence[Any], kinds: Mapping[str, str] | None
) -> list[Any]:
    if item in labels:
        return [item]
    if kinds and item in set(kinds.values()):
        return [name for name in labels if kinds[name] == item]  # a bare kind: `single`
    pattern, pool = item, list(labels)
    if kinds is not None and ":" in item:
        kind, _, pattern = item.partition(":")
        known = sorted(set(kinds.values()))
        if kind not in known:
            raise SelectionError(
                f"unknown layer kind {kind!r} in {item!r}; this trace has layer kinds {known} "
                f"(KIND:GLOB, e.g. single:*)"
            )
        pool = [name for name in labels if kinds[name] == kind]
        picked = [
            name
            for name in pool
            if fnmatch.fnmatchcase(name, pattern)
            or fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], pattern)
        ]
    elif _GLOB_CHARS.search(item):
        picked = [name for name in pool if fnmatch.fnmatchcase(name, pattern)]
    else:
        raise _unknown(dim, item, labels)
    if not picked:
        raise _unknown(dim, item, labels, " (the pattern matches nothing)")
    return picked


def parse_selector(
    dim: str,
    text: str,
    labels: Sequence[Any],
    kinds: Mapping[str, str] | None = None,
) -> Any:
    """Resolve a CLI selector string against the labels of `dim`.

    Returns one label (when `text` names exactly one, so the dim is dropped) or a list of labels
    in the trace's order. `kinds` maps layer name to layer kind and enables `KIND:GLOB`.
    """
    text = text.strip()
    if not text:
        raise SelectionError(
            f"empty {dim} selection; this trace has {dim} {describe_values(labels)}"
        )
    if text in ("*", "all"):
        return list(labels)
    numeric = _is_numeric(labels)
    if not numeric and text in labels:
        # A whole-string match first: span names may hold ',' or ':' (a raw range span "0:512").
        return text
    items = [part.strip() for part in text.split(",")]
    picked: list[Any] = []
    for item in items:
        if not item:
            raise SelectionError(f"empty item in {dim} selection {text!r}")
        found = (
            _numeric_item(dim, item, labels) if numeric else _name_item(dim, item, labels, kinds)
        )
        picked.extend(v for v in found if v not in picked)
    one_label = len(items) == 1 and ":" not in text and not _GLOB_CHARS.search(text)
    return picked[0] if one_label else picked


def pick(
    dim: str, selector: Any, labels: Sequence[Any], kinds: Mapping[str, str] | None = None
) -> list[Any]:
    """The labels of `dim` that `selector` picks from `labels`, always as a list in their order.

    What `resolve` does on a trace, for labels known before there is one (the tracer picks the
    layers, heads and steps to record with it). A list may mix selector strings and labels.
    """
    items = [selector] if isinstance(selector, (str, int, np.integer)) else list(selector)
    if not items:
        raise SelectionError(f"empty {dim} selection; there are {dim} {describe_values(labels)}")
    chosen: set[Any] = set()
    for item in items:
        if isinstance(item, str):
            found = parse_selector(dim, item, labels, kinds)
            chosen.update(found if isinstance(found, list) else [found])
        elif isinstance(item, bool) or not isinstance(item, (int, np.integer)):
            raise SelectionError(f"{dim} {item!r} is neither a label nor a selector string")
        else:
            _numeric_item(dim, str(int(item)), labels)
            chosen.add(int(item))
    return [label for label in labels if label in chosen]


def _check_labels(dim: str, wanted: Iterable[Any], labels: Sequence[Any]) -> None:
    for value in wanted:
        if value not in labels:
            raise _unknown(dim, value, labels)


def resolve(obj: xr.DataArray | xr.Dataset, dim: str, selector: Any) -> Any:
    """The labels of `dim` that `selector` picks, checked against `obj` (see the module doc)."""
    if dim not in obj.dims:
        raise SelectionError(
            f"unknown dim {dim!r}; the selection has dims {list(map(str, obj.dims))}"
        )
    labels = _labels(obj, dim)
    if isinstance(selector, str):
        kinds = None
        if dim == "layer" and "layer_kind" in obj.coords:
            kinds = dict(zip(labels, map(str, obj["layer_kind"].values), strict=True))
        return parse_selector(dim, selector, labels, kinds)
    if isinstance(selector, slice):
        lo, hi, stride = selector.start, selector.stop, selector.step
        picked = [v for v in labels if (lo is None or v >= lo) and (hi is None or v <= hi)]
        picked = picked[:: stride or 1]
        if not picked:
            raise _unknown(dim, selector, labels, " (the range matches nothing)")
        return picked
    if isinstance(selector, (list, tuple, np.ndarray, xr.DataArray)):
        wanted = [v.item() if isinstance(v, np.generic) else v for v in np.asarray(selector)]
        _check_labels(dim, wanted, labels)
        return wanted
    value = selector.item() if isinstance(selector, np.generic) else selector
    _check_labels(dim, [value], labels)
    return value


def select(obj: T, selectors: Mapping[Hashable, Any] | None = None, **kwargs: Any) -> T:
    """`obj.sel(...)` with the attnscope selector syntax and errors that name what exists.

    `select(ds.txt2img, span="cat", head="0,3,5", step="10:20", layer="single:*")`. A selector of
    None leaves its dim alone.
    """
    wanted = {**(selectors or {}), **kwargs}
    indexers = {
        str(dim): resolve(obj, str(dim), sel) for dim, sel in wanted.items() if sel is not None
    }
    return obj.sel(indexers)


def direction(ds: xr.Dataset, asked: str | None = None) -> str:
    """The direction of `ds`'s maps to show: `asked`, or the first the run holds; a
    SelectionError naming the ones it has, and why the model has none where the run says so."""
    present = [name for name in sf.DIRECTIONS if name in ds.data_vars]
    if not present:
        raise SelectionError(f"{ds.attrs['run']} holds no attention maps ({sf.DIRECTIONS})")
    chosen = asked or present[0]
    if chosen not in present:
        why = (ds.attrs.get(sf.DIRECTIONS_ABSENT) or {}).get(chosen)
        because = f" (the model has none: {why})" if why else ""
        raise SelectionError(f"{ds.attrs['run']} has no {chosen!r} maps{because}; it has {present}")
    return chosen


def reduce(
    da: xr.DataArray, over: Sequence[str] | str, how: str = "mean", skipna: bool | None = None
) -> xr.DataArray:
    """Reduce `da` over the named dims with `how` (mean, max, min, sum, std, median); lazy.

    `over` may be a comma-separated string (`"step,layer"`); dims absent from `da` (already
    selected away) are an error naming the dims it has. `skipna` as xarray's (by default NaN,
    a map never computed, is skipped). The result's `reduced` attribute says how each dim was
    reduced (`{"layer": "mean of 5"}`), for figure titles.
    """
    if isinstance(over, str):
        over = [d.strip() for d in over.split(",") if d.strip()]
    missing = [d for d in over if d not in da.dims]
    if missing:
        raise SelectionError(
            f"cannot reduce over {missing}: not dims of this selection; it has dims "
            f"{list(map(str, da.dims))}"
        )
    if how not in REDUCTIONS:
        raise SelectionError(f"unknown reduction {how!r}; accepted: {list(REDUCTIONS)}")
    if not over:
        return da
    sizes = {dim: da.sizes[dim] for dim in over}
    if how == "median":
        # dask's median needs each reduced dim in one chunk.
        da = da.chunk(dict.fromkeys(over, -1))
    out = getattr(da, how)(list(over), skipna=skipna)
    # Titles say how each dim went (`describe`): "layer: mean of 5".
    done = dict(da.attrs.get("reduced", {})) | {d: f"{how} of {n}" for d, n in sizes.items()}
    return out.assign_attrs(da.attrs | {"reduced": done})
