"""`attnscope info STORE`: the runs of a store and one run's prompt, spans, dims and size."""

from __future__ import annotations

import argparse
import json
import math
import textwrap
import warnings
from typing import Any

from .. import store_format as sf
from ..open import PartialRunWarning, trace_info
from ..selection import describe_values
from .args import opening, storage_options, store_parent


def add_parser(subparsers: Any, verb: str, help: str) -> None:
    """Add `info` to the command line."""
    parser = subparsers.add_parser(verb, parents=[store_parent()], help=help, description=help)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """Print the summary of the store and the chosen run."""
    with warnings.catch_warnings(), opening(args.store):
        warnings.simplefilter("ignore", PartialRunWarning)
        info = trace_info(
            args.store, args.run, storage_options=storage_options(args.storage_option)
        )
    print(json.dumps(info, indent=2, default=str) if args.json else describe(info))


def describe(info: dict[str, Any]) -> str:
    """The text `info` prints for a `trace_info` summary."""
    run = info["run"]
    lines = [f"store    {info['store']}  (attnscope format {info['format']})", "runs"]
    for r in info["runs"]:
        marker = "  <- shown" if r["name"] == run["name"] else ""
        prompt = f"  {r['prompt']!r}" if r["prompt"] is not None else ""
        lines.append(
            f"  {r['name']}  {r['status']:<10} {r['steps_complete']}/{r['steps']} steps complete"
            f"{prompt}{marker}"
        )
    lines.append(f"{run['name']}")
    status = run["status"]
    if run["steps_missing"]:
        status += f" (steps {describe_values(run['steps_missing'])} missing)"
    lines.append(f"  status    {status}")
    if run["prompt"] is not None:
        lines.append(f"  prompt    {run['prompt']!r}")
    attrs = run["attrs"]
    made_by = ", ".join(str(attrs[k]) for k in (sf.PIPELINE, sf.BACKEND) if attrs.get(k))
    model = attrs.get(sf.MODEL)
    if model or made_by:
        lines.append(f"  model     {model or 'unnamed'}" + (f" ({made_by})" if made_by else ""))
    sampling = [
        f"{label} {attrs[key]}"
        for key, label in ((sf.SEED, "seed"), (sf.NUM_STEPS, "steps"), (sf.GUIDANCE, "guidance"))
        if attrs.get(key) is not None
    ]
    if sampling:
        lines.append(f"  sampling  {' · '.join(sampling)}")
    dims = " · ".join(f"{d} {n}" for d, n in run["dims"].items())
    kinds = ", ".join(f"{n} {k}" for k, n in run["layer_kinds"].items())
    lines.append(f"  dims      {dims}" + (f"  (layers: {kinds})" if kinds else ""))
    if "frame" in run["dims"]:
        video = [f"{run['dims']['frame']} latent frames"]
        if attrs.get(sf.NUM_FRAMES) is not None:
            video.append(f"{attrs[sf.NUM_FRAMES]} video frames")
        if attrs.get(sf.TEMPORAL_COMPRESSION) is not None:
            video.append(f"{attrs[sf.TEMPORAL_COMPRESSION]} per latent frame")
        lines.append(f"  video     {', '.join(video)}")
    lines.append(f"  steps     {describe_values(run['steps'])}")
    for direction, why in (attrs.get(sf.DIRECTIONS_ABSENT) or {}).items():
        lines.append(f"  no {direction}  {why}")
    if run["skipped"]:
        lines.append(
            f"  skipped   {run['skipped']} (step, layer) maps not computed: a cache hook "
            f"skipped their block"
        )
    if run["tokens"]:
        lines.append("  tokens    (position text; a padding run as FIRST..LAST text)")
        for segment in dict.fromkeys(t["segment"] for t in run["tokens"]):
            rows = [t for t in run["tokens"] if t["segment"] == segment]
            cells = [
                f"{t['position']}..{t['position'] + t['count'] - 1} {t['text']}"
                if t["count"] > 1
                else f"{t['position']} {t['text']}"
                for t in rows
            ]
            lines += textwrap.wrap(
                " · ".join(cells),
                width=100,
                initial_indent=f"    {segment}: ",
                subsequent_indent=" " * (6 + len(segment)),
                break_on_hyphens=False,
            )
    lines.append(
        "  spans"
        + ("  (stored; any phrase or START:STOP also works)" if "token" in run["dims"] else "")
    )
    width = max((len(s) for s in run["spans"]), default=0)
    for name, span in run["spans"].items():
        tokens = describe_values(span["tokens"]) or "-"
        strings = " ".join(span["strings"])
        lines.append(f"    {name:<{width}}  tokens {tokens}  {strings!r}")
    lines.append("  variables")
    for name, var in run["variables"].items():
        ratio = var["compression_ratio"]
        lines.append(
            f"    {name}  {var['dtype']} {tuple(var['shape'])}  "
            f"{_size(var['bytes_on_disk'])} on disk, {_size(var['bytes_written'])} written"
            + (f", compression {ratio:.2f}x" if ratio else "")
        )
    if run["image"]:
        lines.append(f"  image     {run['image'][1]}x{run['image'][0]} RGB")
    if run["entities"]:
        lines.append(f"  entities  {', '.join(run['entities'])}")
    if sf.ERROR_BOUND in attrs:
        bound = float(attrs[sf.ERROR_BOUND])
        # The bound is 2^-(keepbits + 1): a bf16 model's run keeps 7 bits by default, others 9.
        kept = round(-math.log2(bound)) - 1 if bound > 0 else None
        stated = (
            "lossless"
            if kept is None
            else f"relative error <= {bound:.3g} ({kept} mantissa bits kept)"
        )
        lines.append(f"  error     {stated}")
    written = sum(v["bytes_written"] for v in run["variables"].values())
    attention = sum(v["bytes_on_disk"] for v in run["variables"].values())
    lines.append(
        f"  size      {_size(run['bytes_on_disk'])} on disk"
        + (f"; attention maps compress {written / attention:.2f}x" if attention else "")
    )
    return "\n".join(lines)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
