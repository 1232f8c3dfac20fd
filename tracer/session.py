"""`trace(pipe, path)`: attach to a pipeline, record one run per generation, detach cleanly."""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import inspect
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import zarr
from tqdm.auto import tqdm

from analysis import store_format as fmt
from analysis.errors import TapError, UnsupportedModelError, UsageError
from analysis.selection import pick
from tracer.adapters import adapter_for
from tracer.adapters.base import Adapter, DenoiserCall, Generation, Layer
from tracer.capture import attention_maps, cross_attention_maps
from tracer.layout import canonical_order, reorder
from tracer.rounding import MODEL_PRECISION, keepbits_for
from tracer.spans import (
    Span,
    SpanRequest,
    resolve_spans,
    split_rows,
    token_rows,
    word_occurrences,
)
from tracer.store import claim_run, lay_down_run, open_store, write_variable
from tracer.tap import AttentionCall, AttentionTap
from tracer.writer import Progress, RunPlan, TraceWriter


@dataclass(frozen=True)
class Options:
    """What to record; validated against the model before any generation runs."""

    spans: Mapping[str, SpanRequest] | None = None
    layers: Selector | None = None
    heads: Selector | None = None
    steps: Selector | None = None
    directions: Sequence[str] = fmt.DIRECTIONS
    keep_tokens: tuple[int, int] | None = None
    chunk_size: int = 256
    keepbits: int | str | None = MODEL_PRECISION
    lse: str = "kernel"
    max_pending_steps: int = 2
    progress: bool = True
    fsync: bool = True


Selector = str | int | Sequence[str | int]


def _check_keep_tokens(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if (
        isinstance(value, tuple | list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        and 0 <= value[0] < value[1]
    ):
        return int(value[0]), int(value[1])
    raise UsageError(
        f"keep_tokens must be a (start, stop) range of text positions with 0 <= start < stop, "
        f"or None; got {value!r}"
    )


def check_max_pending_steps(value: object) -> int:
    """`max_pending_steps`, checked before any run: a whole number of steps, at least 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(
            f"max_pending_steps must be a whole number of steps, at least 1, got {value!r}"
        )
    return value


def select_layers(layers: list[Layer], selector: Selector | None) -> list[Layer]:
    """The layers a selector names (names, globs, a kind, `KIND:GLOB`; see analysis.selection)."""
    if selector is None:
        return layers
    names = [layer.name for layer in layers]
    chosen = set(pick("layer", selector, names, {layer.name: layer.kind for layer in layers}))
    return [layer for layer in layers if layer.name in chosen]


def select_indices(dim: str, selector: Selector | None, size: int) -> list[int]:
    """The positions 0..size-1 a selector names (all of them for None)."""
    return list(range(size)) if selector is None else pick(dim, selector, list(range(size)))


@dataclass
class _Run:
    """The state of the run being recorded by one pipeline call."""

    generation: Generation
    spans: list[Span]
    rows: list[fmt.TokenRow] = field(default_factory=list)
    name: str | None = None
    writer: TraceWriter | None = None  # the run's group is its writer's `run`, once laid down
    timesteps: np.ndarray | None = None
    step_positions: dict[int, int] = field(default_factory=dict)  # step -> position in store
    members: torch.Tensor | None = None
    layout: DenoiserCall | None = None  # where text and image tokens sit (the first call's)
    step: int = -1
    calls_this_step: int = 0
    recording: int | None = None  # store position of the step being recorded, if any
    open_step: int | None = None  # position recorded last, until its layers are accounted for
    put_layers: set[int] = field(default_factory=set)  # layers of `open_step` put so far
    # A layer's SDPA calls so far, where it makes several (its groups of keys), per call.
    pending: dict[str, list[tuple[torch.Tensor, ...]]] = field(default_factory=dict)
    progress: Any = None
    lse_calls_before: dict[str, int] = field(default_factory=dict)
    # Per group of keys of a cross-attention made of several calls: its rows, on the device.
    rows_on: dict[tuple[int, int, torch.device], torch.Tensor] = field(default_factory=dict)
    keepbits: int | None = None  # the mantissa bits its maps keep (Options.keepbits resolved)


class Recorder:
    """Records every generation of one pipeline into the store at `path`, one run each.

    `runs` names the runs recorded, in order; `writing[run]` says how that run's writer kept up
    (its write rate, and the seconds the generation waited for it: where the host or its disk
    writes slower than the model computes).
    """

    def __init__(
        self,
        pipe: Any,
        path: str,
        options: Options,
        adapter: Adapter | None = None,
        entity_names: Sequence[str] | None = None,
    ):
        self.pipe = pipe
        self.path = str(path)
        self.options = options
        self.adapter = adapter or adapter_for(pipe, entity_names)
        self.runs: list[str] = []
        # How each run's writer kept up, as the run ended (tracer.writer.Progress).
        self.writing: dict[str, Progress] = {}
        all_layers = self.adapter.layers()
        self.layers = select_layers(all_layers, options.layers)
        self.adapter.check_attention(self.layers)
        self.layer_positions = {layer.name: i for i, layer in enumerate(self.layers)}
        self._cross_layers = {layer.name for layer in self.layers if layer.kind == "cross"}
        n_heads = self.layers[0].heads
        self.heads = select_indices("head", options.heads, n_heads)
        self._head_index = None if len(self.heads) == n_heads else torch.tensor(self.heads)
        self._head_index_on: dict[torch.device, torch.Tensor] = {}
        fmt.check_directions(options.directions)
        self.directions = self._model_directions(options.directions)
        keepbits_for(options.keepbits, None)  # checked before any run
        if not isinstance(options.chunk_size, int) or options.chunk_size < 1:
            raise UsageError(f"chunk_size must be a positive integer, got {options.chunk_size!r}")
        self.keep_tokens = _check_keep_tokens(options.keep_tokens)
        if options.lse not in fmt.LSE_SOURCES:
            raise UsageError(f"lse must be one of {list(fmt.LSE_SOURCES)}, got {options.lse!r}")
        if not isinstance(options.fsync, bool):
            raise UsageError(f"fsync must be True or False, got {options.fsync!r}")
        check_max_pending_steps(options.max_pending_steps)
        self._calls = {layer.name: layer.calls for layer in self.layers if layer.calls > 1}
        self._tap = AttentionTap(
            {layer.name: layer.attention for layer in self.layers},
            self._wants,
            self._capture,
            fetch_lse=options.lse == "kernel",
            no_lse=self._cross_layers,
            calls=self._calls,
        )
        self._pipe_class: type | None = None
        self._unwatch = None
        self._run: _Run | None = None
        open_store(self.path)

    def _model_directions(self, asked: Sequence[str]) -> tuple[str, ...]:
        """The asked directions the model's attention has (a cross-attention has no txt2img)."""
        absent = self.adapter.absent_directions
        kept = tuple(d for d in asked if d not in absent)
        if not kept:
            reasons = "; ".join(f"no {d}: {absent[d]}" for d in asked)
            raise UsageError(
                f"directions {list(asked)} asked, but this model has {reasons}; ask for "
                f"{[d for d in fmt.DIRECTIONS if d not in absent]}"
            )
        return kept

    @property
    def last_run(self) -> str | None:
        """The group name of the latest run recorded."""
        return self.runs[-1] if self.runs else None

    # -- attach / detach -------------------------------------------------------------------
    def attach(self) -> None:
        """Start tracing every call of the pipeline."""
        if getattr(self.pipe, "_attnscope_recorder", None) is not None:
            raise UsageError("this pipeline is already being traced; detach the other trace first")
        cls = type(self.pipe)
        recorder = self

        def __call__(pipe: Any, *args: Any, **kwargs: Any) -> Any:
            return recorder._generate(cls.__call__, pipe, args, kwargs)

        # `pipe(...)` looks `__call__` up on the type, so the instance gets a private subclass
        # (same name) for the duration of the trace; other instances are unaffected.
        traced = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})
        self._pipe_class = cls
        self.pipe.__class__ = traced
        self.pipe._attnscope_recorder = self
        self._tap.attach()
        self._unwatch = self.adapter.watch_denoiser(self._on_denoiser)

    def detach(self) -> None:
        """Stop tracing and restore the pipeline exactly as it was."""
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        self._tap.detach()
        if self._pipe_class is not None:
            self.pipe.__class__ = self._pipe_class
            self._pipe_class = None
        self.pipe.__dict__.pop("_attnscope_recorder", None)

    # -- one generation --------------------------------------------------------------------
    def _generate(self, call: Any, pipe: Any, args: tuple, kwargs: dict) -> Any:
        bound = inspect.signature(call).bind(pipe, *args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        arguments |= arguments.pop("kwargs", None) or {}
        self.adapter.check_attention(self.layers)  # the backend may have changed since attach
        generation = self.adapter.generation(arguments)
        spans = resolve_spans(self.options.spans, generation.text)
        if not generation.text.segments and not spans and self.keep_tokens is None:
            raise UsageError(
                "the call gave no prompt text, so attnscope can't tell its text tokens apart; "
                "keep them as rows (keep_tokens=(0, 512)) or name token ranges "
                "(spans={'first8': (0, 8)})"
            )
        self._run = run = _Run(
            generation=generation, spans=spans, lse_calls_before=dict(self._tap.lse_calls)
        )
        try:
            output = call(pipe, *args, **kwargs)
            if run.writer is None:
                raise TapError("the pipeline never called its denoiser: nothing was recorded")
            self._finish_step(run)
            run.writer.close()
            self.writing[run.name] = run.writer.progress()
            self._show_progress(run, final=True)
            group = run.writer.run
            image = self.adapter.image(output)
            if image is not None:
                write_variable(group, "image", fmt.image_variable(image))
            group.attrs.update({fmt.STATUS: fmt.COMPLETE, fmt.LSE_USED: self._lse_used(run)})
            return output
        except BaseException as error:
            if run.writer is not None:
                # Keep every step captured whole before the error; drop the one in progress.
                # An interrupt (Ctrl-C) stops at once instead.
                stop = run.writer.close if isinstance(error, Exception) else run.writer.abort
                with contextlib.suppress(Exception):
                    stop()
                self.writing[run.name] = run.writer.progress()
                if isinstance(error, KeyboardInterrupt):
                    reason = f"interrupted at step {run.step}"
                    kept = run.writer.steps_complete
                    error.add_note(
                        f"{run.name} in {self.path} is marked failed: {reason}; the "
                        f"{len(kept)} steps complete before it are kept"
                    )
                else:
                    reason = f"{type(error).__name__}: {error}".splitlines()[0][:500]
                try:
                    # Without the writer's group (laying the run down failed part way), the
                    # group as far as it was written.
                    group = run.writer.run or zarr.open_group(self.path, path=run.name, mode="r+")
                    group.attrs.update(
                        {fmt.STATUS: fmt.failed(reason), fmt.LSE_USED: self._lse_used(run)}
                    )
                except Exception as status_error:
                    # A full or read-only disk: the run stays `recording` (read as partial); the
                    # error that stopped the generation is the one to report, not this one.
                    if hasattr(error, "add_note"):
                        error.add_note(
                            f"attnscope could not mark {run.name} failed either "
                            f"({type(status_error).__name__}: {status_error}); it reads as "
                            f"partial"
                        )
            raise
        finally:
            if run.progress is not None:
                run.progress.close()
            self._run = None

    def _lse_used(self, run: _Run) -> dict[str, int]:
        """Traced attention calls of this run whose normalisers came from the kernel, or not."""
        now = self._tap.lse_calls
        return {source: now[source] - run.lse_calls_before[source] for source in now}

    def _start_run(self, run: _Run, call: DenoiserCall) -> None:
        timesteps, sigmas = self.adapter.schedule(call.timestep)
        steps = select_indices("step", self.options.steps, len(timesteps))
        too_long = [s.name for s in run.spans if s.indices and max(s.indices) >= call.text_len]
        if too_long:
            raise UsageError(
                f"spans {too_long} reach past the {call.text_len} text tokens the model attends"
            )
        if self.keep_tokens is not None and self.keep_tokens[1] > call.text_len:
            raise UsageError(
                f"keep_tokens {list(self.keep_tokens)} reaches past the {call.text_len} text "
                f"tokens the model attends"
            )
        run.rows = self._rows(run, call.text_len)
        # The dtype of this call's latents: what the model computes in (weights may be stored
        # in another, cast per layer), and a pipeline may be cast between generations.
        run.keepbits = keepbits_for(self.options.keepbits, call.dtype)
        coords = fmt.run_coords(
            steps=steps,
            timesteps=timesteps[steps],
            sigmas=sigmas[steps],
            layers=[layer.name for layer in self.layers],
            layer_kinds=[layer.kind for layer in self.layers],
            heads=self.heads,
            tokens=run.rows,
            grid=call.grid,
        )
        attrs = self._run_attrs(run, call, steps)
        run.name = claim_run(self.path)
        self.runs.append(run.name)
        # The run's metadata is laid down on a writer's thread, during the first step.
        lay_down = functools.partial(self._lay_down, run, coords, attrs)
        run.writer = TraceWriter(
            RunPlan(coords, run.keepbits, lay_down),
            directions=list(self.directions),
            n_layers=len(self.layers),
            max_pending=self.options.max_pending_steps,
            fsync=self.options.fsync,
        )
        run.timesteps = timesteps
        run.step_positions = {step: i for i, step in enumerate(steps)}
        run.layout = call
        members = torch.zeros(len(run.rows), call.text_len, dtype=torch.bool)
        for i, row in enumerate(run.rows):
            members[i, row.position : row.position + row.count] = True
        run.members = members
        run.progress = tqdm(
            total=len(steps),
            desc=f"attnscope {run.name}",
            unit="step",
            disable=not self.options.progress,
            leave=False,
        )

    def _lay_down(self, run: _Run, coords: dict[str, Any], attrs: dict[str, Any]) -> zarr.Group:
        """The run group of claimed `run`, with its coordinates and entity masks."""
        group = lay_down_run(self.path, run.name, coords, attrs, self.directions, run.keepbits)
        generation = run.generation
        if generation.entity_masks is not None:
            masks = fmt.entity_mask_variable(generation.entity_masks, generation.entity_names)
            write_variable(group, "entity_mask", masks)
        return group

    def _rows(self, run: _Run, text_len: int) -> list[fmt.TokenRow]:
        """Token rows: every token, padding runs summed, except what keep_tokens or a named
        span over part of a padding run asks to keep."""
        keep = set(range(*self.keep_tokens)) if self.keep_tokens is not None else set()
        rows = token_rows(run.generation.text, text_len, sorted(keep))
        for span in run.spans:
            for row in split_rows(span, rows):
                keep.update(set(span.indices).intersection(row.positions))
        return token_rows(run.generation.text, text_len, sorted(keep)) if keep else rows

    def _run_attrs(self, run: _Run, call: DenoiserCall, steps: list[int]) -> dict[str, Any]:
        options = self.options
        return (
            self.adapter.run_attrs()
            | run.generation.attrs
            | {
                fmt.STATUS: fmt.RECORDING,
                fmt.STEPS_COMPLETE: [],
                fmt.SPANS: {span.name: list(span.indices) for span in run.spans},
                fmt.SPAN_TOKENS: {span.name: list(span.tokens) for span in run.spans},
                fmt.WORDS: word_occurrences(run.generation.text),
                fmt.SEGMENTS: {
                    seg.name: [seg.first, seg.stop] for seg in run.generation.text.segments
                },
                fmt.ENTITY_PROMPTS: run.generation.attrs.get(fmt.ENTITY_PROMPTS, []),
                fmt.DIRECTIONS_ABSENT: dict(self.adapter.absent_directions),
                fmt.TEXT_LEN: call.text_len,
                fmt.ERROR_BOUND: fmt.relative_error_bound(run.keepbits),
                fmt.CAPTURE: fmt.Capture(
                    directions=self.directions,
                    layers=tuple(layer.name for layer in self.layers),
                    heads=tuple(self.heads),
                    steps=tuple(steps),
                    chunk_size=options.chunk_size,
                    keepbits=run.keepbits,
                    lse=options.lse,
                    keep_tokens=self.keep_tokens,
                ).to_dict(),
                fmt.CREATED: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            }
        )

    # -- hooks -----------------------------------------------------------------------------
    def _on_denoiser(self, call: DenoiserCall) -> None:
        run = self._run
        if run is None:
            return
        if run.writer is None:
            self._start_run(run, call)
        step = int(np.argmin(np.abs(run.timesteps - call.timestep)))
        # With true CFG the denoiser runs twice per step, the conditional branch first.
        run.calls_this_step = run.calls_this_step + 1 if step == run.step else 0
        run.step = step
        is_cond = run.calls_this_step == 0
        self._finish_step(run)
        run.recording = run.step_positions.get(step) if is_cond else None
        run.open_step = run.recording
        # Only the recorded (conditional) branch must keep the layout: an unconditional one may
        # lay its text out differently (DiffSynth EliGen puts entity prompts in the cond branch).
        if is_cond and call.layout != run.layout.layout:
            before = run.layout
            raise UnsupportedModelError(
                f"token layout changed during generation: {before.text_len} text tokens on a "
                f"{before.grid} grid, then {call.text_len} on {call.grid} (text from "
                f"{before.text_start}, then {call.text_start}; image from {before.image_first}, "
                f"then {call.image_first})"
            )
        self._show_progress(run)

    @staticmethod
    def _show_progress(run: _Run, *, final: bool = False) -> None:
        """Steps durable, the write rate and the backlog. tqdm redraws at most every 0.1 s, so
        the final state is drawn explicitly: a short run would otherwise never show it."""
        writing = run.writer.progress()
        run.progress.set_postfix_str(
            f"writing {writing.decoded_mb_s:.0f} MB/s decoded, {writing.backlog} "
            f"step{'' if writing.backlog == 1 else 's'} pending, generation waited "
            f"{writing.waited_s:.1f} s",
            refresh=False,
        )
        run.progress.update(len(run.writer.steps_complete) - run.progress.n)
        if final:
            run.progress.refresh()

    def _finish_step(self, run: _Run) -> None:
        """Tell the writer which layers of the step just recorded never ran their attention (a
        cache hook skipped their block): the store says so instead of holding a hole."""
        if run.open_step is None:
            return
        for layer in sorted(set(range(len(self.layers))) - run.put_layers):
            run.writer.skip(run.open_step, layer)
        run.open_step = None
        run.put_layers = set()

    def _wants(self, layer: str) -> bool:
        run = self._run
        return run is not None and run.recording is not None

    def _capture(self, layer: str, call: AttentionCall) -> None:
        run = self._run
        layout = run.layout
        calls = run.pending.setdefault(layer, [])
        calls.append(self._recorded(call))
        if len(calls) < self._calls.get(layer, 1):
            return  # a cross-attention's further groups of keys come in its next SDPA calls
        del run.pending[layer]
        n_image = math.prod(layout.grid)  # image (or video) tokens
        if layer in self._cross_layers:
            maps = self._cross_maps(layer, layout, calls, n_image)
        else:
            query, key, mask, lse, scale = calls[0]
            maps = self._joint_maps(layer, layout, query, key, mask, scale, lse, n_image)
        run.writer.put(run.recording, self.layer_positions[layer], maps)
        run.put_layers.add(self.layer_positions[layer])

    def _recorded(self, call: AttentionCall) -> tuple[torch.Tensor, ...]:
        """q, k, mask and lse of the recorded batch element and heads of an SDPA call."""
        batch = self._run.layout.batch_index
        query, key = call.query[batch], call.key[batch]
        lse = None if call.lse is None else call.lse[batch]  # the kernel's, when it gave one
        mask = call.mask
        if mask is not None:
            if mask.ndim == 4:
                mask = mask[batch if mask.shape[0] > 1 else 0]
            if self._head_index is not None and mask.ndim == 3 and mask.shape[0] > 1:
                mask = mask[self._heads_on(mask.device)]
        if self._head_index is not None:
            index = self._heads_on(query.device)
            query, key = query[index], key[index]
            lse = None if lse is None else lse[self._heads_on(lse.device)]
        return query, key, mask, lse, call.scale

    def _heads_on(self, device: torch.device) -> torch.Tensor:
        """The recorded heads' index on `device`, sent there once: CUDA may make a copy from
        pageable host memory wait for the stream, at every traced call."""
        index = self._head_index_on.get(device)
        if index is None:
            index = self._head_index_on[device] = self._head_index.to(device)
        return index

    def _joint_maps(
        self,
        layer: str,
        layout: DenoiserCall,
        query: torch.Tensor,
        key: torch.Tensor,
        mask: torch.Tensor | None,
        scale: float,
        lse: torch.Tensor | None,
        n_image: int,
    ) -> dict[str, torch.Tensor]:
        """The maps of a joint attention: text and image tokens in one sequence."""
        n_tokens = query.shape[1]
        if (
            max(layout.text_start + layout.text_len, layout.image_first + n_image) > n_tokens
            or key.shape[1] != n_tokens
        ):
            raise TapError(
                f"{layer}: attention of {n_tokens} queries over {key.shape[1]} keys, "
                f"expected {layout.text_len} text tokens from {layout.text_start} and "
                f"{n_image} image tokens from {layout.image_first} in one joint sequence"
            )
        order = canonical_order(
            n_tokens, layout.text_start, layout.text_len, layout.image_first, n_image, query.device
        )
        if order is not None:
            query, key, mask, lse = reorder(order, query, key, mask, lse)
        return attention_maps(
            query,
            key,
            mask=mask,
            scale=scale,
            text_len=layout.text_len,
            n_image=n_image,
            span_members=self._run.members,
            directions=self.directions,
            chunk_size=self.options.chunk_size,
            lse=lse,
        )

    def _cross_maps(
        self,
        layer: str,
        layout: DenoiserCall,
        calls: Sequence[tuple[torch.Tensor, ...]],
        n_image: int,
    ) -> dict[str, torch.Tensor]:
        """The maps of a cross-attention: image queries against the text keys only. With
        several calls (groups of keys, each in a softmax of its own), each call's keys are the
        next part of the text sequence, and a row's map is its own call's."""
        n_keys = [key.shape[1] for _, key, *_ in calls]
        if any(q.shape[1] != n_image for q, *_ in calls) or sum(n_keys) != layout.text_len:
            raise TapError(
                f"{layer}: cross-attention of {[q.shape[1] for q, *_ in calls]} queries over "
                f"{n_keys} keys, expected {n_image} image queries over {layout.text_len} text "
                f"keys in all"
            )
        members = self._run.members

        def img2txt(call: tuple[torch.Tensor, ...], span_members: torch.Tensor) -> torch.Tensor:
            query, key, mask, _, scale = call
            return cross_attention_maps(
                query,
                key,
                mask=mask,
                scale=scale,
                span_members=span_members,
                chunk_size=self.options.chunk_size,
            )["img2txt"]

        if len(calls) == 1:
            return {"img2txt": img2txt(calls[0], members)}
        query = calls[0][0]
        maps = query.new_zeros(query.shape[0], len(members), n_image, dtype=torch.float32)
        first = 0
        for call, count in zip(calls, n_keys, strict=True):
            part = members[:, first : first + count]
            rows = part.any(dim=1)  # the rows whose positions are among this call's keys
            if rows.any():
                maps[:, self._rows_on(first, count, rows, maps.device)] = img2txt(call, part[rows])
            first += count
        return {"img2txt": maps}

    def _rows_on(
        self, first: int, count: int, rows: torch.Tensor, device: torch.device
    ) -> torch.Tensor:
        """`rows` (the rows of the run's text keys first..first + count) on `device`, sent there
        once per run: CUDA may make a copy from pageable host memory wait for the stream."""
        key = (first, count, device)
        if key not in self._run.rows_on:
            self._run.rows_on[key] = rows.to(device)
        return self._run.rows_on[key]


@contextlib.contextmanager
def trace(
    pipe: Any,
    path: str,
    *,
    spans: Mapping[str, SpanRequest] | None = None,
    layers: Selector | None = None,
    heads: Selector | None = None,
    steps: Selector | None = None,
    directions: Sequence[str] = fmt.DIRECTIONS,
    keep_tokens: tuple[int, int] | None = None,
    chunk_size: int = 256,
    keepbits: int | str | None = MODEL_PRECISION,
    max_pending_steps: int = 2,
    progress: bool = True,
    lse: str = "kernel",
    fsync: bool = True,
    entity_names: Sequence[str] | None = None,
    adapter: Adapter | None = None,
) -> Iterator[Recorder]:
    """Trace every generation of `pipe` inside the block into the store at `path`.

    Each call of the pipeline appends one run (`run-0000`, ...) to the store, creating it if
    needed. Maps are stored per text token, so any span can be asked for when reading; each run
    of padding tokens is stored as one summed row unless `keep_tokens=(start, stop)` keeps those
    positions as rows. `spans` names spans to store with the run (default: the prompt and each
    of its words): a word of the prompt or a `(start, stop)` token range. `layers`, `heads` and
    `steps` take labels or selector strings of `analysis.selection` (`"single"`, `"0:3"`,
    `[0, 5]`); `directions` any of `txt2img`, `img2txt`. `keepbits`: the mantissa bits each value
    keeps (relative error at most 2^-(keepbits+1)); the default, `"model"`, keeps the model's own
    precision (7 bits for a bf16 model, whose attention kernel rounds its probabilities so, and 9
    otherwise); None stores losslessly.
    `lse="recompute"` recomputes img2txt's normalisers instead of taking them from the model's
    attention kernel. `max_pending_steps`: steps taken and not yet durable, each holding one
    step's maps in host memory; the generation waits for the writer beyond them, and a step's
    encoding spreads over the cores but copying it in and writing it out do not, so more may
    keep more of a large host's cores busy. `fsync=False` leaves each step's shards in the page
    cache unsynced: a listed step then survives a crash of the process but not of the machine,
    and the generation does not wait for the disk to sync every step (where that is slower than
    the model, see `tracer.estimate`), only, past the kernel's limit on unwritten pages, for it
    to write them. `entity_names` names the spans of EliGen entity prompts (DiffSynth; default
    `entity0`, `entity1`, ...). The pipeline is restored on exit, even after an error.
    """
    options = Options(
        spans=spans,
        layers=layers,
        heads=heads,
        steps=steps,
        directions=tuple(directions),
        keep_tokens=keep_tokens,
        chunk_size=chunk_size,
        keepbits=keepbits,
        max_pending_steps=max_pending_steps,
        progress=progress,
        lse=lse,
        fsync=fsync,
    )
    recorder = Recorder(pipe, path, options, adapter, entity_names)
    recorder.attach()
    try:
        yield recorder
    finally:
        recorder.detach()
