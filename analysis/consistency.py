"""The one consistency check of a run: its attributes, coordinates and arrays agree.

`open_trace` raises on the first finding that stops a reader; `attnscope verify` lists them all.
Both call `run_findings`, so what one refuses the other reports, in the same words.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import store_format as sf
from .selection import describe_values


@dataclass(frozen=True)
class Finding:
    """One thing found about a store.

    `level` is `error` (damaged or inconsistent: a reader would show it wrongly) or `note` (what a
    crash leaves and readers handle). `blocks_reading` marks what stops `open_trace` on that run:
    every error, and a note such as a run whose recording stopped before any map could be written.
    """

    level: str
    where: str
    message: str
    blocks_reading: bool = False


def is_v1_layout(arrays: Mapping[str, Any]) -> bool:
    """Whether a run's arrays are laid out as format version 1 (span rows, no token rows)."""
    return "span" in arrays and "token" not in arrays


def required_arrays(attrs: Mapping[str, Any], v1: bool = False) -> tuple[str, ...]:
    """Arrays a run must hold to be read: its coordinates and every direction it asked for."""
    capture = attrs.get(sf.CAPTURE)
    asked = capture.get(sf.DIRECTIONS_KEY) if isinstance(capture, dict) else None
    directions = [d for d in sf.DIRECTIONS if d in (asked or ())]
    coords = sf.SPAN_DIMS if v1 else (*sf.DIMS, *sf.TOKEN_COORDS)
    return (*coords, "branch", *directions)


def run_findings(
    run: str,
    attrs: Mapping[str, Any],
    arrays: Mapping[str, Mapping[str, Any]],
    coords: Mapping[str, np.ndarray],
    stored_keepbits: Mapping[str, int | None],
) -> list[Finding]:
    """Every disagreement of a run's attributes with its arrays, coordinates and codecs.

    `arrays` maps array names to their checked metadata (`trust.check_run`), `coords` the small
    arrays that could be decoded to their values, `stored_keepbits` each attention variable to
    the bit rounding its codecs apply (`store_format.keepbits_of`).
    """
    findings: list[Finding] = []

    def error(message: str) -> None:
        findings.append(Finding("error", run, message, blocks_reading=True))

    status = attrs.get(sf.STATUS)
    complete = status == sf.COMPLETE
    if status is None:
        error(f"has no {sf.STATUS!r} attribute")
    elif not (status in (sf.RECORDING, sf.COMPLETE) or sf.is_failed(status)):
        error(f"has status {status!r}, not recording, complete or failed: <reason>")
    v1 = is_v1_layout(arrays)
    missing = [name for name in required_arrays(attrs, v1) if name not in arrays]
    if missing or not any(d in arrays for d in sf.DIRECTIONS):
        lacking = ", ".join(missing) or " or ".join(sf.DIRECTIONS)
        if complete:
            error(f"is complete but lacks arrays the format requires: {lacking}")
        else:
            findings.append(
                Finding(
                    "note",
                    run,
                    f"(status {status!r}) lacks arrays the format requires ({lacking}): its "
                    f"recording stopped while the run was being laid down, before any map was "
                    f"written; readers cannot open it",
                    blocks_reading=True,
                )
            )

    steps = [int(s) for s in coords.get("step", [])]
    listed = [int(s) for s in attrs.get(sf.STEPS_COMPLETE, [])]
    for dim in ("step", "layer", "head", "span", "token"):
        if dim in coords and len(set(coords[dim].tolist())) != len(coords[dim]):
            error(f"coordinate {dim!r} repeats values: {describe_values(coords[dim])}")
    if len(set(listed)) != len(listed):
        error(f"{sf.STEPS_COMPLETE} repeats steps: {listed}")
    if "step" in coords:
        unknown = sorted(set(listed) - set(steps))
        if unknown:
            error(f"{sf.STEPS_COMPLETE} lists steps {unknown} that the step coordinate lacks")
        if attrs.get(sf.STATUS) == sf.COMPLETE and set(listed) != set(steps):
            missing = [s for s in steps if s not in set(listed)]
            error(f"is complete but steps {describe_values(missing)} are not listed complete")
    for dim in ("frame", "y", "x"):
        if dim in coords and not np.array_equal(coords[dim], np.arange(len(coords[dim]))):
            error(f"coordinate {dim!r} is not 0..{len(coords[dim]) - 1}")
    if "layer_kind" in coords:
        bad = sorted(set(map(str, coords["layer_kind"])) - set(sf.LAYER_KINDS))
        if bad:
            error(f"layer_kind holds {bad}, not {list(sf.LAYER_KINDS)}")
    if "branch" in coords and str(coords["branch"]) not in sf.BRANCHES:
        error(f"branch is {coords['branch']!r}, not one of {list(sf.BRANCHES)}")
    if "rgb" in coords and [str(c) for c in coords["rgb"]] != ["r", "g", "b"]:
        error(f"coordinate rgb is {list(coords['rgb'])}, not ['r', 'g', 'b']")
    for dim in ("timestep", "sigma"):
        if dim in coords and not np.isfinite(coords[dim].astype(np.float64)).all():
            error(f"coordinate {dim!r} holds non-finite values")

    spans = attrs.get(sf.SPANS)
    names = [str(s) for s in coords.get("span", [])] if v1 else list(spans or {})
    if v1 and "span" in coords and spans is not None and set(spans) != set(names):
        error(f"{sf.SPANS} names {sorted(spans)} but the span coordinate holds {names}")
    if not v1 and all(name in coords for name in ("token", *sf.TOKEN_COORDS)):
        findings += _token_findings(run, attrs, coords)
    tokens = attrs.get(sf.SPAN_TOKENS)
    if spans is not None and tokens is not None:
        for span, indices in spans.items():
            if span in tokens and len(tokens[span]) != len(indices):
                error(
                    f"span {span!r}: {len(indices)} token indices but "
                    f"{len(tokens[span])} token strings"
                )
    text_len = attrs.get(sf.TEXT_LEN)
    if isinstance(text_len, int) and spans:
        past = sorted(s for s, idx in spans.items() if idx and max(idx) >= text_len)
        if past or any(min(idx, default=0) < 0 for idx in spans.values()):
            error(f"spans {past} reach outside the {text_len} text tokens")
    if "entity" in coords and names:
        strangers = sorted(set(map(str, coords["entity"])) - set(names))
        if strangers:
            error(f"entities {strangers} have no span")

    capture = attrs.get(sf.CAPTURE)
    if isinstance(capture, dict):
        directions = capture.get(sf.DIRECTIONS_KEY)
        present = [d for d in sf.DIRECTIONS if d in arrays]
        if isinstance(directions, list):
            extra = sorted(set(present) - set(directions))
            if extra:
                error(f"holds {extra} but its capture settings record only {directions}")
            lacking = sorted(set(directions) - set(present))
            if lacking and attrs.get(sf.STATUS) == sf.COMPLETE:
                error(f"capture settings record {lacking} but the run lacks them")
        for key, dim in ((sf.LAYERS, "layer"), (sf.HEADS, "head"), (sf.STEPS, "step")):
            if key in capture and dim in coords:
                stored = [v.item() if isinstance(v, np.generic) else v for v in coords[dim]]
                if list(capture[key]) != stored:
                    error(
                        f"coordinate {dim!r} ({describe_values(stored)}) disagrees with the "
                        f"capture settings ({describe_values(capture[key])})"
                    )
        keepbits = capture.get(sf.KEEPBITS, "absent")
        if keepbits != "absent":
            bound = attrs.get(sf.ERROR_BOUND)
            try:
                expected = sf.relative_error_bound(sf.check_keepbits(keepbits))
            except ValueError:
                error(f"capture keepbits {keepbits!r} is not an integer in 1..23 or null")
            else:
                if bound is not None and bound != expected:
                    error(f"error_bound {bound} does not match keepbits {keepbits} ({expected})")
                for direction in present:
                    stored_bits = stored_keepbits.get(direction)
                    if stored_bits != keepbits:
                        error(
                            f"{direction} is stored with keepbits {stored_bits} but the capture "
                            f"settings say {keepbits}"
                        )
    return findings


def _token_findings(
    run: str, attrs: Mapping[str, Any], coords: Mapping[str, np.ndarray]
) -> list[Finding]:
    """The token rows tile the text sequence in order, and every stored span can be read."""
    from .errors import SpanError
    from .spans import check_answerable

    findings: list[Finding] = []

    def error(message: str) -> None:
        findings.append(Finding("error", run, message, blocks_reading=True))

    try:
        rows = sf.token_rows(coords)
    except (ValueError, TypeError) as exc:
        return [Finding("error", run, f"token coordinates disagree: {exc}", blocks_reading=True)]
    position = 0
    for row in rows:
        if row.count < 1 or row.position != position:
            error(
                f"token rows do not tile the text sequence: a row at position {row.position} "
                f"covering {row.count} where position {position} was next"
            )
            return findings
        position += row.count
    text_len = attrs.get(sf.TEXT_LEN)
    if isinstance(text_len, int) and position != text_len:
        error(f"token rows cover {position} text positions but {sf.TEXT_LEN} is {text_len}")
    for name, indices in (attrs.get(sf.SPANS) or {}).items():
        try:
            check_answerable(name, indices, rows)
        except SpanError as exc:
            error(f"stored {exc}")
    return findings
