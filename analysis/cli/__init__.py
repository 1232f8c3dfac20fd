"""The `attnscope` command: one parser, one module per verb, loaded only when that verb runs.

    attnscope info cat.zarr
    attnscope verify cat.zarr
    attnscope heatmap cat.zarr --span cat --head 3 --reduce mean --over step,layer -o cat.png
    attnscope heads cat.zarr --span cat --layer single -o heads.png
    attnscope steps cat.zarr --span cat --layer 'single:1?' --gif -o steps.png
    attnscope frames video.zarr --span cat --step 0,5,9 --animation cat.mp4 -o frames.png
    attnscope record --demo --out demo.zarr --heads 0:3 --steps 0,2

`record` lives in the tracer (`tracer.cli`) and is imported only when asked for, so the other
verbs, and `attnscope --help`, never load torch and work where it is not installed. Every verb
reads selections with one grammar (`analysis.selection`). Exit status, decided here only: 0 done,
1 `verify` found damage, 2 a usage error, a bad store or an unsupported model (one line on
stderr, no traceback), 130 interrupted. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..allocator import reuse_freed_memory
from ..errors import AttnscopeError
from .args import TRACER_HINT

USAGE = 2
INTERRUPTED = 130


@dataclass(frozen=True)
class Verb:
    """A verb of the command line: the module that adds its parser (`add_parser`), its help."""

    module: str
    help: str


VERBS = {
    "info": Verb("analysis.cli.info", "runs, prompt, spans, dims, steps complete, size on disk"),
    "heatmap": Verb("analysis.cli.figures", "one map, reduced over the dims you name"),
    "heads": Verb("analysis.cli.figures", "a grid of heads and their similarity matrix"),
    "steps": Verb("analysis.cli.figures", "a grid of steps, the drift curve, a GIF over timesteps"),
    "frames": Verb(
        "analysis.cli.figures", "a video run's frames × steps grid, an animation over frames"
    ),
    "view": Verb(
        "analysis.cli.view",
        "explore steps, layers, heads and spans in the browser, or --export one span's page",
    ),
    "verify": Verb(
        "analysis.cli.verify",
        "decode every chunk of every run and check the metadata (exit 1 if damaged)",
    ),
    "record": Verb(
        "tracer.cli", "generate an image and record its attention into a trace store (tracer)"
    ),
}


def _unavailable(verb: str, reason: str) -> Any:
    def run(args: argparse.Namespace) -> None:
        raise AttnscopeError(
            f"{verb} needs the tracer, which cannot be imported here ({reason}); it runs on a "
            f"machine with torch: {TRACER_HINT}"
        )

    return run


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The `attnscope` parser, with the full options of `verb` (the others list their help)."""
    parser = argparse.ArgumentParser(
        prog="attnscope",
        description="Record and study the joint attention of diffusion transformers.",
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, spec in VERBS.items():
        if name != verb:
            sub.add_parser(name, help=spec.help)
            continue
        try:
            module = importlib.import_module(spec.module)
        except ImportError as exc:
            if not spec.module.startswith("tracer"):
                raise
            stub = sub.add_parser(name, help=spec.help, description=f"Needs {TRACER_HINT}")
            # Whatever options come, the answer is the same: the tracer is missing.
            stub.set_defaults(func=_unavailable(name, str(exc)), takes_any=True)
            continue
        module.add_parser(sub, name, spec.help)
    return parser


def _verb(argv: Sequence[str]) -> str | None:
    return next((arg for arg in argv if arg in VERBS), None)


def _show_warning(message: Any, *_: Any, **__: Any) -> None:
    print(f"attnscope: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `attnscope` command; returns its exit status (see the module doc)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_verb(argv))
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "takes_any", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.verb != "record":  # record sets it itself, not for an estimate (it records nothing)
        # This process is the command's own: the maps' chunk buffers are reused, not faulted in
        # afresh for every chunk.
        reuse_freed_memory()
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            status = args.func(args)
        except AttnscopeError as exc:
            print(f"attnscope: error: {exc}", file=sys.stderr)
            return USAGE
        except OSError as exc:
            # A missing store, a figure that cannot be written (permission, full disk).
            print(f"attnscope: error: {exc}", file=sys.stderr)
            return USAGE
        except KeyboardInterrupt as exc:
            notes = "; ".join(getattr(exc, "__notes__", []))
            print(f"attnscope: interrupted{': ' + notes if notes else ''}", file=sys.stderr)
            return INTERRUPTED
    return status if isinstance(status, int) else 0


__all__ = ["VERBS", "build_parser", "main"]
