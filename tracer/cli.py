"""`attnscope record`: run a pipeline under the tracer from the shell."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from analysis import store_format as fmt
from analysis.allocator import ENVIRONMENT, arenas, reuse_freed_memory
from analysis.cli.args import integers, names, positive
from analysis.errors import AttnscopeError, UsageError, WriterError
from tracer.claims import DEFAULT_LEASE_SECONDS
from tracer.pinning import pin_at_size
from tracer.rounding import MODEL_PRECISION
from tracer.spans import parse_span_argument

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# `--demo FAMILY`: the module and function building its small random-weight pipeline.
DEMOS = {
    "flux": ("tracer.demo", "demo_pipeline"),
    "sd3": ("tracer.demo_sd3", "demo_sd3_pipeline"),
    "chroma": ("tracer.demo_chroma", "demo_chroma_pipeline"),
    "flux2": ("tracer.demo_flux2", "demo_flux2_pipeline"),
    "flux2-dev": ("tracer.demo_flux2", "demo_flux2_dev_pipeline"),
    "qwen-image": ("tracer.demo_qwen_image", "demo_qwen_image_pipeline"),
    "sana": ("tracer.demo_sana", "demo_sana_pipeline"),
    "z-image": ("tracer.demo_z_image", "demo_z_image_pipeline"),
    "lumina2": ("tracer.demo_lumina2", "demo_lumina2_pipeline"),
    "cogview4": ("tracer.demo_cogview4", "demo_cogview4_pipeline"),
    "hidream": ("tracer.demo_hidream", "demo_hidream_pipeline"),
    "wan": ("tracer.demo_wan", "demo_wan_pipeline"),
    "cogvideox": ("tracer.demo_cogvideox", "demo_cogvideox_pipeline"),
    "hunyuan-video15": ("tracer.demo_hunyuan_video15", "demo_hunyuan_video15_pipeline"),
}

# The text length of a demo's calls: 32 tokens, or what its prompt needs where that is more
# (Lumina2 and FLUX.2 [dev] put a system prompt before the prompt, and keep what fits); None
# where the pipeline takes no such argument (HunyuanVideo 1.5's demo sets its lengths itself).
DEMO_TEXT_LEN = {"lumina2": 256, "flux2-dev": 512, "hunyuan-video15": None}
# The video frames of a video demo's calls: two latent frames (4 video frames each, after the
# first alone).
DEMO_NUM_FRAMES = {"wan": 5, "cogvideox": 5, "hunyuan-video15": 5}
# A generation that waited on the writer longer than this share of its time, and longer than a
# run's fixed cost (laying it down, syncing its last step: well under a second), is told what
# writes less (at FLUX.1-dev's shape on an H200 it waited 18 of 28 s: docs/benchmarks.md).
WAITED_WORTH_A_HINT = 0.1
WAITED_SECONDS_WORTH_A_HINT = 1.0


def load_demo(family: str, **kwargs: Any) -> Any:
    """The small random-weight pipeline of `family` (a key of DEMOS), built with `kwargs`."""
    module, function = DEMOS[family]
    return getattr(importlib.import_module(module), function)(**kwargs)


def _pixels(text: str) -> int:
    """An image side in pixels: at least one FLUX latent token (16 pixels)."""
    value = positive(int)(text)
    if value < 16:
        raise argparse.ArgumentTypeError(f"expected at least 16 pixels, got {text!r}")
    return value


def _positions(text: str) -> tuple[int, int]:
    """Text positions START:STOP (stop excluded), as spans name token ranges."""
    start, sep, stop = text.partition(":")
    if not (sep and start.strip().isdigit() and stop.strip().isdigit()):
        raise argparse.ArgumentTypeError(f"expected START:STOP text positions, got {text!r}")
    if int(start) >= int(stop):
        raise argparse.ArgumentTypeError(f"expected START < STOP, got {text!r}")
    return int(start), int(stop)


def add_parser(subparsers: Any, verb: str, help: str) -> None:
    """Add the `record` verb to the `attnscope` command line."""
    parser = subparsers.add_parser(
        verb,
        help=help,
        description="Run a pipeline of a supported family (README, Model families) and record "
        "every traced attention into a store. "
        "--layers, --heads and --steps take the selection syntax of every verb: names, lists "
        "(0,3,5), inclusive ranges (0:7), globs, a layer kind (single) or KIND:GLOB.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="local path or hub id of a diffusers pipeline")
    source.add_argument(
        "--demo",
        nargs="?",
        const="flux",
        choices=sorted(DEMOS),
        default=None,
        help="a small random-weight pipeline of a family (CPU; default flux)",
    )
    parser.add_argument("--out", required=True, help="trace store to write (a .zarr path)")
    prompts = parser.add_mutually_exclusive_group()
    prompts.add_argument("--prompt", default=None, help="the prompt (demo default: a cat)")
    prompts.add_argument(
        "--prompts",
        default=None,
        metavar="FILE",
        help="a prompt sweep: one prompt per line, one run each (times --seeds); rerunning "
        "the same command resumes it, skipping runs already complete. Started N times on one "
        "store (N GPUs or boxes), the workers split it: each run is claimed in the store",
    )
    parser.add_argument(
        "--lease",
        type=positive(float),
        default=DEFAULT_LEASE_SECONDS,
        metavar="SECONDS",
        help="a sweep worker that has not renewed its claim for this long is taken for dead: "
        f"another records its run again (default {DEFAULT_LEASE_SECONDS:.0f})",
    )
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument(
        "--true-cfg-scale", type=float, default=None, help="(FLUX) default: the pipeline's"
    )
    parser.add_argument(
        "--guidance-scale", type=float, default=None, help="default: the pipeline's"
    )
    parser.add_argument("--num-inference-steps", "--num-steps", type=positive(int), default=None)
    parser.add_argument("--height", type=_pixels, default=None)
    parser.add_argument("--width", type=_pixels, default=None)
    parser.add_argument(
        "--num-frames",
        type=positive(int),
        default=None,
        help="(video models) default: the pipeline's",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--seeds", type=integers, default=None, help="seeds of a sweep, e.g. 0,1,2 or 0:3"
    )
    parser.add_argument("--max-sequence-length", type=positive(int), default=None)
    parser.add_argument(
        "--span",
        action="append",
        default=None,
        metavar="NAME=WORDS|NAME=START:STOP",
        help="a span to record (repeatable); default: the prompt and each of its words",
    )
    parser.add_argument(
        "--keep-tokens",
        type=_positions,
        default=None,
        metavar="START:STOP",
        help="also store these padding positions as rows of their own (default: each "
        "segment's padding is one summed row; content tokens are always rows)",
    )
    parser.add_argument("--layers", default=None, help="e.g. single, transformer_blocks.*")
    parser.add_argument("--heads", default=None, help="e.g. 3, 0,3,5 or 0:7 (inclusive)")
    parser.add_argument("--steps", default=None, help="steps to record, e.g. 0,10:20")
    parser.add_argument("--directions", type=names, default=list(fmt.DIRECTIONS))
    parser.add_argument(
        "--keepbits",
        type=_keepbits,
        default=MODEL_PRECISION,
        help="mantissa bits each value keeps, relative error at most 2^-(N+1); default 'model': "
        "the model's own precision, 7 for bf16 (its attention kernel rounds its probabilities "
        f"so) and {fmt.DEFAULT_KEEPBITS} otherwise; each bit fewer stores about an eighth of a "
        "byte less per value",
    )
    parser.add_argument("--lossless", action="store_true", help="store without bit rounding")
    parser.add_argument("--chunk-size", type=int, default=256, help="queries per capture chunk")
    parser.add_argument(
        "--max-pending-steps",
        type=positive(int),
        default=2,
        help="steps taken and not yet on disk (default 2): each holds one step of maps in host "
        "memory; a step's encoding spreads over the cores but copying it in and writing it out "
        "do not, so on many cores more may keep more of them busy",
    )
    parser.add_argument(
        "--no-fsync",
        action="store_true",
        help="leave each step in the page cache unsynced: the generation does not wait for the "
        "disk to sync every step, and a listed step survives a crash of the process but not "
        "of the machine",
    )
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    parser.add_argument("--revision", default=None, help="model revision (hub)")
    parser.add_argument(
        "--backend",
        choices=["diffusers", "diffsynth"],
        default="diffusers",
        help="library that runs the model (diffsynth: DiffSynth-Studio FluxImagePipeline)",
    )
    parser.add_argument(
        "--entity",
        action="append",
        default=None,
        metavar="[NAME=]PROMPT",
        help="an EliGen entity prompt (diffsynth, repeatable); its span is NAME or entityK",
    )
    parser.add_argument(
        "--entity-mask",
        action="append",
        default=None,
        metavar="PNG|LEFT,TOP,RIGHT,BOTTOM",
        help="the entity's mask: an image (white inside) or a pixel box; one per --entity",
    )
    parser.add_argument(
        "--estimate",
        action="store_true",
        help="print the bytes per step and per generation, decoded and on disk, and the write "
        "rates (decoded, and to disk) needed at --step-seconds, and for a local --out whether "
        "the disk and the writer keep up there (probed beside it); generate nothing",
    )
    parser.add_argument(
        "--step-seconds",
        type=positive(float),
        default=0.15,
        help="step time the write rate is stated for (default 0.15: FLUX.1-dev on an H100)",
    )
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--append", action="store_true", help="add a run to an existing store")
    existing.add_argument("--overwrite", action="store_true", help="replace an existing store")
    parser.set_defaults(func=run_record)


def _load_pipeline(args: argparse.Namespace, device: str, dtype: torch.dtype) -> Any:
    if args.backend == "diffsynth":
        return _load_diffsynth(args, device, dtype)
    if args.demo:
        return load_demo(args.demo, seed=args.seed).to(device)
    from diffusers import DiffusionPipeline

    local = Path(args.model).exists()
    pipe = DiffusionPipeline.from_pretrained(
        args.model, dtype=dtype, revision=args.revision, local_files_only=local
    )
    return pipe.to(device)


def _one_progress_bar(pipe: Any) -> None:
    """Leave attnscope's bar (steps recorded) the only one: the pipeline's counts the same."""
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)


def _load_diffsynth(args: argparse.Namespace, device: str, dtype: torch.dtype) -> Any:
    if args.demo:
        if args.demo != "flux":
            raise UsageError(
                f"record: --backend diffsynth runs FLUX only; --demo {args.demo} runs on diffusers"
            )
        from tracer.demo_diffsynth import demo_diffsynth_pipeline

        return demo_diffsynth_pipeline(seed=args.seed, device=device)
    from diffsynth.pipelines.flux_image import FluxImagePipeline, ModelConfig

    # FLUX.1's files as DiffSynth-Studio's own FLUX examples name them.
    patterns = [
        "flux1-dev.safetensors",
        "text_encoder/model.safetensors",
        "text_encoder_2/",
        "ae.safetensors",
    ]
    configs = [ModelConfig(model_id=args.model, origin_file_pattern=p) for p in patterns]
    return FluxImagePipeline.from_pretrained(
        torch_dtype=dtype, device=device, model_configs=configs
    )


def _entities(args: argparse.Namespace) -> tuple[list[str] | None, dict[str, Any]]:
    """Entity names and the EliGen call arguments from --entity / --entity-mask."""
    prompts, masks = args.entity or [], args.entity_mask or []
    if not prompts and not masks:
        return None, {}
    if args.backend != "diffsynth":
        raise UsageError("record: --entity needs --backend diffsynth (EliGen)")
    if len(prompts) != len(masks):
        raise UsageError(
            f"record: {len(prompts)} --entity but {len(masks)} --entity-mask; "
            f"give one mask per entity"
        )
    from PIL import Image

    from tracer.adapters.diffsynth_flux import box_mask

    names, texts, images = [], [], []
    for k, (entity, mask) in enumerate(zip(prompts, masks, strict=True)):
        name, sep, text = entity.partition("=")
        names.append(name.strip() if sep else f"entity{k}")
        texts.append(text.strip() if sep else entity)
        if Path(mask).exists():
            images.append(Image.open(mask).convert("RGB"))
            continue
        try:
            left, top, right, bottom = (int(v) for v in mask.split(","))
        except ValueError:
            raise UsageError(
                f"record: --entity-mask {mask!r} is neither an image file nor a box "
                f"LEFT,TOP,RIGHT,BOTTOM in pixels"
            ) from None
        images.append(box_mask(args.height, args.width, (left, top, right, bottom)))
    call = {"eligen_entity_prompts": texts, "eligen_entity_masks": images}
    return names, call


def _is_trace_store(path: Path | str) -> bool:
    """Whether `path` is an attnscope trace store (of any format version)."""
    from analysis import trust
    from analysis.open import read_only_store

    try:
        attrs = trust.check_root(read_only_store(str(path)), str(path))
    except (fmt.FormatError, OSError):
        return False
    return fmt.FORMAT_ATTR in attrs


def _check_out(args: argparse.Namespace) -> bool:
    """Make sure writing to --out is what the user asked for; True if this created the folder.

    Without --append, the store is created here, exclusively: an existing path (or one another
    recorder creates at the same moment) is refused unless --overwrite, which replaces attnscope
    trace stores only, never another folder or file.
    """
    if args.append:
        return False  # the tracer itself refuses anything that is not a trace store
    if _is_url(args.out):
        _check_url_out(args)
        return False
    out = Path(args.out)
    if out.exists() or out.is_symlink():
        if not args.overwrite:
            raise UsageError(
                f"record: {out} already exists; pass --append to add a run to it or "
                f"--overwrite to replace it"
            )
        if out.is_symlink() or not _is_trace_store(out):
            raise UsageError(
                f"record: --overwrite replaces attnscope trace stores only, and {out} is not "
                f"one (no zarr.json with {fmt.FORMAT_ATTR!r}); remove it yourself if you mean it"
            )
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True)
    except FileExistsError:
        raise UsageError(
            f"record: {out} was just created by another command; pass --append to add a run to it"
        ) from None
    except OSError as error:
        raise UsageError(f"record: cannot create {out}: {error}") from None
    return True


def _apply_defaults(args: argparse.Namespace) -> None:
    """Fill the sizes left unset: small ones for the demo, FLUX's 1024² otherwise."""
    if args.demo:
        defaults = {
            "num_inference_steps": 4,
            "height": 128,
            "width": 128,
            "max_sequence_length": DEMO_TEXT_LEN.get(args.demo, 32),
            "num_frames": DEMO_NUM_FRAMES.get(args.demo),
        }
    else:
        defaults = {"height": 1024, "width": 1024}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def _call_arguments(args: argparse.Namespace, prompt: str, seed: int) -> dict[str, Any]:
    """One pipeline call of a `record` command, in the backend's own argument names."""
    call: dict[str, Any] = {
        "prompt": prompt,
        "num_inference_steps": args.num_inference_steps,
        "height": args.height,
        "width": args.width,
    }
    if args.backend == "diffsynth":
        call |= {
            # attnscope's own bar counts the steps; a second one would interleave with it.
            "progress_bar_cmd": _silent,
            "negative_prompt": args.negative_prompt or "",
            "cfg_scale": args.true_cfg_scale,
            "embedded_guidance": args.guidance_scale,
            "seed": seed,
            "t5_sequence_length": args.max_sequence_length,
        }
    else:
        call |= {
            "negative_prompt": args.negative_prompt,
            "true_cfg_scale": args.true_cfg_scale,
            "guidance_scale": args.guidance_scale,
            "generator": torch.Generator(device="cpu").manual_seed(seed),
            "max_sequence_length": args.max_sequence_length,
            "num_frames": args.num_frames,
        }
    return {key: value for key, value in call.items() if value is not None}


def _silent(steps: Any) -> Any:
    """DiffSynth's `progress_bar_cmd` that draws nothing."""
    return steps


def _estimate(
    args: argparse.Namespace,
    pipe: Any,
    prompt: str,
    seed: int,
    entity_names: list[str] | None,
    eligen: dict[str, Any],
) -> Any:
    from tracer.estimate import estimate

    return estimate(
        pipe,
        _call_arguments(args, prompt, seed) | eligen,
        step_seconds=args.step_seconds,
        entity_names=entity_names,
        max_pending_steps=args.max_pending_steps,
        **_recorded(args),
    )


def _keepbits(text: str) -> int | str:
    """--keepbits: a number of bits, or 'model'."""
    if text == MODEL_PRECISION:
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of mantissa bits (1..23) or {MODEL_PRECISION!r}, got {text!r}"
        ) from None


def _recorded(args: argparse.Namespace) -> dict[str, Any]:
    """What `record` records, as options of `tracer.trace` (and of `tracer.estimate`)."""
    return {
        "layers": args.layers,
        "heads": args.heads,
        "steps": args.steps,
        "directions": args.directions,
        "keep_tokens": args.keep_tokens,
        "keepbits": None if args.lossless else args.keepbits,
        "fsync": not args.no_fsync,
    }


def _is_url(out: str) -> bool:
    return "://" in out


def _check_url_out(args: argparse.Namespace) -> None:
    """--out on an object store: refuse an existing store unless --overwrite (then remove it)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(args.out)
    if not fs.exists(root):
        return
    if not args.overwrite:
        raise UsageError(
            f"record: {args.out} already exists; pass --append to add a run to it or "
            f"--overwrite to replace it"
        )
    if not _is_trace_store(args.out):
        raise UsageError(
            f"record: --overwrite replaces attnscope trace stores only, and {args.out} is not "
            f"one (no zarr.json with {fmt.FORMAT_ATTR!r}); remove it yourself if you mean it"
        )
    fs.rm(root, recursive=True)


def _recorded_line(recorder: Any, out: str, seconds: float) -> str:
    """What a recorded generation cost: the seconds the generation waited for the writer, and
    what writes less where that is much of its time."""
    writing = recorder.writing[recorder.last_run]
    said = (
        f"recorded {recorder.last_run} into {out} in {seconds:.1f} s, of which the generation "
        f"waited {writing.waited_s:.1f} s for the writer ({writing.decoded_mb_s:,.0f} MB/s "
        f"decoded made durable)"
    )
    if writing.waited_s > max(WAITED_SECONDS_WORTH_A_HINT, WAITED_WORTH_A_HINT * seconds):
        said += (
            "; the host or its disk writes slower than the model computes: fewer --keepbits "
            "(each bit an eighth of a byte less per value), fewer --layers, --heads or --steps, "
            "or one of --directions writes less; --estimate says whether the disk and the "
            "writer keep up"
        )
    return said


def _check_disk(out: str, costs: list[Any]) -> None:
    """Refuse a recording that cannot fit on the disk it goes to (local paths)."""
    from tracer.store import folder_beside

    folder = folder_beside(out)
    if folder is None:
        return  # an object store says when it is full, as a failed write
    free = shutil.disk_usage(folder).free
    needed = sum(cost.stored_bytes for cost in costs)
    if needed > free:
        raise UsageError(
            f"record: {len(costs)} run(s) need about {needed / 1e9:.1f} GB on disk but "
            f"{folder} has {free / 1e9:.1f} GB free; narrow the recording (--layers, --heads, "
            f"--steps, --directions), keep fewer bits (--keepbits) or see the cost first with "
            f"--estimate"
        )


def _jobs(args: argparse.Namespace) -> list[tuple[str, int]]:
    """The (prompt, seed) generations a `record` command asks for, in order."""
    if args.prompts is None:
        return [(args.prompt or "a photo of a cat sitting on a red chair", args.seed)]
    try:
        lines = Path(args.prompts).read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise UsageError(f"record: can't read --prompts {args.prompts}: {error}") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    if not prompts:
        raise UsageError(f"record: --prompts {args.prompts} holds no prompt")
    return [(prompt, seed) for prompt in prompts for seed in args.seeds or [args.seed]]


def _complete_runs(path: str) -> set[tuple[str, int]]:
    """(prompt, seed) of the runs already complete in the store at `path`, if there is one."""
    from analysis.open import list_runs

    if _is_url(path):
        return {(r.attrs.get(fmt.PROMPT), r.attrs.get(fmt.SEED)) for r in _url_runs(path)}
    folder = Path(path)
    if not (folder / "zarr.json").exists():
        return set()  # nothing recorded yet (or not a store: the tracer refuses to write there)
    if not any(
        fmt.run_index(entry.name) is not None and (entry / "zarr.json").exists()
        for entry in folder.iterdir()
    ):
        return set()  # no run laid down yet (a name may be claimed by a recorder starting now)
    runs = list_runs(path)
    return {(run.attrs.get(fmt.PROMPT), run.attrs.get(fmt.SEED)) for run in runs if run.is_complete}


def _url_runs(path: str) -> list[Any]:
    """The complete runs of the store at URL `path`; none if there is no store there yet."""
    from analysis.open import list_runs

    try:
        return [run for run in list_runs(path) if run.is_complete]
    except FileNotFoundError:
        return []
    except fmt.FormatError:
        if not _is_trace_store(path):
            return []  # nothing recorded there yet; the tracer refuses a foreign store
        raise


def _claimed(args: argparse.Namespace, jobs: list[tuple[str, int]]) -> Iterator[tuple[str, int]]:
    """The jobs this process is to record, each under its claim while the caller records it.

    A single run needs no claim. In a sweep, a job another worker holds is left to it and
    looked at again once the rest are done: it ends complete, or its claim expires and is taken
    over here (the dead worker's run marked `failed: abandoned`). Returns when every job is
    complete in the store.
    """
    if args.prompts is None:
        yield from jobs
        return
    from tracer.claims import Claims
    from tracer.store import open_store

    open_store(args.out)  # the root before the claims folder: never a folder without zarr.json
    claims = Claims(args.out, args.lease)
    pending = list(jobs)
    while pending:
        done = _complete_runs(args.out)
        pending = [job for job in pending if job not in done]
        held = []
        for job in pending:
            taken = claims.take(*job)
            if taken is None:
                held.append(job)
                continue
            with claims.heartbeat(*job, taken[0]):  # released when the block ends
                if job in _complete_runs(args.out):
                    continue  # its last holder finished it, then let the claim go
                if taken[1] is not None:
                    _abandon(args.out, *job)
                yield job
        if held and held == pending:
            time.sleep(min(args.lease / 4, 5.0))  # their workers finish them, or their leases end
        pending = held


def _abandon(out: str, prompt: str, seed: int) -> None:
    """Mark the runs of (prompt, seed) still `recording` as `failed: abandoned`: their worker
    let its claim expire."""
    import zarr

    from analysis.open import list_runs

    for run in list_runs(out):
        same = (run.attrs.get(fmt.PROMPT), run.attrs.get(fmt.SEED)) == (prompt, seed)
        if same and run.status == fmt.RECORDING:
            group = zarr.open_group(out, path=run.name, mode="r+")
            group.attrs.update({fmt.STATUS: fmt.failed("abandoned")})
            print(
                f"{run.name} ({prompt!r}, seed {seed}) was abandoned; recording it again",
                file=sys.stderr,
            )


def _reuse_freed_memory() -> str | None:
    """Set the allocator for the recording; what to warn of where threads that started earlier
    defeat it (analysis.allocator)."""
    if reuse_freed_memory():
        return None
    count = arenas()
    if count is None or count == 1:
        return None  # not glibc's allocator, or no thread's arena to blame
    return (
        f"this process has {count} malloc arenas before recording (threads allocated before "
        f"attnscope could set glibc's allocator), so the writer's step buffers are faulted in "
        f"afresh every step, which costs it most of its speed on many cores; start the process "
        f"with {ENVIRONMENT}"
    )


def run_record(args: argparse.Namespace) -> int:
    """Load the pipeline, generate each asked run under `tracer.trace`, report what was written."""
    spans = None
    if args.span:
        try:
            spans = dict(parse_span_argument(item) for item in args.span)
        except ValueError as error:
            raise UsageError(f"record: {error}") from None
    _apply_defaults(args)
    jobs = _jobs(args)
    entity_names, eligen = _entities(args)
    # This process is the recording's own: its writer reuses the memory it frees. Set before
    # the pipeline starts threads; a warning that it could not be waits for the recording.
    # An estimate's probe of the writer writes as the recording would, so it gets them too.
    allocator_warning = _reuse_freed_memory()
    pin_at_size()  # the step buffers' pinned memory at their size (tracer.pinning)
    created = False
    if not args.estimate and (args.prompts is None or args.overwrite):
        created = _check_out(args)
    try:
        _record(args, jobs, spans, entity_names, eligen, allocator_warning)
    except AttnscopeError as error:
        if not str(error).startswith("record: "):
            error.args = (f"record: {error}", *error.args[1:])  # say which verb refused
        raise
    finally:
        out = Path(args.out)
        if (
            created
            and out.is_dir()
            and not any(fmt.run_index(p.name) is not None for p in out.iterdir())
        ):
            shutil.rmtree(out)  # this command made it and recorded nothing: leave nothing behind
    return 0


def _record(
    args: argparse.Namespace,
    jobs: list[tuple[str, int]],
    spans: dict[str, Any] | None,
    entity_names: list[str] | None,
    eligen: dict[str, Any],
    allocator_warning: str | None = None,
) -> None:
    from tracer import trace

    done = _complete_runs(args.out)
    todo = [job for job in jobs if job not in done]
    if len(todo) < len(jobs):
        print(f"skipping {len(jobs) - len(todo)} runs already complete", file=sys.stderr)
    if not todo:
        return
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    default_dtype = "bfloat16" if device.startswith("cuda") else "float32"
    dtype = DTYPES[args.dtype or default_dtype]
    try:
        pipe = _load_pipeline(args, device, dtype)
    except (OSError, ValueError, RuntimeError, ImportError) as error:
        source = "the demo pipeline" if args.demo else repr(args.model)
        raise UsageError(f"record: cannot load {source} on {device}: {error}") from None
    _one_progress_bar(pipe)
    costs = [_estimate(args, pipe, prompt, seed, entity_names, eligen) for prompt, seed in todo]
    if args.estimate:
        from tracer.estimate import host_facts

        # The disk --out goes to and the writer, probed once (at the first run's size and
        # shape) for every run's.
        probed = host_facts(costs[0], args.out)
        costs = [dataclasses.replace(cost, **probed) for cost in costs]
        for (prompt, seed), cost in zip(todo, costs, strict=True):
            print(f"{prompt!r} (seed {seed})\n{cost}")
        return
    _check_disk(args.out, costs)
    recorder = None
    try:
        with trace(
            pipe,
            args.out,
            spans=spans,
            chunk_size=args.chunk_size,
            max_pending_steps=args.max_pending_steps,
            entity_names=entity_names,
            **_recorded(args),
        ) as recorder:
            for prompt, seed in _claimed(args, todo):
                started = time.perf_counter()
                pipe(**_call_arguments(args, prompt, seed), **eligen)
                said = _recorded_line(recorder, args.out, time.perf_counter() - started)
                print(said, file=sys.stderr)
        if allocator_warning is not None:  # said once the recording went through
            warnings.warn(allocator_warning, RuntimeWarning, stacklevel=1)
    except (WriterError, OSError) as error:
        # A full disk, a quota, a read-only or vanished store: stop with the cause.
        run = recorder.last_run if recorder is not None else None
        kept = f"; every step written before is kept (last run started: {run})" if run else ""
        notes = "".join(f"; {note}" for note in getattr(error, "__notes__", []))
        raise WriterError(
            f"record: writing the trace to {args.out} failed, generation stopped: "
            f"{type(error).__name__}: {error}{kept}{notes}"
        ) from None
    except AttnscopeError:
        raise
    except ValueError as error:
        # The pipeline's own check of its arguments (a prompt too long, a size it can't make).
        raise UsageError(f"record: the pipeline refused the call: {error}") from None
