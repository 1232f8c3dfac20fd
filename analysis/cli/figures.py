"""The figure verbs: `heatmap` (one map), `heads` (a grid of heads and their similarity),
`steps` (a grid of steps, the drift curve and an animation). `--scheduler ADDRESS` computes on a
dask.distributed cluster.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import dask
import dask.threaded
import xarray as xr

from .. import store_format as sf
from ..compare import DISTANCES, MAP_DIMS, SIMILARITIES, head_similarity, step_drift
from ..errors import SelectionError, SpanError, UsageError
from ..open import open_trace
from ..plot import (
    animate,
    describe,
    drift_curve,
    ffmpeg,
    grid,
    heatmap,
    overlay,
    similarity_matrix,
)
from ..selection import REDUCTIONS, direction, reduce, select
from .args import DISTRIBUTED_HINT, opening, output_path, positive, storage_options, store_parent


def _figure_parent() -> argparse.ArgumentParser:
    """Options of every figure verb: what to select, how to reduce, where to draw."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--direction", choices=sf.DIRECTIONS, help="which maps (default: txt2img if recorded)"
    )
    parent.add_argument(
        "--span",
        help="a stored span, a phrase of the prompt ('red chair') or text positions START:STOP "
        "(format 2), or a comma-separated list (default: prompt)",
    )
    parent.add_argument(
        "--layer", help="layers: names, globs, a kind (single), KIND:GLOB (single:1?)"
    )
    parent.add_argument("--head", help="heads: 3, 0,3,5, 2:6 inclusive (default: all)")
    parent.add_argument("--step", help="steps: 5, 0,5,10, 10:20 inclusive (default: all)")
    parent.add_argument(
        "--frame", help="latent frames of a video run: 1, 0,2, 1:4 inclusive (default: all)"
    )
    parent.add_argument("--reduce", choices=REDUCTIONS, default="mean", help="how to reduce dims")
    parent.add_argument("-o", "--output", required=True, help="figure path (.png)")
    parent.add_argument("--cmap", default="magma", help="matplotlib colormap (default: magma)")
    parent.add_argument(
        "--scheduler", metavar="ADDRESS", help="dask.distributed scheduler to compute on"
    )
    parent.add_argument(
        "--scheduler-timeout",
        type=positive(float),
        default=30.0,
        metavar="SECONDS",
        help="how long to try reaching the scheduler (default 30)",
    )
    return parent


def add_parser(subparsers: Any, verb: str, help: str) -> None:
    """Add the figure verb `verb` (heatmap, heads, steps or frames) to the command line."""
    parents = [store_parent(), _figure_parent()]
    parser = subparsers.add_parser(verb, parents=parents, help=help, description=help)
    if verb == "heatmap":
        parser.add_argument(
            "--over",
            help="dims to reduce, e.g. step,layer (default: every dim left with more than one "
            "value)",
        )
        parser.add_argument(
            "--overlay", action="store_true", help="draw over the run's stored image"
        )
        func = _heatmap
    elif verb == "heads":
        parser.add_argument(
            "--metric", choices=SIMILARITIES, default="correlation", help="head similarity metric"
        )
        parser.add_argument(
            "--col-wrap", type=positive(int), default=6, help="panels per row (default 6)"
        )
        func = _heads
    elif verb == "steps":
        parser.add_argument("--metric", choices=DISTANCES, default="js", help="drift metric")
        parser.add_argument(
            "--reference",
            type=_reference,
            default="final",
            help="compare each step with: final, previous, or a step number (default: final)",
        )
        parser.add_argument(
            "--col-wrap", type=positive(int), default=7, help="panels per row (default 7)"
        )
        parser.add_argument(
            "--gif",
            nargs="?",
            const=True,
            metavar="PATH",
            help="also write an animation over steps (default path: OUTPUT with .gif)",
        )
        parser.add_argument(
            "--fps", type=positive(float), default=4.0, help="GIF frames per second"
        )
        func = _steps
    else:
        parser.add_argument(
            "--animation",
            metavar="PATH",
            help="also write an animation over the latent frames: a .gif, or an .mp4 (needs "
            "ffmpeg: pip install 'attnscope[video]')",
        )
        parser.add_argument(
            "--fps", type=positive(float), default=4.0, help="animation frames per second"
        )
        func = _frames
    parser.set_defaults(func=lambda args: _on_scheduler(func, args))


def _on_scheduler(func: Any, args: argparse.Namespace) -> None:
    with _scheduler(args):
        func(args)


def _open(args: argparse.Namespace) -> xr.Dataset:
    """The run, with --span as its spans: one span (a name, phrase or START:STOP), else a
    comma-separated list of them."""
    options = storage_options(args.storage_option)
    with opening(args.store):
        if args.span is None:
            return open_trace(args.store, args.run, storage_options=options)
        try:
            return open_trace(args.store, args.run, storage_options=options, spans=[args.span])
        except SpanError:
            if "," not in args.span:
                raise
        spans = [part.strip() for part in args.span.split(",") if part.strip()]
        return open_trace(args.store, args.run, storage_options=options, spans=spans)


def _check_style(args: argparse.Namespace) -> None:
    import matplotlib

    if args.cmap not in matplotlib.colormaps:
        raise UsageError(
            f"unknown colormap {args.cmap!r}; e.g. magma, viridis, rocket, mako, gray "
            f"(any matplotlib colormap)"
        )


def _variable(ds: xr.Dataset, args: argparse.Namespace) -> xr.DataArray:
    return ds[direction(ds, args.direction)]


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
    if args.frame is not None and "frame" not in da.dims:
        raise SelectionError(
            f"--frame {args.frame}: {ds.attrs['run']} has no frame axis (an image model's maps); "
            f"--frame selects the latent frames of a video run"
        )
    return select(da, span=span, layer=args.layer, head=args.head, step=args.step, frame=args.frame)


def _reduce_rest(
    da: xr.DataArray, keep: Sequence[str], how: str
) -> tuple[xr.DataArray, dict[str, str]]:
    """Reduce every dim of `da` but `keep` and the map dims; say how for the title."""
    over = [d for d in da.dims if d not in (*keep, *MAP_DIMS)]
    return _reduce(da, over, how), {d: f"{how} of {da.sizes[d]}" for d in over}


def _reduce(da: xr.DataArray, over: Sequence[str], how: str) -> xr.DataArray:
    """`reduce`, without looking for NaN where the selection has none.

    The CLI opens complete steps only, and a checked read refuses NaN in them as lost data
    unless a cache hook left that map uncomputed (`computed` False). Where every map selected
    was computed, skipping NaN gives the same values, bit for bit, and costs time: on the
    benchmark store a word's mean over every step, layer and head took 1.04-1.07 s skipping
    NaN against 0.83-0.91 s without, the prompt's 5.1 s against 4.5-4.7 s.
    """
    everywhere = "computed" in da.coords and bool(da.computed.all())
    return reduce(da, over, how, skipna=False if everywhere else None)


def _sibling(path: Path, suffix: str, extension: str | None = None) -> Path:
    return path.with_name(f"{path.stem}{suffix}{extension or path.suffix or '.png'}")


@contextlib.contextmanager
def _scheduler(args: argparse.Namespace) -> Iterator[None]:
    """Compute on the dask.distributed scheduler at --scheduler, if one is named, else on dask's
    threads (named by its function: a name sends dask looking for a cluster, which imports
    dask.distributed, 0.2 s of a cold start)."""
    address, timeout = args.scheduler, args.scheduler_timeout
    if address is None:
        with dask.config.set(scheduler=dask.threaded.get):
            yield
        return
    try:
        from distributed import Client
    except ImportError:
        raise UsageError(
            f"--scheduler needs dask.distributed, which is not installed: {DISTRIBUTED_HINT}"
        ) from None
    if not address.strip():
        raise UsageError("--scheduler needs an address, e.g. tcp://10.0.0.5:8786")
    try:
        client = Client(address, timeout=timeout)
    except (OSError, TimeoutError, ValueError) as exc:
        raise UsageError(f"cannot reach the dask scheduler at {address}: {exc}") from None
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


def _heatmap(args: argparse.Namespace) -> None:
    out = output_path(args.output)
    _check_style(args)
    ds = _open(args)
    da = _selection(ds, args)
    if args.over is None:
        over = [d for d in da.dims if d not in MAP_DIMS and da.sizes[d] > 1]
    else:
        named = [d.strip() for d in args.over.split(",") if d.strip()]
        # A dim already narrowed to one value (--head 3) needs no reducing.
        over = [d for d in named if not (d in da.coords and d not in da.dims)]
    m = _reduce(da, over, args.reduce)
    title = describe(m, {d: f"{args.reduce} of {da.sizes[d]}" for d in over})
    with _progress(args):
        if args.overlay:
            if "image" not in ds:
                raise UsageError(f"{ds.attrs['run']} has no stored image to draw over")
            overlay(m, ds.image, out, title=title, cmap=args.cmap)
        else:
            heatmap(m, out, title=title, cmap=args.cmap)
    _done(out)


def _heads(args: argparse.Namespace) -> None:
    out = output_path(args.output)
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
    """An argparse type: `final`, `previous` or a step number."""
    if text in ("final", "previous"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"reference must be 'final', 'previous' or a step number, got {text!r}"
        ) from None


def _steps(args: argparse.Namespace) -> None:
    out = output_path(args.output)
    gif = None
    if args.gif:
        gif = (
            _sibling(out, "", ".gif") if args.gif is True else output_path(args.gif, animation=True)
        )
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


def _frames(args: argparse.Namespace) -> None:
    out = output_path(args.output)
    movie = output_path(args.animation, animation=True) if args.animation else None
    if movie is not None and movie.suffix.lower() == ".mp4":
        ffmpeg()  # missing: said now, before any work
    _check_style(args)
    ds = _open(args)
    da = _selection(ds, args)
    if "frame" not in da.dims:
        raise SelectionError(
            f"frames draws the latent frames of a video run; {ds.attrs['run']} has none (an "
            f"image model's maps, dims {list(map(str, da.dims))})"
        )
    by_step = "step" in da.dims and da.sizes["step"] > 1
    maps, reduced = _reduce_rest(da, ["frame", "step"] if by_step else ["frame"], args.reduce)
    with _progress(args):
        maps = maps.compute()
    title = describe(maps, reduced)
    if by_step:
        grid(maps, col="step", row="frame", path=out, title=title)
    else:
        grid(maps, col="frame", path=out, title=title)
    written = [out]
    if movie is not None:
        over_frames = _reduce(maps, ["step"], args.reduce) if by_step else maps
        animate(
            over_frames,
            movie,
            dim="frame",
            fps=args.fps,
            title=describe(over_frames, reduced),
            progress=not args.quiet,
        )
        written.append(movie)
    _done(*written)
