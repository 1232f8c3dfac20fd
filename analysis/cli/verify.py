"""`attnscope verify STORE`: decode every chunk, check every run; exit 1 when damaged."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .args import opening, storage_options, store_parent

# Exit status when the store is damaged: a finding about the store, not a usage error (2).
DAMAGED = 1


def add_parser(subparsers: Any, verb: str, help: str) -> None:
    """Add `verify` to the command line."""
    parser = subparsers.add_parser(
        verb,
        parents=[store_parent(run=False)],
        help=help,
        description="Check a trace store: its metadata against the format, every chunk of every "
        "run decoded (checksums included), every step listed complete present. Exits 1 when "
        "anything is damaged or inconsistent; partial runs and stray temporary files are notes.",
    )
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the report; 0 when the store is sound, DAMAGED otherwise."""
    from ..verify import format_report, verify

    with opening(args.store):
        report = verify(args.store, storage_options=storage_options(args.storage_option))
    print(json.dumps(report.to_json(), indent=2) if args.json else format_report(report))
    if report.ok:
        return 0
    errors = len(report.errors)
    print(
        f"attnscope: error: {report.store} failed verification: {errors} "
        f"error{'s' * (errors != 1)} (listed above)",
        file=sys.stderr,
    )
    return DAMAGED
