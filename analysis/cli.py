"""The `attnscope` command: info, heatmap, heads, steps, verify (and record, from the tracer).

    attnscope info cat.zarr
    attnscope verify cat.zarr
    attnscope heatmap cat.zarr --span cat --head 3 --reduce mean --over step,layer -o cat.png
    attnscope heads cat.zarr --span cat --layer transformer_blocks.10 -o heads.png
    attnscope steps cat.zarr --span cat --layer 'single:*' --gif -o steps.png

Selections (`--span`, `--layer`, `--head`, `--step`) take the syntax of `analysis.select`:
names, lists (`0,3,5`), inclusive ranges (`10:20`), globs and `KIND:GLOB` for layers
(`single:*`). `--scheduler ADDRESS` runs the computation on a dask.distributed cluster.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import dask
import xarray as xr

from . import store_format as sf
from .compare import DISTANCES, MAP_DIMS, SIMILARITIES, head_similarity, step_drift
from .open import PartialRunWarning, open_trace, trace_info
from .plot import animate, describe, drift_curve, grid, heatmap, overlay, similarity_matrix
from .selection import REDUCTIONS, SelectionError, describe_values, reduce, select

TRACER_HINT = "pip install 'attnscope[tracer]'"
DISTRIBUTED_HINT = "pip install 'attnscope[distributed]'"


class CommandError(Exception):
    """A command that cannot run as asked; main prints it and exits non-zero."""


# ---------------------------------------------------------------------------- shared helpers


def _storage_options(pairs: Sequence[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CommandError(f"--storage-option takes KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


@contextlib.contextmanager
def _opening(store: str) -> Iterator[None]:
    """Say `cannot open STORE: ...` for what a bad path or URL raises while it is opened."""
    try:
        yield
    except (SelectionError, sf.FormatError):
        raise
    except (ValueError, ImportError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise CommandError(f"cannot open {store!r}: {type(exc).__name__}: {exc}") from None


def _open(args: argparse.Namespace) -> xr.Dataset:
    with _opening(args.store):
        return open_trace(
            args.store, args.run, storage_options=_storage_options(args.storage_option) or None
        )


def _output(text: str, *, gif: bool = False) -> Path:
    """The figure path the user named, checked before any work: type, folder, not a store."""
    from matplotlib.backend_bases import FigureCanvasBase

    path = Path(text)
    kinds = ["gif"] if gif else sorted(FigureCanvasBase.get_supported_filetypes())
    suffix = path.suffix.lower().lstrip(".")
    if not text or path.is_dir():
        raise CommandError(f"output {text!r} is a folder; name a file, e.g. figure.png")
    if suffix not in kinds:
        raise CommandError(
            f"output {text!r}: cannot write {suffix or 'a file without extension'!r}; "
            f"use one of {', '.join(kinds)}"
        )
    parent = path.resolve().parent
    if not parent.is_dir():
        raise CommandError(f"output {text!r}: the folder {parent} does not exist")
    for folder in (parent, *parent.parents):
        if (folder / "zarr.json").is_file():
            raise CommandError(
                f"output {text!r} is inside the Zarr store {folder}; analysis never writes "
                f"into a trace store"
            )
    return path


def _check_style(args: argparse.Namespace) -> None:
    import matplotlib

    if args.cmap not in matplotlib.colormaps:
        raise CommandError(
            f"unknown colormap {args.cmap!r}; e.g. magma, viridis, rocket, mako, gray "
            f"(any matplotlib colormap)"
        )


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value

    return parse


def _variable(ds: xr.Dataset, args: argparse.Namespace) -> xr.DataArray:
    present = [name for name in sf.DIRECTIONS if name in ds.data_vars]
    if not present:
        raise SelectionError(f"{ds.attrs['run']} holds no attention maps ({sf.DIRECTIONS})")
    direction = args.direction or present[0]
    if direction not in present:
        raise SelectionError(f"this run has no {direction!r} maps; it has {present}")
    return ds[direction]


def _selection(ds: xr.Dataset, args: argparse.Namespace) -> xr.DataArray:
    """The chosen variable narrowed by --span/--layer/--head/--step."""
    da = _variable(ds, args)
    spans = [str(s) for s in da.span.values]
    span = args.span
    if span is None:
        if "prompt" in spans:
            span = "prompt"
        elif len(spans) == 1:
            span = spans[0]
        else:
            raise SelectionError(f"choose a span with --span; this run has spans {spans}")
    return select(da, span=span, layer=args.layer, head=args.head, step=args.step)


def _reduce_rest(
    da: xr.DataArray, keep: Sequence[str], how: str
) -> tuple[xr.DataArray, dict[str, str]]:
    """Reduce every dim of `da` but `keep` and the map dims; say how for the title."""
    over = [d for d in da.dims if d not in (*keep, *MAP_DIMS)]
    return reduce(da, over, how), {d: f"{how} of {da.sizes[d]}" for d in over}


def _sibling(path: Path, suffix: str, extension: str | None = None) -> Path:
    return path.with_name(f"{path.stem}{suffix}{extension or path.suffix or '.png'}")


@contextlib.contextmanager
def _scheduler(address: str | None, timeout: float) -> Iterator[None]:
    if address is None:
        yield
        return
    try:
        from distributed import Client
    except ImportError:
        raise CommandError(
            f"--scheduler needs dask.distributed, which is not installed: {DISTRIBUTED_HINT}"
        ) from None
    if not address.strip():
        raise CommandError("--scheduler needs an address, e.g. tcp://10.0.0.5:8786")
    try:
        client = Client(address, timeout=timeout)
    except (OSError, TimeoutError, ValueError) as exc:
        raise CommandError(f"cannot reach the dask scheduler at {address}: {exc}") from None
    with client:
        yield


@contextlib.contextmanager
def _progress(args: argparse.Namespace) -> Iterator[None]:
    """A tqdm bar over dask tasks on the local scheduler (a cluster has its own dashboard)."""
    if args.quiet or args.scheduler:
        yield
        return
    from tqdm.dask import TqdmCallback

    with TqdmCallback(desc="reading", unit="task", leave=False):
        yield


def _done(*paths: Path) -> None:
    for path in paths:
        print(path)


# ---------------------------------------------------------------------------- verbs


def _info(args: argparse.Namespace) -> None:
    with warnings.catch_warnings(), _opening(args.store):
        warnings.simplefilter("ignore", PartialRunWarning)
        info = trace_info(
            args.store, args.run, storage_options=_storage_options(args.storage_option) or None
        )
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return
    run = info["run"]
    total = run["bytes_on_disk"]
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
    made_by = ", ".join(str(attrs[k]) for k in ("pipeline", "backend") if attrs.get(k))
    if attrs.get("model") or made_by:
        lines.append(
            f"  model     {attrs.get('model') or '?'}" + (f" ({made_by})" if made_by else "")
        )
    sampling = [
        f"{label} {attrs[key]}"
        for key, label in (
            ("seed", "seed"),
            ("num_inference_steps", "steps"),
            ("guidance_scale", "guidance"),
        )
        if attrs.get(key) is not None
    ]
    if sampling:
        lines.append(f"  sampling  {' · '.join(sampling)}")
    dims = " · ".join(f"{d} {n}" for d, n in run["dims"].items())
    kinds = ", ".join(f"{n} {k}" for k, n in run["layer_kinds"].items())
    lines.append(f"  dims      {dims}" + (f"  (layers: {kinds})" if kinds else ""))
    lines.append(f"  steps     {describe_values(run['steps'])}")
    lines.append("  spans")
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
    if "error_bound" in attrs:
        bound = float(attrs["error_bound"])
        stated = "lossless" if bound == 0 else f"relative error <= {bound:.3g}"
        lines.append(f"  error     {stated}")
    written = sum(v["bytes_written"] for v in run["variables"].values())
    attention = sum(v["bytes_on_disk"] for v in run["variables"].values())
    lines.append(
        f"  size      {_size(total)} on disk"
        + (f"; attention maps compress {written / attention:.2f}x" if attention else "")
    )
    print("\n".join(lines))


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _heatmap(args: argparse.Namespace) -> None:
    out = _output(args.output)
    _check_style(args)
    ds = _open(args)
    da = _selection(ds, args)
    if args.over is None:
        over = [d for d in da.dims if d not in MAP_DIMS and da.sizes[d] > 1]
    else:
        named = [d.strip() for d in args.over.split(",") if d.strip()]
        # A dim already narrowed to one value (--head 3) needs no reducing.
        over = [d for d in named if not (d in da.coords and d not in da.dims)]
    m = reduce(da, over, args.reduce)
    title = describe(m, {d: f"{args.reduce} of {da.sizes[d]}" for d in over})
    with _progress(args):
        if args.overlay:
            if "image" not in ds:
                raise CommandError(f"{ds.attrs['run']} has no stored image to draw over")
            overlay(m, ds.image, out, title=title, cmap=args.cmap)
        else:
            heatmap(m, out, title=title, cmap=args.cmap)
    _done(out)


def _heads(args: argparse.Namespace) -> None:
    out = _output(args.output)
    _check_style(args)
    da = _selection(_open(args), args)
    if "head" not in da.dims or da.sizes["head"] < 2:
        raise SelectionError("heads compares heads: select at least two (--head 0,3,5 or none)")
    maps, reduced = _reduce_rest(da, ["head"], args.reduce)
    sim = head_similarity(da, args.metric)
    with _progress(args):
        maps, sim = dask.compute(maps, sim)
    sim_path = _sibling(out, "-similarity")
    grid(maps, col="head", path=out, col_wrap=args.col_wrap, title=describe(maps, reduced))
    similarity_matrix(sim, sim_path)
    _done(out, sim_path)


def _reference(text: str) -> str | int:
    if text in ("final", "previous"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"reference must be 'final', 'previous' or a step number, got {text!r}"
        ) from None


def _steps(args: argparse.Namespace) -> None:
    out = _output(args.output)
    gif = None
    if args.gif:
        gif = _sibling(out, "", ".gif") if args.gif is True else _output(args.gif, gif=True)
    _check_style(args)
    da = _selection(_open(args), args)
    if "step" not in da.dims or da.sizes["step"] < 2:
        raise SelectionError("steps compares steps: select at least two (--step 0:10 or none)")
    maps, reduced = _reduce_rest(da, ["step"], args.reduce)
    drift = step_drift(da, args.metric, args.reference)
    with _progress(args):
        maps, drift = dask.compute(maps, drift)
    drift_path = _sibling(out, "-drift")
    title = describe(maps, reduced)
    grid(maps, col="step", path=out, col_wrap=args.col_wrap, title=title)
    drift_curve(drift, drift_path)
    written = [out, drift_path]
    if gif is not None:
        animate(maps, gif, fps=args.fps, title=title, progress=not args.quiet)
        written.append(gif)
    _done(*written)


def _verify(args: argparse.Namespace) -> int:
    from .verify import format_report, verify

    with _opening(args.store):
        report = verify(args.store, storage_options=_storage_options(args.storage_option) or None)
    print(json.dumps(report.to_json(), indent=2) if args.json else format_report(report))
    if report.ok:
        return 0
    errors = len(report.errors)
    print(
        f"attnscope: error: {report.store} failed verification: {errors} "
        f"error{'s' * (errors != 1)} (listed above)",
        file=sys.stderr,
    )
    return 1


def _add_verify(subparsers: argparse._SubParsersAction) -> None:
    verify = subparsers.add_parser(
        "verify",
        help="decode every chunk of every run and check the metadata (exit 1 if damaged)",
        description="Check a trace store: its metadata against the format, every chunk of every "
        "run decoded (checksums included), every step listed complete present. Exits 1 when "
        "anything is damaged or inconsistent; partial runs and stray temporary files are notes.",
    )
    verify.add_argument("store", help="trace store: a path or an fsspec URL")
    verify.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fsspec storage option for URLs (repeatable)",
    )
    verify.add_argument("--json", action="store_true", help="print the findings as JSON")
    verify.set_defaults(func=_verify)


def _record_unavailable(reason: str) -> Callable[[argparse.Namespace], None]:
    def run(args: argparse.Namespace) -> None:
        raise CommandError(
            f"record needs the tracer, which cannot be imported here ({reason}); it runs on a "
            f"machine with torch: {TRACER_HINT}"
        )

    return run


def _add_record(subparsers: argparse._SubParsersAction, load: bool) -> None:
    """The tracer's `record` verb, imported only when asked for so other verbs never load torch."""
    if load:
        try:
            from tracer.cli import add_record_parser
        except ImportError as exc:
            reason = str(exc)
        else:
            record = add_record_parser(subparsers)
            record.set_defaults(func=record.get_default("func"))
            return
    else:
        reason = "not loaded"
    stub = subparsers.add_parser(
        "record",
        help=f"record a trace on a GPU box (needs the tracer: {TRACER_HINT})",
        description=f"Record a trace. Needs the tracer and torch: {TRACER_HINT}",
    )
    # Whatever record options come, the answer is the same: the tracer is missing.
    stub.set_defaults(func=_record_unavailable(reason), takes_any=True)


# ---------------------------------------------------------------------------- parser


def _parents() -> dict[str, argparse.ArgumentParser]:
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument("store", help="trace store: a path or an fsspec URL (s3://, memory://)")
    store.add_argument("--run", help="run name or index (default: the only or latest run)")
    store.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fsspec storage option for URLs (repeatable; VALUE parsed as JSON when it can be)",
    )
    store.add_argument(
        "--scheduler", metavar="ADDRESS", help="dask.distributed scheduler to compute on"
    )
    store.add_argument(
        "--scheduler-timeout",
        type=_positive(float),
        default=30.0,
        metavar="SECONDS",
        help="how long to try reaching the scheduler (default 30)",
    )
    store.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    sel = argparse.ArgumentParser(add_help=False)
    sel.add_argument(
        "--direction", choices=sf.DIRECTIONS, help="which maps (default: txt2img if recorded)"
    )
    sel.add_argument("--span", help="span name(s) (default: prompt)")
    sel.add_argument("--layer", help="layers: names, globs, KIND:GLOB (single:*) (default: all)")
    sel.add_argument("--head", help="heads: 3, 0,3,5, 2:6 (default: all)")
    sel.add_argument("--step", help="steps: 5, 0,5,10, 10:20 inclusive (default: all)")
    sel.add_argument("--reduce", choices=REDUCTIONS, default="mean", help="how to reduce dims")
    sel.add_argument("-o", "--output", required=True, help="figure path (.png)")
    sel.add_argument("--cmap", default="magma", help="matplotlib colormap (default: magma)")
    return {"store": store, "select": sel}


def build_parser(load_record: bool = False) -> argparse.ArgumentParser:
    """The `attnscope` argument parser. `load_record` imports the tracer's record verb."""
    parser = argparse.ArgumentParser(
        prog="attnscope",
        description="Record and study the joint attention of diffusion transformers.",
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    parents = _parents()
    both = [parents["store"], parents["select"]]

    info = sub.add_parser(
        "info",
        parents=[parents["store"]],
        help="runs, prompt, spans, dims, steps complete, size on disk",
    )
    info.add_argument("--json", action="store_true", help="print the summary as JSON")
    info.set_defaults(func=_info)

    hm = sub.add_parser("heatmap", parents=both, help="one map, reduced over the dims you name")
    hm.add_argument(
        "--over",
        help="dims to reduce, e.g. step,layer (default: every dim left with more than one value)",
    )
    hm.add_argument("--overlay", action="store_true", help="draw over the run's stored image")
    hm.set_defaults(func=_heatmap)

    heads = sub.add_parser(
        "heads", parents=both, help="a grid of heads and their similarity matrix"
    )
    heads.add_argument(
        "--metric", choices=SIMILARITIES, default="correlation", help="head similarity metric"
    )
    heads.add_argument(
        "--col-wrap", type=_positive(int), default=6, help="panels per row (default 6)"
    )
    heads.set_defaults(func=_heads)

    steps = sub.add_parser(
        "steps", parents=both, help="a grid of steps, the drift curve, a GIF over timesteps"
    )
    steps.add_argument("--metric", choices=DISTANCES, default="js", help="drift metric")
    steps.add_argument(
        "--reference",
        type=_reference,
        default="final",
        help="compare each step with: final, previous, or a step number (default: final)",
    )
    steps.add_argument(
        "--col-wrap", type=_positive(int), default=7, help="panels per row (default 7)"
    )
    steps.add_argument(
        "--gif",
        nargs="?",
        const=True,
        metavar="PATH",
        help="also write an animation over steps (default path: OUTPUT with .gif)",
    )
    steps.add_argument("--fps", type=_positive(float), default=4.0, help="GIF frames per second")
    steps.set_defaults(func=_steps)

    _add_verify(sub)
    _add_record(sub, load_record)
    return parser


def _verb(argv: Sequence[str]) -> str | None:
    return next((arg for arg in argv if not arg.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `attnscope` command; returns the exit status (0 on success, 1 on an error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(load_record=_verb(argv) == "record")
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "takes_any", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")

    def show(message, category, *_: Any, **__: Any) -> None:
        print(f"attnscope: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        try:
            with _scheduler(
                getattr(args, "scheduler", None), getattr(args, "scheduler_timeout", 0)
            ):
                status = args.func(args)
        except (CommandError, SelectionError, sf.FormatError, OSError) as exc:
            # OSError: a missing store, a figure that cannot be written (permission, full disk).
            print(f"attnscope: error: {exc}", file=sys.stderr)
            return 1
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
