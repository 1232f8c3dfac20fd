"""`attnscope record`: run a pipeline under the tracer from the shell."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from analysis import store_format as fmt
from tracer.spans import parse_span_argument

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_indices(text: str) -> list[int]:
    """`0,3,5`, `10:20` (stop excluded) or a mix such as `0,4:8` as a list of ints."""
    values: list[int] = []
    for part in text.split(","):
        part = part.strip()
        start, sep, stop = part.partition(":")
        try:
            values += list(range(int(start), int(stop))) if sep else [int(part)]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"bad index list {text!r}: expected integers and START:STOP ranges, e.g. 0,3,8:12"
            ) from None
    return values


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def add_record_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `record` verb to the `attnscope` command line."""
    parser = subparsers.add_parser(
        "record",
        help="generate an image and record its attention into a trace store",
        description="Run a FLUX pipeline once and record every traced attention into STORE.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="local path or hub id of a FLUX pipeline")
    source.add_argument("--demo", action="store_true", help="a small random-weight FLUX (CPU)")
    parser.add_argument("--out", required=True, help="trace store to write (a .zarr path)")
    parser.add_argument("--prompt", default=None, help="the prompt (demo default: a cat)")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--true-cfg-scale", type=float, default=1.0)
    parser.add_argument("--guidance-scale", type=float, default=3.5)
    parser.add_argument("--num-inference-steps", "--num-steps", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-sequence-length", type=int, default=None)
    parser.add_argument(
        "--span",
        action="append",
        default=None,
        metavar="NAME=WORDS|NAME=START:STOP",
        help="a span to record (repeatable); default: the prompt and each of its words",
    )
    parser.add_argument("--layers", type=_names, default=None, help="names, globs or a kind")
    parser.add_argument("--heads", type=parse_indices, default=None, help="e.g. 0,3,5 or 0:8")
    parser.add_argument("--steps", type=parse_indices, default=None, help="steps to record")
    parser.add_argument("--directions", type=_names, default=list(fmt.DIRECTIONS))
    parser.add_argument("--keepbits", type=int, default=fmt.DEFAULT_KEEPBITS)
    parser.add_argument("--lossless", action="store_true", help="store without bit rounding")
    parser.add_argument("--chunk-size", type=int, default=256, help="queries per capture chunk")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    parser.add_argument("--revision", default=None, help="model revision (hub)")
    parser.add_argument("--backend", choices=["auto", "diffusers"], default="auto")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--append", action="store_true", help="add a run to an existing store")
    existing.add_argument("--overwrite", action="store_true", help="replace an existing store")
    parser.set_defaults(run=run_record)
    return parser


def _load_pipeline(args: argparse.Namespace, device: str, dtype: torch.dtype) -> Any:
    if args.demo:
        from tracer.demo import demo_pipeline

        return demo_pipeline(seed=args.seed).to(device)
    from diffusers import DiffusionPipeline

    local = Path(args.model).exists()
    pipe = DiffusionPipeline.from_pretrained(
        args.model, torch_dtype=dtype, revision=args.revision, local_files_only=local
    )
    return pipe.to(device)


def _check_out(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if not out.exists() or args.append:
        return
    if args.overwrite:
        shutil.rmtree(out) if out.is_dir() else out.unlink()
        return
    raise SystemExit(
        f"attnscope record: {out} already exists; pass --append to add a run to it or "
        f"--overwrite to replace it"
    )


def run_record(args: argparse.Namespace) -> int:
    """Load the pipeline, generate once under `tracer.trace`, report the run written."""
    from tracer import trace

    spans = None
    if args.span:
        try:
            spans = dict(parse_span_argument(item) for item in args.span)
        except ValueError as error:
            raise SystemExit(f"attnscope record: {error}") from None
    _check_out(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    default_dtype = "bfloat16" if device.startswith("cuda") else "float32"
    dtype = DTYPES[args.dtype or default_dtype]
    pipe = _load_pipeline(args, device, dtype)
    call: dict[str, Any] = {
        "prompt": args.prompt or "a photo of a cat sitting on a red chair",
        "negative_prompt": args.negative_prompt,
        "true_cfg_scale": args.true_cfg_scale,
        "guidance_scale": args.guidance_scale,
        "generator": torch.Generator(device="cpu").manual_seed(args.seed),
    }
    defaults = {"num_inference_steps": 4, "height": 128, "width": 128, "max_sequence_length": 32}
    for key in ("num_inference_steps", "height", "width", "max_sequence_length"):
        value = getattr(args, key)
        if value is None and args.demo:
            value = defaults[key]
        if value is not None:
            call[key] = value
    with trace(
        pipe,
        args.out,
        spans=spans,
        layers=args.layers,
        heads=args.heads,
        steps=args.steps,
        directions=args.directions,
        chunk_size=args.chunk_size,
        keepbits=None if args.lossless else args.keepbits,
    ) as recorder:
        pipe(**call)
    print(f"recorded {recorder.last_run} into {args.out}", file=sys.stderr)
    return 0
