"""Stream traced attention maps into a run group, one durable step at a time.

The tracer hands over, per (step, layer), one map per direction (`[H, T, cells]` float32, the cells
being the (frame,) y, x grid flattened, on the model's device). `TraceWriter` rounds them to the
run's `keepbits` where they are (on the GPU, before the copy), gets them off the device without
stalling it, assembles a whole step on the host, and background threads write that step as one shard
per direction, the directions side by side: encoded by zarrs on every core and, on a local disk,
staged, synced and renamed into place (tracer.durable). Only after those writes returned does it
list the step in the run's `steps_complete` attribute (and, on a local disk, sync that too), so a
step that is listed is intact whatever happens next, kill -9 and power loss included: every object
reaches its key whole, by a rename.

Given a `RunPlan` instead of a run group, the writer lays the run down on a background thread
while `put()` takes the first step's maps and the worker copies them into the step buffer; only
the step's shards wait for the run's arrays. A run's metadata costs the generation's thread
nothing but claiming its name (tracer.store.claim_run).

Memory and backpressure: at most `max_pending` steps are accepted and not yet durable. Each owns
one host buffer per direction (`[L, H, T, Y, X]` float32, pinned when CUDA is available) taken
from a pool of `max_pending`, reused from step to step; the pool is allocated on a background
thread as the writer starts, so pinning it costs the generation's thread only what its first
step has to wait for. `put()` for a new step waits while all of them are taken; it never drops
a map and never lets memory grow.

Threading contract:
- Call `put()` from one thread (the generation loop). The writer assumes that one producer; it
  is what lets `put()` tell a wait that would never end from a slow disk.
- While the writer is open (until `close()` or `abort()` returned) its lister thread rewrites
  the run group's attributes (`steps_complete`). Zarr writes `zarr.json` whole from the `Group`
  object's in-memory attributes, so do not write run attributes from another thread meanwhile.
  Afterwards, write them through the same `run` object (it holds the up-to-date
  `steps_complete`) or reopen the group; a stale `Group` object would write the old list back.
- Three kinds of background thread: one absorbs the maps into step buffers, a pool stores the
  shards (every pending step's, side by side), and one lists the stored steps in order.
- On CUDA, maps must be produced on their device's *current stream* (as the tracer does): put()
  clones them there (the caller may then reuse its tensors) and copies the clones to the host on
  a stream of the writer's own, beside the model's.
"""

from __future__ import annotations

import collections
import math
import operator
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import zarr
from zarr.storage import LocalStore

from analysis import store_format as sf
from analysis.errors import WriterError
from tracer.durable import StagedShards, write_attributes
from tracer.rounding import bitround_
from tracer.zarr_pipeline import pipeline_for

__all__ = ["Progress", "RunPlan", "TraceWriter", "WriterError"]


@dataclass(eq=False)
class _Slot:
    """One step being assembled: its host buffers and which layers have arrived."""

    step_pos: int
    host: dict[str, torch.Tensor]  # direction -> [L, H, S, Y, X] float32
    put_layers: set[int] = field(default_factory=set)  # handed to put(); foreground's count
    skipped: set[int] = field(default_factory=set)  # layers not computed at this step
    filled: int = 0  # copied into `host`; touched by the worker thread only


@dataclass(eq=False)
class _Item:
    """One put(): where its maps go, and what the worker must wait for or copy."""

    slot: _Slot
    layer_pos: int
    cpu: dict[str, torch.Tensor]  # maps the worker still has to copy into slot.host
    events: list[Any]  # torch.cuda.Event per device copy the worker must wait for


_STOP = object()  # queue sentinel: no more items
# Device->host copies the model may run ahead of (two layers' maps of both directions): enough
# for each layer's copy to run during the next layer's compute.
_COPIES_AHEAD = 4


@dataclass(frozen=True)
class Progress:
    """How a writer keeps up: what the progress bar shows."""

    backlog: int  # steps accepted and not yet durable (at most max_pending)
    decoded_mb_s: float  # decoded MB made durable per second, from the first put() to close()
    waited_s: float  # seconds put() and close() held the generation waiting for the writer


@dataclass(frozen=True)
class RunPlan:
    """A run not laid down yet: what a writer needs to take maps before its group exists.

    `coords` are the run's coordinates (`store_format.run_coords`), `keepbits` the rounding its
    maps get, and `lay_down()` writes the run group and returns it, opened writable. The writer
    calls it on a background thread, so laying a run down overlaps the generation's first step
    and the copying of its maps.
    """

    coords: Mapping[str, Any]
    keepbits: int | None
    lay_down: Callable[[], zarr.Group]


class TraceWriter:
    """Writes the attention maps of one run, step by step, from a background thread.

    `run` is either the run group opened writable, with its attention arrays already laid down
    (the skeleton from `store_format.run_skeleton`, written with `compute=False`), or a
    `RunPlan`, which the writer lays down on a background thread while `put()` already takes maps.
    `directions` are the variables to fill, `n_layers` the recorded layers per step (the arrays'
    `layer` size), and `max_pending` how many whole steps may be buffered or in flight before
    `put()` blocks. `fsync=False` skips syncing to the disk (a listed step then survives a crash
    of the process, not of the machine).
    """

    def __init__(
        self,
        run: zarr.Group | RunPlan,
        *,
        directions: Sequence[str],
        n_layers: int,
        max_pending: int = 2,
        fsync: bool = True,
    ) -> None:
        directions = sf.check_directions(directions)
        n_layers = operator.index(n_layers)
        max_pending = operator.index(max_pending)
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self._directions = directions
        self._n_layers = n_layers
        self._max_pending = max_pending
        self._fsync = fsync
        # Set once the run group is open (_open): here, or on the worker thread for a plan.
        self._run: zarr.Group | None = None
        self._arrays: dict[str, zarr.Array] = {}
        self._staged: dict[str, StagedShards] = {}
        self._plan = run if isinstance(run, RunPlan) else None
        if self._plan is None:
            if run.read_only:
                raise ValueError(
                    f"run group {run.path!r} is open read-only; open it with mode='r+'"
                )
            self._open(run)
            # Steps are listed by their coordinate value (the format's contract), read once.
            steps = [int(v) for v in run["step"][:]]
            layers = [str(v) for v in run["layer"][:]]
            keepbits = {name: sf.keepbits_of(a) for name, a in self._arrays.items()}
            listed = [int(v) for v in run.attrs.get(sf.STEPS_COMPLETE, [])]
            skipped = [list(p) for p in run.attrs.get(sf.SKIPPED, [])]
        else:
            coords = self._plan.coords
            steps = [int(v) for v in coords["step"]]
            layers = [str(v) for v in coords["layer"]]
            keepbits = dict.fromkeys(directions, self._plan.keepbits)
            listed, skipped = [], []
            dims = sf.attention_dims(coords)
            self._take_shape(tuple(len(coords[d]) for d in dims), len(steps), "the plan's")
        # The rounding each variable's values carry (its `keepbits` attribute): done here, on
        # the maps' own device before they are copied (tracer.rounding).
        self._keepbits = {name: sf.check_keepbits(bits) for name, bits in keepbits.items()}
        self._step_values = steps
        self._layer_names = layers
        self._n_steps = len(steps)
        # Pinned host memory is what lets a device->host copy run asynchronously.
        self._pin = torch.cuda.is_available()
        # Per CUDA device, used by put()'s thread only: the stream maps are copied off on, and
        # the copies queued there the model has not been made to wait for yet (_copy_off).
        self._copy_streams: dict[torch.device, Any] = {}
        self._copies_ahead: dict[torch.device, collections.deque[Any]] = {}

        self._cond = threading.Condition()
        # Everything below is guarded by self._cond.
        self._slots: dict[int, _Slot] = {}  # accepted steps not yet durable
        self._free: list[dict[str, torch.Tensor]] = []  # host buffers ready for reuse
        self._buffers_allocated = 0
        self._seen: set[tuple[int, int]] = set()
        self._listed: list[int] = listed
        self._skipped: list[list[Any]] = skipped
        self._durable: list[int] = []  # positions made durable by this writer, in order
        self._first_put: float | None = None  # time.perf_counter() of the first put()
        self._closed_at: float | None = None  # and of close() returning, the last step durable
        self._waited = 0.0  # seconds put() (backpressure) and close() (the flush) waited
        self._error: WriterError | None = None
        self._closed = False  # no more put()
        self._aborted = False
        self._finished = False  # close() or abort() has returned once

        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # Every pending step's shards may be in flight at once: a step is encoded while the one
        # before it is still being written out and synced (bench.rate).
        self._stores = ThreadPoolExecutor(
            len(directions) * max_pending, thread_name_prefix="attnscope-store"
        )
        self._stored: queue.SimpleQueue[Any] = queue.SimpleQueue()  # (slot, futures), in order
        self._thread = threading.Thread(target=self._work, name="attnscope-writer", daemon=True)
        self._lister = threading.Thread(
            target=self._list_steps, name="attnscope-lister", daemon=True
        )
        self._thread.start()
        self._lister.start()
        # The step buffers are allocated beside the generation, not by put() on its thread:
        # pinning host memory for a device->host copy takes a fraction of a second per GB
        # (bench/gpu.py measures it), which a process's first run would spend on its first steps.
        self._stores.submit(self._allocate_buffers)
        # A planned run is laid down beside the worker, which meanwhile copies the first step's
        # maps into its buffer: only storing the step needs the run's arrays. Started last, so
        # that starting the threads above does not wait on it for the GIL.
        self._laid_down: Future[bool] | None = (
            self._stores.submit(self._lay_down) if self._plan is not None else None
        )

    def _open(self, run: zarr.Group) -> None:
        """Open the run's attention arrays for writing, checked against what put() expects."""
        arrays: dict[str, zarr.Array] = {}
        # Runs recorded before rounding moved here carry a numcodecs codec (quiet_zarr); the
        # arrays are opened for zarrs, which encodes a step's chunks on all cores.
        with sf.quiet_zarr(), pipeline_for(run.store):
            for name in self._directions:
                if name not in run.array_keys():
                    raise ValueError(
                        f"run group {run.path!r} has no {name!r} array (arrays: "
                        f"{sorted(run.array_keys())}); write the run skeleton first"
                    )
                arrays[name] = run[name]
        shapes = {name: tuple(array.shape) for name, array in arrays.items()}
        ranks = (len(sf.DIMS), len(sf.VIDEO_DIMS))
        if any(len(s) not in ranks for s in shapes.values()) or len(set(shapes.values())) > 1:
            raise ValueError(
                f"attention arrays must share one shape, {sf.DIMS} or {sf.VIDEO_DIMS}, got {shapes}"
            )
        shape = shapes[self._directions[0]]
        if self._plan is None:
            self._take_shape(shape, run["step"].shape[0], "the run's")
        elif shape != (self._n_steps, *self._step_shape):
            raise ValueError(
                f"the run laid down has attention arrays of shape {shape}, but its plan's "
                f"coordinates give {(self._n_steps, *self._step_shape)}"
            )
        # On a local disk each step's shard is staged, synced and renamed into place, and the
        # listing synced after it (tracer.durable); other stores write through zarr.
        self._local = isinstance(run.store, LocalStore)
        self._staged = (
            {name: StagedShards(array, fsync=self._fsync) for name, array in arrays.items()}
            if self._local
            else {}
        )
        self._arrays = arrays
        self._run = run

    def _take_shape(self, shape: tuple[int, ...], n_steps: int, whose: str) -> None:
        """Check and keep the attention arrays' shape `(step, layer, head, token, (frame,) y, x)`;
        `n_steps`: the length of the step coordinate."""
        steps_in_store, layers_in_store, n_head, n_token, *cells = shape
        if layers_in_store != self._n_layers:
            raise ValueError(
                f"n_layers={self._n_layers} but {whose} arrays hold {layers_in_store} layers"
            )
        if n_steps != steps_in_store:
            raise ValueError(
                f"{whose} step coordinate has {n_steps} values but its arrays "
                f"{steps_in_store} steps"
            )
        # A map's latent cells, (frame,) y, x, arrive flattened, row-major.
        self._map_shape = (n_head, n_token, math.prod(cells))
        self._step_shape = (self._n_layers, n_head, n_token, *cells)

    @property
    def run(self) -> zarr.Group | None:
        """The run group, once laid down: write run attributes through it (see the module's
        threading contract). None while a plan is being laid down, or if that failed."""
        return self._run

    # ----------------------------------------------------------------------------- foreground

    @property
    def steps_complete(self) -> list[int]:
        """Step positions this writer has made durable so far, in the order they completed."""
        with self._cond:
            return list(self._durable)

    def progress(self) -> Progress:
        """The backlog and the write rate so far."""
        with self._cond:
            backlog, durable, first = len(self._slots), len(self._durable), self._first_put
            end, waited = self._closed_at, self._waited
        seconds = (end or time.perf_counter()) - first if first is not None else 0.0
        step_bytes = len(self._directions) * 4 * math.prod(self._step_shape)
        rate = durable * step_bytes / seconds / 1e6 if seconds > 0 else 0.0
        return Progress(backlog=backlog, decoded_mb_s=rate, waited_s=waited)

    def put(self, step_pos: int, layer_pos: int, maps: Mapping[str, torch.Tensor]) -> None:
        """Hand over the maps of one (step, layer): `{direction: [H, T, cells] float32}` (T rows).

        Returns once the maps are safe to forget: CUDA tensors have a device->host copy queued
        on their current stream (never waited for here), CPU tensors are kept as they are (the
        caller must not modify them afterwards). Blocks while `max_pending` steps are pending and
        this is a new step. Raises ValueError on bad input and WriterError once the background
        writer has failed or the writer was aborted.
        """
        self._raise_if_failed()
        if self._closed:
            raise RuntimeError("put() after close() or abort(): this TraceWriter is finished")
        step_pos, layer_pos = self._check_position(step_pos, layer_pos)
        tensors = self._check_maps(step_pos, layer_pos, maps)
        self._accept(step_pos, layer_pos, tensors)

    def skip(self, step_pos: int, layer_pos: int) -> None:
        """Say the model computed no map for this (step, layer): a cache hook skipped its block.

        The step is written with NaN there and the run's `skipped` attribute names the pair, so
        readers tell it from lost data. Counts as that layer's put().
        """
        self._raise_if_failed()
        if self._closed:
            raise RuntimeError("skip() after close() or abort(): this TraceWriter is finished")
        step_pos, layer_pos = self._check_position(step_pos, layer_pos)
        self._accept(step_pos, layer_pos, None)

    def _accept(
        self, step_pos: int, layer_pos: int, tensors: Mapping[str, torch.Tensor] | None
    ) -> None:
        with self._cond:
            if (step_pos, layer_pos) in self._seen:
                raise ValueError(
                    f"maps of step position {step_pos}, layer position {layer_pos} were already "
                    f"put; each (step, layer) is written once"
                )
            if self._step_values[step_pos] in self._listed:
                raise ValueError(
                    f"step {self._step_values[step_pos]} (position {step_pos}) is already listed "
                    f"in the run's {sf.STEPS_COMPLETE}; it is not rewritten"
                )
            if self._first_put is None:
                self._first_put = time.perf_counter()
            slot = self._slots.get(step_pos)
            if slot is None:
                slot = self._open_slot(step_pos)
            self._seen.add((step_pos, layer_pos))
            slot.put_layers.add(layer_pos)
            if tensors is None:
                slot.skipped.add(layer_pos)
        if tensors is None:
            self._queue.put(_Item(slot, layer_pos, {}, []))
            return

        cpu: dict[str, torch.Tensor] = {}
        events: list[Any] = []
        for name, tensor in tensors.items():
            if tensor.is_cuda:
                row = slot.host[name][layer_pos].view(self._map_shape)
                events.append(self._copy_off(tensor, row, self._keepbits[name]))
            elif tensor.device.type == "cpu":
                cpu[name] = tensor
            else:
                # Other accelerators: no event API relied on here; a plain (blocking) copy.
                cpu[name] = tensor.to("cpu")
        self._queue.put(_Item(slot, layer_pos, cpu, events))

    def _copy_off(self, tensor: torch.Tensor, row: torch.Tensor, keepbits: int | None) -> Any:
        """Queue the copy of CUDA map `tensor` into `row` of a step's pinned buffer, rounded to
        `keepbits`; the event that says the bytes are there (the worker waits on it, never the
        generation's thread).

        The copy runs on a stream of the writer's, beside the model's: queued on the model's
        stream, every kernel after it would wait for the bytes to cross to the host. It copies
        a clone the writer owns, rounded on the model's stream, so the caller may reuse its
        tensor at once; the model runs at most _COPIES_AHEAD copies ahead, since each clone holds
        device memory until it is copied.
        """
        device = tensor.device
        model = torch.cuda.current_stream(device)
        owned = bitround_(tensor.clone(), keepbits)
        copies = self._copy_streams.get(device)
        if copies is None:
            copies = self._copy_streams[device] = torch.cuda.Stream(device)
        copies.wait_stream(model)
        with torch.cuda.stream(copies):
            row.copy_(owned, non_blocking=True)
        # The caching allocator must not hand the clone's memory on before the copy has read it.
        owned.record_stream(copies)
        event = torch.cuda.Event()
        event.record(copies)
        ahead = self._copies_ahead.setdefault(device, collections.deque())
        ahead.append(event)
        if len(ahead) > _COPIES_AHEAD:
            model.wait_event(ahead.popleft())  # on the device: this thread does not wait
        return event

    def close(self) -> None:
        """Write everything pending, stop the worker, and raise WriterError if anything failed.

        A step that never received all its layers is not written (it stays NaN and unlisted) and
        makes close() raise, naming it. Calling close() again does nothing but raise the same
        error, if there was one.
        """
        if not self._finished:
            started = time.perf_counter()
            self._closed = True
            self._queue.put(_STOP)
            self._thread.join()
            self._lister.join()
            self._stores.shutdown()
            self._finished = True
            with self._cond:
                self._closed_at = time.perf_counter()
                self._waited += self._closed_at - started
            self._remove_staging()
            with self._cond:
                incomplete = sorted(self._slots.values(), key=lambda s: s.step_pos)
                if self._error is None and incomplete:
                    missing = "; ".join(
                        f"step {self._step_values[s.step_pos]} (position {s.step_pos}) lacks "
                        f"layer positions "
                        f"{sorted(set(range(self._n_layers)) - s.put_layers)}"
                        for s in incomplete
                    )
                    self._error = WriterError(
                        f"close() with steps that never received all {self._n_layers} layers; "
                        f"they were not written: {missing}"
                    )
                self._slots.clear()
        self._raise_if_failed(aborted_ok=True)

    def abort(self, timeout: float = 10.0) -> None:
        """Stop without writing further steps (generation failed); never hangs.

        Steps whose writes are already under way (at most `max_pending`) finish, and are listed
        if they succeed; nothing after them is written. Waits at most `timeout` seconds for the
        background threads, which are left to finish their current writes on their own past
        that. A put() blocked in another thread raises WriterError. Does not raise.
        """
        if self._finished:
            return
        with self._cond:
            self._closed = True
            self._aborted = True
            # Shards whose writes have not begun are dropped; those under way finish.
            self._stores.shutdown(wait=False, cancel_futures=True)
            self._cond.notify_all()
        # Drop queued maps now (frees their memory) so the worker reaches the sentinel at once.
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put(_STOP)
        deadline = time.monotonic() + timeout
        self._thread.join(timeout)
        self._lister.join(max(0.0, deadline - time.monotonic()))
        if self._laid_down is not None:
            # The caller marks the run failed through `run`: a lay-down under way is let finish.
            wait([self._laid_down], max(0.0, deadline - time.monotonic()))
        self._finished = True
        laid_down = self._laid_down is None or self._laid_down.done()
        if not self._thread.is_alive() and not self._lister.is_alive() and laid_down:
            self._stores.shutdown()
            self._remove_staging()

    def _remove_staging(self) -> None:
        for staged in self._staged.values():
            staged.close()

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # ----------------------------------------------------------------------------- validation

    def _check_position(self, step_pos: int, layer_pos: int) -> tuple[int, int]:
        step_pos = operator.index(step_pos)
        layer_pos = operator.index(layer_pos)
        if not 0 <= step_pos < self._n_steps:
            raise ValueError(f"step position {step_pos} out of range 0..{self._n_steps - 1}")
        if not 0 <= layer_pos < self._n_layers:
            raise ValueError(f"layer position {layer_pos} out of range 0..{self._n_layers - 1}")
        return step_pos, layer_pos

    def _check_maps(
        self, step_pos: int, layer_pos: int, maps: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        where = f"step position {step_pos}, layer position {layer_pos}"
        unknown = sorted(set(maps) - set(self._directions))
        missing = [d for d in self._directions if d not in maps]
        if unknown or missing:
            raise ValueError(
                f"maps at {where}: this writer records directions {list(self._directions)}; "
                f"unknown: {unknown}, missing: {missing}"
            )
        out: dict[str, torch.Tensor] = {}
        for name in self._directions:
            tensor = maps[name]
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(
                    f"{name!r} map at {where} must be a torch.Tensor, got {type(tensor).__name__}"
                )
            if tuple(tensor.shape) != self._map_shape:
                h, s, cells = self._map_shape
                raise ValueError(
                    f"{name!r} map at {where}: expected shape [head, token, latent cells] = "
                    f"{list(self._map_shape)} (H={h}, S={s}, cells={cells}: the (frame,) y, x "
                    f"grid, flattened), found {list(tensor.shape)}"
                )
            if tensor.dtype != torch.float32:
                raise ValueError(
                    f"{name!r} map at {where}: expected dtype torch.float32, found {tensor.dtype}"
                )
            out[name] = tensor.detach()
        return out

    # ------------------------------------------------------------------------ slots and errors

    def _open_slot(self, step_pos: int) -> _Slot:
        """A slot for a new step, waiting (backpressure) until one is free. Holds self._cond."""
        started = time.perf_counter()
        try:
            while len(self._slots) >= self._max_pending:
                self._raise_if_failed_locked()
                if all(len(s.put_layers) < self._n_layers for s in self._slots.values()):
                    # Nothing pending can ever complete without more put()s from this, the only
                    # producer thread: waiting would hang forever.
                    pending = sorted(self._step_values[p] for p in self._slots)
                    raise RuntimeError(
                        f"put() for step {self._step_values[step_pos]} would wait forever: "
                        f"max_pending={self._max_pending} steps {pending} are pending and none "
                        f"has all {self._n_layers} layers; finish a step before starting another"
                    )
                self._cond.wait()
            self._raise_if_failed_locked()
            while not self._free:  # the pool is still being allocated (_allocate_buffers)
                self._cond.wait()
                self._raise_if_failed_locked()
        finally:
            self._waited += time.perf_counter() - started
        slot = _Slot(step_pos, self._free.pop())
        self._slots[step_pos] = slot
        return slot

    def _allocate_buffers(self) -> None:
        """Allocate the pool of step buffers, one at a time, each handed to put() once made:
        max_pending steps' (fewer for a shorter run), pinned where CUDA is."""
        try:
            for _ in range(min(self._max_pending, self._n_steps)):
                with self._cond:
                    if self._aborted or self._error is not None:
                        return
                # An allocation, no computation: it starts no OpenMP team on this thread.
                host = {
                    name: torch.empty(self._step_shape, dtype=torch.float32, pin_memory=self._pin)
                    for name in self._directions
                }
                with self._cond:
                    self._free.append(host)
                    self._buffers_allocated += 1
                    self._cond.notify_all()
        except BaseException as exc:
            self._fail(f"allocating the step buffers failed: {type(exc).__name__}: {exc}", exc)

    def _raise_if_failed(self, aborted_ok: bool = False) -> None:
        with self._cond:
            self._raise_if_failed_locked(aborted_ok)

    def _raise_if_failed_locked(self, aborted_ok: bool = False) -> None:
        if self._error is not None:
            # A fresh exception per raise, chained to the worker's, so each traceback is honest.
            raise WriterError(str(self._error)) from (self._error.__cause__ or self._error)
        if self._aborted and not aborted_ok:
            raise WriterError("the TraceWriter was aborted; no further maps are written")

    def _fail(self, message: str, cause: BaseException) -> None:
        error = WriterError(message)
        error.__cause__ = cause
        with self._cond:
            if self._error is None:
                self._error = error
            self._cond.notify_all()

    # --------------------------------------------------------------------------------- worker

    def _work(self) -> None:
        step_pos: int | None = None
        try:
            while True:
                item = self._queue.get()
                if item is _STOP or self._aborted or self._error is not None:
                    return
                step_pos = item.slot.step_pos
                self._absorb(item)
                step_pos = None
        except BaseException as exc:
            self._fail_at(step_pos, exc)
        finally:
            self._stored.put(_STOP)  # the lister lists what was handed over, then ends

    def _lay_down(self) -> bool:
        """Lay the planned run down; False (the failure recorded) if that failed."""
        try:
            run = self._plan.lay_down()
            if run.read_only:
                raise ValueError(f"run group {run.path!r} was laid down read-only")
            self._open(run)
        except BaseException as exc:
            self._fail(f"laying down the run failed: {type(exc).__name__}: {exc}", exc)
            return False
        return True

    def _run_laid_down(self) -> bool:
        """Wait until a planned run is laid down; False if that failed or abort() cancelled it."""
        if self._laid_down is None:
            return True
        try:
            return self._laid_down.result()
        except CancelledError:
            return False

    def _fail_at(self, step_pos: int | None, exc: BaseException) -> None:
        """Record an unexpected failure of a background thread, naming its step."""
        where = (
            f"step {self._step_values[step_pos]} (position {step_pos})"
            if step_pos is not None
            else "no particular step"
        )
        self._fail(f"the background writer failed at {where}: {type(exc).__name__}: {exc}", exc)

    def _absorb(self, item: _Item) -> None:
        """Bring one (step, layer) into its step's host buffer; store the step when whole."""
        slot = item.slot
        for event in item.events:
            event.synchronize()  # waits on this thread only, not on the producer's stream
        # NumPy, not torch, on this thread: see tracer.rounding.
        for name, tensor in item.cpu.items():
            row = slot.host[name][item.layer_pos].numpy().reshape(self._map_shape)
            np.copyto(row, tensor.numpy())
            bitround_(row, self._keepbits[name])
        if item.layer_pos in slot.skipped:
            for name in self._directions:
                slot.host[name][item.layer_pos].numpy().fill(np.nan)
        slot.filled += 1
        if slot.filled == self._n_layers:
            self._store_step(slot)

    def _store_step(self, slot: _Slot) -> None:
        """Start writing the step's shards, one per direction, side by side; the lister thread
        lists the step once they are all stored. zarrs spreads one shard's chunks over the
        cores, but copying a shard in and writing it out are serial: several shards in flight
        keep more cores (and the disk) busy."""
        step_pos = slot.step_pos
        if not self._run_laid_down():
            return  # the failure is recorded (or abort() came): nothing is stored

        def store(name: str) -> None:
            # The buffer is exactly one shard: zarr encodes it whole and stores one object.
            if name in self._staged:
                self._staged[name].write(step_pos, slot.host[name].numpy())
            else:
                self._arrays[name][step_pos] = slot.host[name].numpy()

        with self._cond:
            if self._aborted:
                return  # abort() came: this step is not begun
            futures = {name: self._stores.submit(store, name) for name in self._directions}
        self._stored.put((slot, futures))

    def _list_steps(self) -> None:
        """The lister thread: list each stored step, in the order the steps were completed."""
        while True:
            entry = self._stored.get()
            if entry is _STOP:
                return
            try:
                self._list_step(*entry)
            except _Stop:
                return  # the failure is recorded already, with its step and cause
            except BaseException as exc:
                self._fail_at(entry[0].step_pos, exc)
                return

    def _list_step(self, slot: _Slot, stored: Mapping[str, Future[None]]) -> None:
        step_pos = slot.step_pos
        value = self._step_values[step_pos]
        for name, future in stored.items():
            if future.cancelled():
                raise _Stop  # abort() came before this step's writes began: it is not listed
            exc = future.exception()
            if exc is not None:
                self._fail(
                    f"writing step {value} (position {step_pos}) of {name!r} failed: "
                    f"{type(exc).__name__}: {exc}",
                    exc,
                )
                raise _Stop from exc
        with self._cond:
            listed = [*self._listed, value]
            skipped = self._skipped + [
                [value, self._layer_names[layer]] for layer in sorted(slot.skipped)
            ]
        attrs: dict[str, Any] = {sf.STEPS_COMPLETE: listed}
        if slot.skipped:
            attrs[sf.SKIPPED] = skipped
        try:
            # Only after the data writes returned: a listed step is intact.
            if self._local:
                write_attributes(self._run, attrs, fsync=self._fsync)
            else:
                self._run.update_attributes(attrs)
        except Exception as exc:
            self._fail(
                f"listing step {value} (position {step_pos}) in {sf.STEPS_COMPLETE} failed: "
                f"{type(exc).__name__}: {exc}",
                exc,
            )
            raise _Stop from exc
        with self._cond:
            self._listed = listed
            self._skipped = skipped
            self._durable.append(step_pos)
            del self._slots[step_pos]
            self._free.append(slot.host)
            self._cond.notify_all()


class _Stop(Exception):
    """Raised inside the lister to end it: it recorded its failure already, or abort() came."""
