"""`python -m bench`: run every benchmark and rewrite docs/benchmarks.md.

    python -m bench                # everything (about 2.5 hours on 2 cores):
                                   # docs/benchmarks.md, its raw results in docs/benchmarks.json
    python -m bench --rerun analysis view
                                   # those sections again, the others kept from
                                   # docs/benchmarks.json; the report rewritten
    python -m bench --quick        # quick geometry, small analysis store (< 2 min); prints
                                   # the report unless --output is given
    python -m bench --json r.json  # also keep the raw results
    python -m bench rate           # the writer against a GPU's step rate (bench/rate.py)
    python -m bench gpu gpu.json --at REV
                                   # files the figures of `python -m bench.gpu --json gpu.json`
                                   # (run on a GPU box at commit REV) into the report

This process only orchestrates: every measurement runs in a fresh interpreter
(bench.common.isolated), and this one never imports torch, so that it neither competes for the
cores nor lends its memory to a child's peak RSS.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import analysis_speed, families, rate, s3, video, view
from bench.common import FIXED_MMAP_THRESHOLD, GEOMETRIES, geometry, isolated, log, scratch
from bench.report import render

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = ROOT / "docs" / "benchmarks.md"
# The raw results behind DEFAULT_OUTPUT, kept beside it so that a later session can rerun one
# section (--rerun) without the hours the others take.
DEFAULT_RESULTS = ROOT / "docs" / "benchmarks.json"
RECORDERS = ["attnscope", "attnscope-recompute", "seed", "amd"]


def _pairs(n: int, recorders: list[str] = RECORDERS) -> dict[str, int]:
    """Timing pairs per recorder: n for the baselines, more for attnscope (its ratio has a
    target), fewer for the old path (there for comparison)."""
    counts = {"attnscope": 2 * n - 1, "attnscope-recompute": max(2, n - 1)}
    return {name: counts.get(name, n) for name in recorders}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fast subset (quick geometry only)")
    parser.add_argument(
        "--pairs",
        type=int,
        help="timing pairs per baseline (default 3); attnscope gets 2N - 1, the old path N - 1",
    )
    parser.add_argument(
        "--output", type=Path, help=f"report path (default {DEFAULT_OUTPUT}; --quick: stdout)"
    )
    parser.add_argument(
        "--json", type=Path, help="also write the raw results here (after each benchmark)"
    )
    parser.add_argument(
        "--resume", type=Path, help="results of an interrupted run (--json): run what is missing"
    )
    parser.add_argument(
        "--rerun",
        nargs="+",
        metavar="SECTION",
        help=f"run these sections again (names as logged: machine, rate, analysis, ...), the "
        f"others kept from --resume (default {DEFAULT_RESULTS.name})",
    )
    args = parser.parse_args(argv)
    if not args.quick and args.output is None:  # the report of record: its results beside it
        args.json = args.json or DEFAULT_RESULTS
        if args.rerun:
            args.resume = args.resume or DEFAULT_RESULTS
    if args.rerun and args.resume is None:
        parser.error("--rerun needs the results to keep: give them with --resume")
    return args


def _kept(args: argparse.Namespace) -> dict[str, Any]:
    """The results to start from: none, those of --resume, less the sections to --rerun."""
    if args.resume is None:
        return {}
    if not args.resume.exists():
        raise SystemExit(f"--resume {args.resume}: no such file; run `python -m bench` first")
    results: dict[str, Any] = json.loads(args.resume.read_text())
    done = results.setdefault("done", {})
    unknown = [name for name in args.rerun or () if name not in done]
    if unknown:
        raise SystemExit(
            f"--rerun {' '.join(unknown)}: not a section of {args.resume}; its sections: "
            f"{', '.join(done)}"
        )
    for name in args.rerun or ():
        del done[name]
    return results


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    results = _kept(args)
    this = {
        "command": "python -m bench" + (" " + shlex.join(sys.argv[1:]) if sys.argv[1:] else ""),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    # A report resumed stays the kept run's, with what was measured since: the sections asked
    # to --rerun, and any it lacked (an interrupted run's, or one this bench has added since).
    since = this | {"sections": list(args.rerun or ())}
    if "command" in results:
        results.setdefault("reruns", []).append(since)
    else:
        results |= this | {"quick": args.quick}
    for key in ("overhead", "memory", "store", "skipped", "done"):
        results.setdefault(key, {})
    earlier = results.get("total_seconds", 0.0)  # of the run resumed
    main = "quick" if args.quick else "flux-cpu"
    geo = asdict(GEOMETRIES[main])
    pairs = {"quick": _pairs(args.pairs or 3), "flux-cpu": _pairs(args.pairs or 3)}
    # Growth with the number of steps: the same token layout and maps (so the same tracer
    # buffers) on narrower heads, at two lengths.
    growth = GEOMETRIES["quick"] if args.quick else geometry("flux-cpu", attention_head_dim=32)

    def section(key: str, work: Any) -> None:
        if key in results["done"]:
            log(f"{key}: kept from {args.resume}")
            return
        log(key)
        work()
        if key not in since["sections"]:
            since["sections"].append(key)
        results["done"][key] = True
        results["total_seconds"] = earlier + time.perf_counter() - started
        if args.json:  # partial results survive a failure later on (see --resume)
            args.json.write_text(json.dumps(results, indent=1))

    section("machine", lambda: results.update(machine=isolated("bench.common:machine")))
    # Tracing overhead, every variant side by side in one process per geometry.
    for name in ["quick"] if args.quick else ["quick", "flux-cpu"]:
        section(
            f"overhead {name}",
            lambda name=name: results["overhead"].update(
                {
                    name: isolated(
                        "bench.overhead:measure",
                        geometry=asdict(GEOMETRIES[name]),
                        pairs=pairs[name],
                    )
                }
            ),
        )
    if "gpu" in results["machine"]:
        section("overhead flux-dev-gpu", lambda: _gpu(results, args.pairs or 2))
    else:
        results["skipped"]["flux-dev-gpu"] = "no CUDA device on this machine"

    # Peak host memory, one fresh process per run, with glibc's mmap threshold fixed (the
    # figures), then as glibc behaves by default, twice each (for scale; not in --quick).
    def memory(order: list[str], allocator: str) -> list[dict[str, Any]]:
        env = FIXED_MMAP_THRESHOLD if allocator == "fixed" else None
        runs = [
            isolated("bench.memory:measure", env=env, geometry=geo, variant=v, steps=2)
            for v in order
        ]
        return [run | {"allocator": allocator} for run in runs]

    section(
        f"memory {main}",
        lambda: results["memory"].update(
            {
                main: memory(["untraced", "attnscope", "seed", "amd"], "fixed")
                + ([] if args.quick else memory(["untraced", "attnscope"] * 2, "default"))
            }
        ),
    )
    section(
        f"memory growth {growth.name}",
        lambda: results.update(
            growth={
                "geometry": asdict(growth),
                "runs": [
                    isolated(
                        "bench.memory:measure",
                        env=FIXED_MMAP_THRESHOLD,
                        geometry=asdict(growth),
                        variant=v,
                        steps=n,
                    )
                    for n in (2, 8)
                    for v in ("untraced", "attnscope")
                ],
            }
        ),
    )
    section(
        f"store size {main}",
        lambda: results["store"].update({main: isolated("bench.store_size:measure", geometry=geo)}),
    )
    section("rows", lambda: results.update(rows=isolated("bench.rows:measure")))
    section("codecs", lambda: results.update(codecs=isolated("bench.codecs:measure")))
    section("rate", lambda: results.update(rate=rate.figures()))
    section("slow disk", lambda: results.update(slow_disk=isolated("bench.slow_disk:measure")))
    section("analysis", lambda: results.update(analysis=_analysis(args.quick)))
    section("s3", lambda: results.update(s3=s3.figures(pairs=2 if args.quick else 3)))
    section("families", lambda: results.update(families=families.figures(2 if args.quick else 3)))
    section("video", lambda: results.update(video=video.figures(2 if args.quick else 3)))
    section("view", lambda: results.update(view=view.figures(10 if args.quick else view.MOVES)))
    if since in results.get("reruns", []) and not since["sections"]:
        results["reruns"].remove(since)  # a resumed report that lacked nothing: nothing to say
    results["total_seconds"] = earlier + time.perf_counter() - started
    return results


def _gpu(results: dict[str, Any], n: int) -> None:
    geo = GEOMETRIES["flux-dev-gpu"]
    log("overhead: flux-dev-gpu")
    results["overhead"][geo.name] = isolated(
        "bench.overhead:measure",
        geometry=asdict(geo),
        pairs=_pairs(n, ["attnscope", "attnscope-recompute"]),
    )
    results["skipped"]["flux-dev-gpu baselines"] = (
        "at FLUX.1-dev's full shape the seed method would write "
        f"{_seed_bytes(geo) / 1e9:.0f} GB of .npy files and attention-map-diffusers would hold "
        f"{_amd_bytes(geo) / 1e9:.0f} GB of maps in host RAM (over its own 8 GiB capture budget)"
    )


def _seed_bytes(geo: Any) -> int:
    n_image = geo.tokens - geo.text_len
    layers = geo.num_layers + geo.num_single_layers
    return 2 * layers * geo.steps * geo.num_attention_heads * geo.text_len * n_image * 4


def _amd_bytes(geo: Any) -> int:
    n_image = geo.tokens - geo.text_len
    return 2 * geo.num_layers * geo.steps * geo.num_attention_heads * geo.text_len * n_image * 2


def _analysis(quick: bool) -> dict[str, Any]:
    shape = {"steps": 2, "double": 19, "single": 38} if quick else {}
    with scratch("analysis") as workdir:
        store = str(workdir / "synthetic.zarr")
        log("analysis: writing the synthetic store")
        written = isolated("bench.analysis_speed:write_store", path=store, **shape)
        log("analysis: mean heatmap over the whole store")
        mean = isolated(
            "bench.analysis_speed:mean_heatmap", path=store, png=str(workdir / "mean.png")
        )
        log("analysis: the same mean, the allocator set as the attnscope command sets it")
        tuned = isolated("bench.analysis_speed:mean_allocator_tuned", path=store)
        log("analysis: CLI from a cold start")
        cli = analysis_speed.cli_figures(store, str(workdir), repeats=3)
    return {"write": written, "mean": mean, "mean_tuned": tuned, "cli": cli}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["rate"]:
        return rate.main(argv[1:])
    if argv[:1] == ["gpu"]:
        return file_gpu(argv[1:])
    args = _parse(argv)
    results = run(args)
    report = render(results)
    output = args.output or (None if args.quick else DEFAULT_OUTPUT)
    if output is None:
        print(report)
    else:
        output.write_text(report)
        log(f"wrote {output}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    log(f"done in {results['total_seconds'] / 60:.1f} min")
    return 0


def file_gpu(argv: list[str]) -> int:
    """`python -m bench gpu FILE --at REV`: the figures a GPU box measured with `python -m
    bench.gpu --json FILE` into the results (`gpu_box`), and the report rewritten from them."""
    parser = argparse.ArgumentParser(prog="python -m bench gpu", description=file_gpu.__doc__)
    parser.add_argument("figures", type=Path, help="the JSON `python -m bench.gpu` wrote")
    parser.add_argument("--at", required=True, help="the commit the GPU box ran")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    figures = json.loads(args.figures.read_text())
    if figures.get("geometry", {}).get("device") != "cuda":
        parser.error(f"{args.figures}: not the figures of a GPU run (a --smoke run's?)")
    results = json.loads(args.results.read_text())
    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    results["gpu_box"] = figures | {"at": args.at, "filed": date}
    command = "python -m bench gpu " + shlex.join(argv)
    results.setdefault("reruns", []).append(
        {"command": command, "date": date, "sections": ["gpu box"]}
    )
    args.results.write_text(json.dumps(results, indent=1))
    args.output.write_text(render(results))
    log(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
