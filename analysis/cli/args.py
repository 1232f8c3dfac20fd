"""Argument types and option groups every verb shares (record included), in one place.

Selections (`--span`, `--layer(s)`, `--head(s)`, `--step(s)`) are passed on as text and read by
`analysis.selection`, the one grammar for every verb: see that module.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import AttnscopeError, UsageError

TRACER_HINT = "pip install -e '.[tracer]' (from a clone of attnscope)"
DISTRIBUTED_HINT = "pip install -e '.[distributed]' (from a clone of attnscope)"


def positive(kind: type) -> Callable[[str], Any]:
    """An argparse type: a finite number of `kind` greater than zero."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value

    return parse


def names(text: str) -> list[str]:
    """An argparse type: a comma-separated list of names (`txt2img,img2txt`)."""
    return [part.strip() for part in text.split(",") if part.strip()]


MAX_INTEGERS = 100_000  # more seeds than any sweep runs: a typo, not a request


def integers(text: str) -> list[int]:
    """An argparse type: integers and inclusive `A:B` ranges (`0,1,2`, `0:3`, `0,4:6`)."""
    values: list[int] = []
    for part in text.split(","):
        start, sep, stop = part.strip().partition(":")
        try:
            span = range(int(start), int(stop) + 1) if sep else range(int(start), int(start) + 1)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"bad integer list {text!r}: expected integers and inclusive A:B ranges, "
                f"e.g. 0,3,8:12"
            ) from None
        if len(values) + len(span) > MAX_INTEGERS:
            raise argparse.ArgumentTypeError(
                f"integer list {text[:80]!r} names more than {MAX_INTEGERS} values"
            )
        values += span
    return values


def storage_options(pairs: Sequence[str]) -> dict[str, Any] | None:
    """`--storage-option KEY=VALUE` pairs as fsspec options (VALUE read as JSON when it is)."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--storage-option takes KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options or None


def store_parent(*, run: bool = True) -> argparse.ArgumentParser:
    """Options of every verb that reads a store: the store, its run, fsspec options, -q."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("store", help="trace store: a path or an fsspec URL (s3://, memory://)")
    if run:
        parent.add_argument("--run", help="run name or index (default: the only or latest run)")
    parent.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fsspec storage option for URLs (repeatable; VALUE parsed as JSON when it can be)",
    )
    parent.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return parent


@contextlib.contextmanager
def opening(store: str) -> Iterator[None]:
    """Say `cannot open STORE: ...` for what a bad path or URL raises while it is opened."""
    try:
        yield
    except (AttnscopeError, FileNotFoundError):
        raise
    except (ValueError, ImportError, OSError) as exc:
        raise UsageError(f"cannot open {store!r}: {type(exc).__name__}: {exc}") from None


ANIMATIONS = ("gif", "mp4")  # animation files: Pillow writes GIFs, ffmpeg MP4s


def output_path(text: str, *, animation: bool = False) -> Path:
    """The figure (or `animation`) path the user named, checked before any work: type, folder,
    not a store."""
    from matplotlib.backend_bases import FigureCanvasBase

    path = Path(text)
    kinds = list(ANIMATIONS) if animation else sorted(FigureCanvasBase.get_supported_filetypes())
    suffix = path.suffix.lower().lstrip(".")
    if not text or path.is_dir():
        raise UsageError(f"output {text!r} is a folder; name a file, e.g. figure.png")
    if suffix not in kinds:
        raise UsageError(
            f"output {text!r}: cannot write {suffix or 'a file without extension'!r}; "
            f"use one of {', '.join(kinds)}"
        )
    parent = path.resolve().parent
    if not parent.is_dir():
        raise UsageError(f"output {text!r}: the folder {parent} does not exist")
    for folder in (parent, *parent.parents):
        if (folder / "zarr.json").is_file():
            raise UsageError(
                f"output {text!r} is inside the Zarr store {folder}; analysis never writes "
                f"into a trace store"
            )
    return path
