"""TraceWriter: what it streams must read back, through plain xarray/zarr, as what was put.

Every check of stored data reopens the store with `xarray.open_zarr` (never through the writer).
Slow and failing disks are simulated by a zarr store wrapper, so nothing global is patched and
the failures come from where they would in life: the store's `set` of a shard or of `zarr.json`.
Anything that could hang runs in a daemon thread joined with a timeout.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from zarr.storage import LocalStore, WrapperStore

from analysis import store_format as sf
from tracer.writer import RunPlan, TraceWriter, WriterError

GROUP = "run-0000"
STEPS = (0, 2, 4, 6, 8)  # coordinate values differ from positions on purpose
N_LAYERS = 3
N_HEADS = 2
TOKENS = (sf.TokenRow(0, 1, "a", "prompt"), sf.TokenRow(1, 1, "cat", "prompt"))
GRID = (3, 5)  # not square
MAP_SHAPE = (N_HEADS, len(TOKENS), GRID[0] * GRID[1])
TIMEOUT = 10.0


HOOK_THREADS = ThreadPoolExecutor(32, thread_name_prefix="test-hook")


class HookedStore(WrapperStore):
    """A store that runs `hook(key)` (in a worker thread) before every write, to stall or fail."""

    def __init__(self, store: Any, hook: Callable[[str], None] | None = None) -> None:
        super().__init__(store)
        self.hook = hook

    def _with_store(self, store: Any) -> HookedStore:
        return type(self)(store, self.hook)

    async def set(self, key: str, value: Any) -> None:
        if self.hook is not None:
            # Not zarr's executor (asyncio.to_thread): it may have as few threads as there are
            # cores, and a stalled hook holding one would stall the writes of other steps.
            await asyncio.get_running_loop().run_in_executor(HOOK_THREADS, self.hook, key)
        await self._store.set(key, value)


def is_shard(key: str, direction: str | None = None, step_pos: int | None = None) -> bool:
    """Whether a store key is an attention shard (of that direction / step position)."""
    names = [direction] if direction else list(sf.DIRECTIONS)
    for name in names:
        prefix = f"{GROUP}/{name}/c/"
        if key.startswith(prefix) and (
            step_pos is None or key[len(prefix) :].split("/")[0] == str(step_pos)
        ):
            return True
    return False


def make_run(
    path: Path,
    *,
    keepbits: int | None = 9,
    directions: Sequence[str] = sf.DIRECTIONS,
    steps_complete: Sequence[int] = (),
    hook: Callable[[str], None] | None = None,
    wrapped: bool = True,
    grid: tuple[int, ...] = GRID,
) -> zarr.Group:
    """Lay down a run skeleton the way the session does and open it r+, through a store
    wrapper (optionally hooked; written by zarr) or, `wrapped=False`, as the local folder the
    session opens (shards staged and renamed into place by tracer.durable)."""
    coords = run_coords(grid)
    attrs = {
        sf.STATUS: sf.RECORDING,
        sf.STEPS_COMPLETE: list(steps_complete),
        "prompt": "a cat",
        "error_bound": sf.relative_error_bound(keepbits),
    }
    dataset, encoding = sf.run_skeleton(coords, attrs, directions, keepbits)
    dataset.to_zarr(
        path,
        group=GROUP,
        mode="w-",
        compute=False,
        encoding=encoding,
        zarr_format=3,
        consolidated=False,
    )
    if not wrapped:
        return zarr.open_group(LocalStore(path), path=GROUP, mode="r+")
    return zarr.open_group(HookedStore(LocalStore(path), hook), path=GROUP, mode="r+")


def run_coords(grid: tuple[int, ...] = GRID) -> dict[str, Any]:
    """The coordinates of every run of these tests."""
    return sf.run_coords(
        steps=STEPS,
        timesteps=[1000.0 - 100 * i for i in range(len(STEPS))],
        sigmas=[1.0 - 0.1 * i for i in range(len(STEPS))],
        layers=[f"transformer_blocks.{i}" for i in range(N_LAYERS - 1)]
        + ["single_transformer_blocks.0"],
        layer_kinds=["double"] * (N_LAYERS - 1) + ["single"],
        heads=list(range(N_HEADS)),
        tokens=TOKENS,
        grid=grid,
    )


def random_maps(rng: np.random.Generator, directions: Sequence[str]) -> dict[str, torch.Tensor]:
    """Probabilities spread over many binades, exact zeros included, as the capture gives."""
    out = {}
    for name in directions:
        values = rng.random(MAP_SHAPE) * 10.0 ** rng.uniform(-6, 0, MAP_SHAPE)
        values[rng.random(MAP_SHAPE) < 0.05] = 0.0
        out[name] = torch.from_numpy(values.astype(np.float32))
    return out


def all_keys() -> list[tuple[int, int]]:
    """Every (step position, layer position), step-major."""
    return [
        (step_pos, layer_pos) for step_pos in range(len(STEPS)) for layer_pos in range(N_LAYERS)
    ]


def all_maps(
    rng: np.random.Generator, directions: Sequence[str] = sf.DIRECTIONS
) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """Random maps for every (step, layer), in step-major order."""
    return {key: random_maps(rng, directions) for key in all_keys()}


def read_run(path: Path) -> xr.Dataset:
    return xr.open_zarr(path, group=GROUP, consolidated=False).load()


def assert_stored(
    ds: xr.Dataset,
    step_pos: int,
    layer_pos: int,
    maps: dict[str, torch.Tensor],
    keepbits: int | None,
) -> None:
    """The stored map equals what was put, within the format's stated error bound."""
    bound = {None: 0.0, 9: 2.0**-10}[keepbits]  # stated, not computed by the code under test
    for name, tensor in maps.items():
        stored = ds[name].sel(step=STEPS[step_pos]).isel(layer=layer_pos)
        assert stored.dims == ("head", "token", "y", "x")
        stored = stored.values.reshape(MAP_SHAPE)
        expected = tensor.numpy()
        if keepbits is None:
            np.testing.assert_array_equal(stored, expected)
        else:
            error = np.abs(stored.astype(np.float64) - expected.astype(np.float64))
            assert np.all(error <= bound * np.abs(expected)), (
                f"{name} step {step_pos} layer {layer_pos}: relative error "
                f"{np.max(error / np.maximum(np.abs(expected), 1e-45))} > bound {bound}"
            )


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run fn in a daemon thread; the dict gets its 'value' or 'error'."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


def finish(thread: threading.Thread, timeout: float = TIMEOUT) -> None:
    thread.join(timeout)
    assert not thread.is_alive(), f"did not finish within {timeout} s (hang)"


def wait_until(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached (hang?)"
        time.sleep(0.005)


# ----------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("keepbits", [None, 9])
@pytest.mark.parametrize("directions", [sf.DIRECTIONS, ("img2txt",)])
@pytest.mark.parametrize("store", ["local", "wrapped"])
def test_round_trip_scrambled(
    tmp_path: Path, keepbits: int | None, directions: tuple, store: str
) -> None:
    path = tmp_path / "t.zarr"
    run = make_run(path, keepbits=keepbits, directions=directions, wrapped=store == "wrapped")
    rng = np.random.default_rng(0)
    skipped = 3  # a step position never put: it must read NaN and stay unlisted
    order = [key for key in all_keys() if key[0] != skipped]
    rng.shuffle(order)  # steps interleaved and layers out of order
    maps = {key: random_maps(rng, directions) for key in order}

    writer = TraceWriter(run, directions=directions, n_layers=N_LAYERS, max_pending=len(STEPS))
    for step_pos, layer_pos in order:
        writer.put(step_pos, layer_pos, maps[(step_pos, layer_pos)])
    thread, result = in_thread(writer.close)
    finish(thread)
    assert "error" not in result, result

    # The worker takes items in put() order, so a step completes at its last layer's put.
    last_put = {s: i for i, (s, _) in enumerate(order)}
    completion = sorted(last_put, key=last_put.__getitem__)
    ds = read_run(path)
    assert ds.attrs[sf.STEPS_COMPLETE] == [STEPS[s] for s in completion]
    assert writer.steps_complete == completion
    # The writer leaves the other attributes alone.
    assert ds.attrs["prompt"] == "a cat"
    assert ds.attrs[sf.STATUS] == sf.RECORDING
    for (step_pos, layer_pos), put_maps in maps.items():
        assert_stored(ds, step_pos, layer_pos, put_maps, keepbits)
    for name in directions:
        assert np.isnan(ds[name].sel(step=STEPS[skipped]).values).all()
    assert not list(path.rglob("*.partial"))  # no staging folder left behind
    if keepbits is not None:
        # The bound is the only slack: rounding did happen, so the check above had teeth.
        some = maps[order[0]][directions[0]].numpy()
        stored = ds[directions[0]].sel(step=STEPS[order[0][0]]).isel(layer=order[0][1])
        assert not np.array_equal(stored.values.reshape(MAP_SHAPE), some)


# ------------------------------------------------------------- a run laid down by the writer


@pytest.mark.parametrize("wrapped", [True, False], ids=["through zarr", "staged"])
def test_maps_put_before_the_run_is_laid_down_are_written_once_it_is(
    tmp_path: Path, wrapped: bool
) -> None:
    """With a RunPlan, put() takes whole steps (up to max_pending) while the run group does not
    exist yet; they are written, exactly, once the writer's thread has laid it down."""
    path = tmp_path / "t.zarr"
    may_lay_down = threading.Event()

    def lay_down() -> zarr.Group:
        assert may_lay_down.wait(TIMEOUT)
        return make_run(path, wrapped=wrapped)

    writer = TraceWriter(
        RunPlan(run_coords(), 9, lay_down), directions=sf.DIRECTIONS, n_layers=N_LAYERS
    )
    maps = all_maps(np.random.default_rng(7))
    early = [key for key in maps if key[0] < 2]  # two whole steps: max_pending
    for key in early:
        writer.put(*key, maps[key])
    assert writer.run is None and not path.exists()
    may_lay_down.set()
    for key in sorted(maps.keys() - set(early)):
        writer.put(*key, maps[key])
    thread, result = in_thread(writer.close)
    finish(thread)
    assert "error" not in result, result

    assert writer.run is not None and writer.run.path == GROUP
    ds = read_run(path)
    assert ds.attrs[sf.STEPS_COMPLETE] == list(STEPS)
    for (step_pos, layer_pos), put_maps in maps.items():
        assert_stored(ds, step_pos, layer_pos, put_maps, keepbits=9)


def test_the_first_step_is_copied_into_its_buffer_while_the_run_is_laid_down(
    tmp_path: Path,
) -> None:
    """Laying a run down holds up only the storing of steps: meanwhile the worker copies the
    first step's maps into its buffer, letting go of each map once copied."""
    path = tmp_path / "t.zarr"
    expected = all_maps(np.random.default_rng(9))
    first_put = threading.Event()
    held: list[weakref.ref[np.ndarray]] = []
    copied_while_laying_down: list[bool] = []

    def lay_down() -> zarr.Group:
        assert first_put.wait(TIMEOUT)
        deadline = time.monotonic() + TIMEOUT
        while any(ref() is not None for ref in held) and time.monotonic() < deadline:
            time.sleep(0.005)
        copied_while_laying_down.append(all(ref() is None for ref in held))
        return make_run(path)

    writer = TraceWriter(
        RunPlan(run_coords(), 9, lay_down), directions=sf.DIRECTIONS, n_layers=N_LAYERS
    )
    for layer_pos in range(N_LAYERS):
        arrays = {d: m.numpy().copy() for d, m in expected[(0, layer_pos)].items()}
        if layer_pos < N_LAYERS - 1:  # the worker holds the last while it waits to store it
            held += [weakref.ref(a) for a in arrays.values()]
        writer.put(0, layer_pos, {d: torch.from_numpy(a) for d, a in arrays.items()})
    del arrays
    first_put.set()
    for key in all_keys()[N_LAYERS:]:
        writer.put(*key, expected[key])
    thread, result = in_thread(writer.close)
    finish(thread)
    assert "error" not in result, result

    assert copied_while_laying_down == [True]
    ds = read_run(path)
    assert ds.attrs[sf.STEPS_COMPLETE] == list(STEPS)
    for (step_pos, layer_pos), put_maps in expected.items():
        assert_stored(ds, step_pos, layer_pos, put_maps, keepbits=9)


def test_a_run_that_cannot_be_laid_down_fails_put_and_close_with_its_cause(
    tmp_path: Path,
) -> None:
    target = tmp_path / "t.zarr"

    def lay_down() -> zarr.Group:
        raise PermissionError(errno.EACCES, "Permission denied", str(target))

    writer = TraceWriter(
        RunPlan(run_coords(), 9, lay_down), directions=sf.DIRECTIONS, n_layers=N_LAYERS
    )
    maps = all_maps(np.random.default_rng(8))

    def put_all() -> None:
        for key, put_maps in maps.items():
            writer.put(*key, put_maps)

    thread, result = in_thread(put_all)
    finish(thread)  # the third step's put() would wait for a free buffer: it must not hang
    assert isinstance(result.get("error"), WriterError), result
    with pytest.raises(WriterError) as at_close:
        writer.close()
    for error in (result["error"], at_close.value):
        assert "laying down the run failed: PermissionError" in str(error)
        assert str(target) in str(error)
    assert writer.run is None


def test_a_run_laid_down_unlike_its_plan_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.zarr"
    writer = TraceWriter(
        RunPlan(run_coords(), 9, lambda: make_run(path, grid=(2, 5))),
        directions=sf.DIRECTIONS,
        n_layers=N_LAYERS,
    )
    with pytest.raises(WriterError) as refused:
        writer.close()
    message = str(refused.value)
    assert "(5, 3, 2, 2, 2, 5)" in message and "(5, 3, 2, 2, 3, 5)" in message, message
    assert writer.run is None


@pytest.mark.parametrize("wrapped", [True, False], ids=["through zarr", "staged"])
def test_a_video_runs_maps_carry_their_frames_with_the_same_pool(
    tmp_path: Path, wrapped: bool
) -> None:
    """Maps of a (frame, y, x) grid arrive flattened, row-major, and are stored with a frame dim;
    the host buffers stay a pool of max_pending, however many steps."""
    frames = 2
    path = tmp_path / "t.zarr"
    run = make_run(path, keepbits=None, wrapped=wrapped, grid=(frames, *GRID))
    rng = np.random.default_rng(4)
    writer = TraceWriter(run, directions=sf.DIRECTIONS, n_layers=N_LAYERS, max_pending=2)
    shape = (N_HEADS, len(TOKENS), frames * GRID[0] * GRID[1])
    maps = {}
    for step_pos, layer_pos in all_keys():
        maps[(step_pos, layer_pos)] = {
            name: torch.from_numpy(rng.random(shape, dtype=np.float32)) for name in sf.DIRECTIONS
        }
        writer.put(step_pos, layer_pos, maps[(step_pos, layer_pos)])
    writer.close()
    assert writer._buffers_allocated <= 2
    ds = read_run(path)
    assert ds.txt2img.dims == sf.VIDEO_DIMS and ds.frame.values.tolist() == [0, 1]
    for (step_pos, layer_pos), put_maps in maps.items():
        for name, tensor in put_maps.items():
            stored = ds[name].isel(step=step_pos, layer=layer_pos).values
            want = tensor.numpy().reshape(N_HEADS, len(TOKENS), frames, *GRID)
            np.testing.assert_array_equal(stored, want)
    assert ds.attrs[sf.STEPS_COMPLETE] == list(STEPS)


def test_buffers_are_reused(tmp_path: Path) -> None:
    path = tmp_path / "t.zarr"
    run = make_run(path, keepbits=None)
    rng = np.random.default_rng(1)
    writer = TraceWriter(run, directions=sf.DIRECTIONS, n_layers=N_LAYERS, max_pending=2)
    maps = {}
    for step_pos in range(len(STEPS)):
        for layer_pos in reversed(range(N_LAYERS)):
            maps[(step_pos, layer_pos)] = random_maps(rng, sf.DIRECTIONS)
            writer.put(step_pos, layer_pos, maps[(step_pos, layer_pos)])
    writer.close()
    assert writer._buffers_allocated <= 2  # a pool of max_pending, not one per step
    ds = read_run(path)
    for (step_pos, layer_pos), put_maps in maps.items():
        assert_stored(ds, step_pos, layer_pos, put_maps, None)
    assert ds.attrs[sf.STEPS_COMPLETE] == list(STEPS)


def test_caller_may_drop_tensors_and_views(tmp_path: Path) -> None:
    """Non-contiguous CPU maps are fine, and dropping them after put() loses nothing."""
    path = tmp_path / "t.zarr"
    run = make_run(path, keepbits=None, directions=("txt2img",))
    rng = np.random.default_rng(2)
    writer = TraceWriter(run, directions=["txt2img"], n_layers=N_LAYERS, max_pending=1)
    expected = {}
    for layer_pos in range(N_LAYERS):
        full = torch.from_numpy(rng.random((*MAP_SHAPE[::-1],), dtype=np.float32))
        view = full.permute(2, 1, 0)  # [H, S, YX], not contiguous
        expected[layer_pos] = {"txt2img": view.contiguous().clone()}
        writer.put(0, layer_pos, {"txt2img": view})
        del full, view
    writer.close()
    ds = read_run(path)
    for layer_pos, put_maps in expected.items():
        assert_stored(ds, 0, layer_pos, put_maps, None)


def test_existing_listed_steps_are_kept_and_not_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "t.zarr"
    run = make_run(path, keepbits=None, steps_complete=[STEPS[1]])
    rng = np.random.default_rng(3)
    writer = TraceWriter(run, directions=sf.DIRECTIONS, n_layers=N_LAYERS)
    with pytest.raises(ValueError, match=r"step 2 \(position 1\) is already listed"):
        writer.put(1, 0, random_maps(rng, sf.DIRECTIONS))
    for layer_pos in range(N_LAYERS):
        writer.put(0, layer_pos, random_maps(rng, sf.DIRECTIONS))
    writer.close()
    assert read_run(path).attrs[sf.STEPS_COMPLETE] == [STEPS[1], STEPS[0]]


def test_context_manager_closes(tmp_path: Path) -> None:
    path = tmp_path / "t.zarr"
    run = make_run(path, keepbits=None)
    rng = np.random.default_rng(4)
    with TraceWriter(run, directions=sf.DIRECTIONS, n_layers=N_LAYERS) as writer:
        for layer_pos in range(N_LAYERS):
            writer.put(4, layer_pos, random_maps(rng, sf.DIRECTIONS))
    assert read_run(path).attrs[sf.STEPS_COMPLETE] == [STEPS[4]]


# --------------------------------------------------------------------------------- backpressure


def test_backpressure_blocks_and_bounds_pending(tmp_path: Path) -> None:
    max_pending = 2
    # One gate per step position: pending steps' shards are written side by side, so the test
    # lets whole steps through, in order.
    gates = {step_pos: threading.Semaphore(0) for step_pos in range(len(STEPS))}
    released = [0]  # shard writes allowed so far; counted before each release

    def stall(key: str) -> None:
        step_pos = next((p for p in gates if is_shard(key, step_pos=p)), None)
        if step_pos is not None and not gates[step_pos].acquire(timeout=TIMEOUT):
            raise TimeoutError("test gate never opened")

    path = tmp_path / "t.zarr"
    run = make_run(path, keepbits=None, hook=stall)
    writer = TraceWriter(run, directions=sf.DIRECTIONS, n_layers=N_LAYERS, max_pending=max_pending)
    rng = np.random.default_rng(5)
    maps = all_maps(rng)
    calls: list[tuple[int, int]] = []
    returned: list[tuple[int, int]] = []
    ahead: list[int] = []

    def produce() -> None:
        for step_pos in range(len(STEPS)):
            for layer_pos in range(N_LAYERS):
                calls.append((step_pos, layer_pos))
                writer.put(step_pos, layer_pos, maps[(step_pos, layer_pos)])
                returned.append((step_pos, layer_pos))
                # Steps accepted minus steps whose two shard writes were even allowed: an upper
                # bound on the steps pending inside the writer.
                ahead.append(step_pos + 1 - released[0] // len(sf.DIRECTIONS))

    def release(n: int) -> None:
        for _ in range(n):
            step_pos = min(released[0] // len(sf.DIRECTIONS), len(STEPS) - 1)
            released[0] += 1
            gates[step_pos].release()

    producer, result = in_thread(produce)
    try:
        # Nothing is written yet: steps 0 and 1 are accepted, the first put of step 2 waits.
        wait_until(lambda: len(calls) == max_pending * N_LAYERS + 1)
        time.sleep(0.3)
        assert calls[-1] == (2, 0)
        assert len(returned) == max_pending * N_LAYERS
        progress = writer.progress()
        assert (progress.backlog, progress.decoded_mb_s) == (max_pending, 0.0)
        assert progress.waited_s < 0.3  # put() is waiting still: counted once it is through
        # Step 0 written (one shard per direction): step 2 goes in, step 3 waits.
        release(len(sf.DIRECTIONS))
        wait_until(lambda: len(calls) == (max_pending + 1) * N_LAYERS + 1)
        time.sleep(0.3)
        assert calls[-1] == (3, 0)
        assert len(returned) == (max_pending + 1) * N_LAYERS
    finally:
        release(100)
    finish(producer)
    assert "error" not in result, result
    writer.close()
    assert max(ahead) <= max_pending
    progress = writer.progress()
    assert progress.backlog == 0 and progress.decoded_mb_s > 0
    # put() of steps 2 and 3 waited for the writer at least the 0.3 s each stood held above.
    assert progress.waited_s >= 0.6
    time.sleep(0.05)
    assert writer.progress() == progress  # the rate is the run's, not diluted after close()
    ds = read_run(path)
    assert ds.attrs[sf.STEPS_COMPLETE] == list(STEPS)
    for (step_pos, layer_pos), put_maps in maps.items():
        assert_stored(ds, step_pos, layer_pos, put_maps, None)


def test_starting_more_steps_than_max_pending_without_finishing_one_raises(
    tmp_path: Path,
) -> None:
    run = make_run(tmp_path / "t.zarr")
    writer = TraceWriter(run, directions=sf.DIRECTIONS, n_layers=N_LAYERS, max_pending=1)
    rng = np.random.default_rng(6)
    writer.put(0, 0, random_maps(rng, sf.DIRECTIONS))
    thread, result = in_thread(lambda: writer.put(1, 0, random_maps(rng, sf.DIRECTIONS)))
    finish(thread)
    assert isinstance(result.get("error"), RuntimeError)
    assert "would wait forever" in str(result["error"])
    writer.abort()


# -------------------------------------------------------------------------------------- failure


def test_failed_write_raises_in_blocked_put(tmp_path: Path) -> None:
    def disk_full_at_step_1(key: str) -> None:
        if is_shard(key, "txt2img", step_pos=1):
            raise OSError(errno.ENOSPC, "No space left on device")

    path = tmp_path / "t.zarr"
    run = make_run(path, keepbits=None, hook=disk_full_at_step_1)
    writer = TraceWriter(run, directions=sf.DIRECTIONS, n_layers=N_LAYERS, max_pending=1)
    rng = np.random.default_rng(7)
    maps = all_maps(rng)
    calls: list[tuple[int, int]] = []

    def produce() -> None:
        for (step_pos, layer_pos), put_maps in maps.items():
            calls.append((step_pos, layer_pos))
            writer.put(step_pos, layer_pos, put_maps)

    producer, result = in_thread(produce)
    finish(producer)
    error = result.get("error")
    assert isinstance(error, WriterError), result
    # max_pending=1: the first put of step 2 waited for step 1, whose write failed.
    assert calls[-1] == (2, 0)
    assert "step 2 (position 1)" in str(error)
    assert "No space left on device" in str(error)
    assert "'txt2img'" in str(error)
    assert isinstance(error.__cause__, OSError)

    with pytest.raises(WriterError, match="No space left on device"):
        writer.put(4, 0, maps[(4, 0)])
    closer, result = in_thread(writer.close)
    finish(closer)
    assert isinstance(result.get("error"), WriterError)
    with pytest.raises(WriterError, match="No space left"):
        writer.close()  # idempotent: the same failure, no hang
    writer.abort()

    ds = read_run(path)
    assert ds.attrs[sf.STEPS_COMPLETE] == [STEPS[0]]
    for layer_pos in range(N_LAYERS):
        assert_stored(ds, 0, layer_pos, maps[(0, layer_pos)], None)
    for step in STEPS[1:]:
        assert np.isnan(ds["txt2img"].sel(step=step).values).all()


def test_failed_last_write_raises_in_close(tmp_path: Path) -> None:
    last = len(STEPS) - 1

    def fail_last_img2txt(key: str) -> None:
        if is_shard(key, "img2txt", step_pos=last):
            raise PermissionError(errno.EACCES, "Permission denied")

    path = tmp_path / "t.zarr"
    run = make_run(path, hook=fail_last_img2txt)
    writer = TraceWriter(run, directions=sf.DIRECTIONS, n_layers=N_LAYERS, max_pending=2)
    rng = np.random.default_rng(8)
    for step_pos in range(len(STEPS)):
        for layer_pos in range(N_LAYERS):
            writer.put(step_pos, layer_pos, random_maps(rng, sf.DIRECTIONS))
    closer, result = in_thread(writer.close)
    finish(closer)
    error = result.get("error")
    assert isinstance(error, WriterError), result
    assert f"step {STEPS[last]} (position {last})" in str(error)
    assert "Permission denied" in str(error)
    # The txt2img shard of that step may be there, but the step is not listed: not durable.
    assert read_run(path).attrs[sf.STEPS_COMPLETE] == list(STEPS[:last])


def test_failed_listing_raises(tmp_path: Path) -> None:
    state = {"fail": False}

    def fail_metadata(key: str) -> None:
        if key == f"{GROUP}/zarr.json" and state["fail"]:
            raise OSError(errno.EIO, "Input/output error")

    path = tmp_path / "t.zarr"
    run = make_run(path, hook=fail_metadata)
    state["fail"] = True
    writer = TraceWriter(run, directions=sf.DIRECTIONS, n_layers=N_LAYERS)
    rng = np.random.default_rng(9)
    close_after_a_failed_listing(writer, [random_maps(rng, sf.DIRECTIONS)] * N_LAYERS)
    assert read_run(path).attrs[sf.STEPS_COMPLETE] == []


def close_after_a_failed_listing(writer: TraceWriter, maps: Sequence[dict[str, Any]]) -> None:
    """Put step 0's `maps`, one per layer, then close(): it raises the listing's I/O error."""
    for layer_pos, layer_maps in enumerate(maps):
        writer.put(0, layer_pos, layer_maps)
    closer, result = in_thread(writer.close)
    finish(closer)
    error = result.get("error")
    assert isinstance(error, WriterError), result
    assert "listing step 0 (position 0)" in str(error)
    assert "Input/output error" in str(error)


def test_a_listing_the_disk_fails_to_sync_fails_close_and_keeps_the_step_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On a local folder the writer writes and syncs the listing itself (tracer.durable), so the
    # failure comes from the disk: fsync of the run's zarr.json reports an I/O error.
    path = tmp_path / "t.zarr"
    run = make_run(path, wrapped=False)
    listing = str(path / GROUP / "zarr.json")
    real_fsync = os.fsync

    def fsync(descriptor: int) -> None:
        if os.readlink(f"/proc/self/fd/{descriptor}") == listing:
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    writer = TraceWriter(run, directions=sf.DIRECTIONS, n_layers=N_LAYERS)
    rng = np.random.default_rng(9)
    maps = [random_maps(rng, sf.DIRECTIONS) for _ in range(N_LAYERS)]
    close_after_a_failed_listing(writer, maps)
    assert writer.steps_complete == []
    # The step's shards reached the disk before the listing was written: what reads as listed
    # is whole.
    ds = read_run(path)
    for layer_pos in range(N_LAYERS):
        assert_stored(ds, 0, layer_pos, maps[layer_pos], keepbits=9)


def test_close_with_incomplete_step_raises_and_leaves_it_unwritten(tmp_path: Path) -> None:
    path = tmp_path / "t.zarr"
    run = make_run(path)
    writer = TraceWriter(run, directions=sf.DIRECTIONS, n_layers=N_LAYERS)
    rng = np.random.default_rng(10)
    for layer_pos in range(N_LAYERS):
        writer.put(0, layer_pos, random_maps(rng, sf.DIRECTIONS))
    writer.put(1, 2, random_maps(rng, sf.DIRECTIONS))
    with pytest.raises(WriterError, match=r"step 2 \(position 1\) lacks layer positions \[0, 1\]"):
        writer.close()
    ds = read_run(path)
    assert ds.attrs[sf.STEPS_COMPLETE] == [STEPS[0]]
    assert np.isnan(ds["txt2img"].sel(step=STEPS[1]).values).all()


KILL_CHILD = """
import asyncio, json, os, signal, sys
import torch, zarr
from zarr.storage import LocalStore, WrapperStore
from tracer.writer import TraceWriter

class KillStore(WrapperStore):
    def _with_store(self, store):
        return type(self)(store)

    async def set(self, key, value):
        if key.startswith("run-0000/img2txt/c/2/"):  # step position 2, after its txt2img shard
            # The directions are stored side by side: die once the txt2img shard is in, and
            # once step position 1 (written beside step 2) is listed, whichever comes last.
            while not (
                await self._store.exists("run-0000/txt2img/c/2/0/0/0/0/0") and listed() == [0, 2]
            ):
                await asyncio.sleep(0.01)
            os.kill(os.getpid(), signal.SIGKILL)
        await self._store.set(key, value)

def listed():
    try:
        with open(os.path.join(sys.argv[1], "run-0000", "zarr.json")) as file:
            return json.load(file)["attributes"].get("steps_complete")
    except ValueError:  # caught mid-write: look again
        return None

run = zarr.open_group(KillStore(LocalStore(sys.argv[1])), path="run-0000", mode="r+")
writer = TraceWriter(run, directions=["txt2img", "img2txt"], n_layers=3, max_pending=2)
for step_pos in range(5):
    for layer_pos in range(3):
        generator = torch.Generator().manual_seed(10 * step_pos + layer_pos)
        maps = {d: torch.rand(2, 2, 15, generator=generator) for d in ("txt2img", "img2txt")}
        writer.put(step_pos, layer_pos, maps)
writer.close()
"""


def test_kill_9_leaves_listed_steps_intact(tmp_path: Path) -> None:
    path = tmp_path / "t.zarr"
    make_run(path, keepbits=None)
    root = Path(__file__).resolve().parents[2]
    child = subprocess.run(
        [sys.executable, "-c", KILL_CHILD, str(path)],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    ds = read_run(path)
    assert ds.attrs[sf.STEPS_COMPLETE] == [STEPS[0], STEPS[1]]
    for step_pos in (0, 1):
        for layer_pos in range(N_LAYERS):
            generator = torch.Generator().manual_seed(10 * step_pos + layer_pos)
            maps = {d: torch.rand(MAP_SHAPE, generator=generator) for d in sf.DIRECTIONS}
            assert_stored(ds, step_pos, layer_pos, maps, None)
    # Step 2's txt2img shard made it to disk, but the step is not listed: not to be trusted.
    assert not np.isnan(ds["txt2img"].sel(step=STEPS[2]).values).any()
    assert np.isnan(ds["img2txt"].sel(step=STEPS[2]).values).all()


# ---------------------------------------------------------------------------------------- abort


def test_abort_never_hangs_on_a_stuck_write(tmp_path: Path) -> None:
    gate = threading.Event()

    def stuck(key: str) -> None:
        if is_shard(key):
            gate.wait(TIMEOUT)

    path = tmp_path / "t.zarr"
    run = make_run(path, keepbits=None, hook=stuck)
    writer = TraceWriter(run, directions=sf.DIRECTIONS, n_layers=N_LAYERS, max_pending=2)
    rng = np.random.default_rng(11)
    maps = all_maps(rng)
    calls: list[tuple[int, int]] = []

    def produce() -> None:
        for (step_pos, layer_pos), put_maps in maps.items():
            calls.append((step_pos, layer_pos))
            writer.put(step_pos, layer_pos, put_maps)

    producer, result = in_thread(produce)
    try:
        wait_until(lambda: len(calls) == 2 * N_LAYERS + 1)  # blocked at step 2
        start = time.monotonic()
        aborter, abort_result = in_thread(lambda: writer.abort(timeout=0.5))
        finish(aborter, timeout=5)
        assert time.monotonic() - start < 3
        assert "error" not in abort_result, abort_result
        finish(producer)
        assert isinstance(result.get("error"), WriterError)
        assert "aborted" in str(result["error"])
        with pytest.raises(WriterError, match="aborted"):
            writer.put(4, 0, maps[(4, 0)])
        writer.abort()  # again: no-op
        writer.close()  # after abort, with no writer failure: nothing to raise
    finally:
        gate.set()
    writer._thread.join(TIMEOUT)  # let the in-flight writes end before reading
    writer._lister.join(TIMEOUT)
    ds = read_run(path)
    # The steps under way when abort() came (0, and 1 once complete) may finish; nothing after
    # them is written.
    assert ds.attrs[sf.STEPS_COMPLETE] in ([], [STEPS[0]], [STEPS[0], STEPS[1]])
    for step in STEPS[2:]:
        assert np.isnan(ds["txt2img"].sel(step=step).values).all()
        assert np.isnan(ds["img2txt"].sel(step=step).values).all()


def test_abort_idle_and_context_manager_on_error(tmp_path: Path) -> None:
    path = tmp_path / "t.zarr"
    run = make_run(path)
    rng = np.random.default_rng(12)
    with pytest.raises(KeyError), TraceWriter(run, directions=sf.DIRECTIONS, n_layers=3) as writer:
        writer.put(0, 0, random_maps(rng, sf.DIRECTIONS))
        raise KeyError("generation failed")
    writer.abort()
    writer.close()
    assert read_run(path).attrs[sf.STEPS_COMPLETE] == []


# ----------------------------------------------------------------------------------- validation


@pytest.fixture
def writer(tmp_path: Path) -> TraceWriter:
    run = make_run(tmp_path / "t.zarr")
    writer = TraceWriter(run, directions=sf.DIRECTIONS, n_layers=N_LAYERS)
    yield writer
    writer.abort()


def good_maps() -> dict[str, torch.Tensor]:
    return {name: torch.zeros(MAP_SHAPE) for name in sf.DIRECTIONS}


@pytest.mark.parametrize(
    ("step_pos", "layer_pos", "maps", "message"),
    [
        (len(STEPS), 0, good_maps(), r"step position 5 out of range 0\.\.4"),
        (-1, 0, good_maps(), r"step position -1 out of range"),
        (0, N_LAYERS, good_maps(), r"layer position 3 out of range 0\.\.2"),
        (0, 0, {**good_maps(), "img2img": torch.zeros(MAP_SHAPE)}, r"unknown: \['img2img'\]"),
        (0, 0, {"txt2img": torch.zeros(MAP_SHAPE)}, r"missing: \['img2txt'\]"),
        (
            0,
            0,
            {**good_maps(), "img2txt": torch.zeros(2, 2, 3, 5)},
            r"'img2txt' map .* expected shape \[head, token, latent cells\] = \[2, 2, 15\].*"
            r"found \[2, 2, 3, 5\]",
        ),
        (
            0,
            0,
            {**good_maps(), "txt2img": torch.zeros(MAP_SHAPE, dtype=torch.bfloat16)},
            r"expected dtype torch.float32, found torch.bfloat16",
        ),
        (0, 0, {**good_maps(), "txt2img": np.zeros(MAP_SHAPE)}, r"must be a torch.Tensor"),
    ],
)
def test_put_validates(
    writer: TraceWriter, step_pos: int, layer_pos: int, maps: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        writer.put(step_pos, layer_pos, maps)
    writer.put(0, 0, good_maps())  # a refused put left no trace


def test_put_twice_is_refused(writer: TraceWriter) -> None:
    writer.put(1, 2, good_maps())
    with pytest.raises(ValueError, match="step position 1, layer position 2 were already put"):
        writer.put(1, 2, good_maps())


def test_put_after_step_durable_is_refused(tmp_path: Path) -> None:
    run = make_run(tmp_path / "t.zarr")
    writer = TraceWriter(run, directions=sf.DIRECTIONS, n_layers=N_LAYERS)
    for layer_pos in range(N_LAYERS):
        writer.put(0, layer_pos, good_maps())
    wait_until(lambda: writer.steps_complete == [0])
    with pytest.raises(ValueError, match="already"):
        writer.put(0, 1, good_maps())
    writer.close()
    with pytest.raises(RuntimeError, match="after close"):
        writer.put(1, 0, good_maps())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"directions": ["txt2img", "attn"]}, "directions must name each of"),
        ({"directions": []}, "directions must name each of"),
        ({"directions": ["txt2img", "txt2img"]}, "directions must name each of"),
        ({"n_layers": 4}, "n_layers=4 but the run's arrays hold 3 layers"),
        ({"max_pending": 0}, "max_pending must be >= 1"),
    ],
)
def test_init_validates(tmp_path: Path, kwargs: dict, message: str) -> None:
    run = make_run(tmp_path / "t.zarr")
    arguments = {"directions": sf.DIRECTIONS, "n_layers": N_LAYERS, **kwargs}
    with pytest.raises(ValueError, match=message):
        TraceWriter(run, **arguments)


def test_init_refuses_missing_array_and_read_only_group(tmp_path: Path) -> None:
    path = tmp_path / "t.zarr"
    run = make_run(path, directions=("img2txt",))
    with pytest.raises(ValueError, match="has no 'txt2img' array"):
        TraceWriter(run, directions=sf.DIRECTIONS, n_layers=N_LAYERS)
    read_only = zarr.open_group(path, path=GROUP, mode="r")
    with pytest.raises(ValueError, match="read-only"):
        TraceWriter(read_only, directions=["img2txt"], n_layers=N_LAYERS)


# ----------------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
def test_cuda_put_is_asynchronous_and_exact(tmp_path: Path) -> None:
    path = tmp_path / "t.zarr"
    run = make_run(path, keepbits=None)
    writer = TraceWriter(run, directions=sf.DIRECTIONS, n_layers=N_LAYERS, max_pending=2)
    rng = np.random.default_rng(13)
    expected = {}
    for step_pos in range(len(STEPS)):
        for layer_pos in range(N_LAYERS):
            host = random_maps(rng, sf.DIRECTIONS)
            expected[(step_pos, layer_pos)] = host
            device = {name: t.cuda() for name, t in host.items()}
            busy = step_pos < 2  # before any backpressure can make put() wait
            if busy:
                torch.cuda._sleep(200_000_000)  # keep the stream busy for ~0.1 s
            writer.put(step_pos, layer_pos, device)
            if busy:
                # put() returned while the stream still runs: it did not synchronise it.
                assert not torch.cuda.current_stream().query()
            # The caller reuses its memory right away, on the same stream: the queued copy
            # comes first in stream order, so the stored values are the ones put.
            for tensor in device.values():
                tensor.fill_(float("nan"))
    writer.close()
    assert all(t.is_pinned() for t in writer._free[0].values())
    ds = read_run(path)
    for (step_pos, layer_pos), put_maps in expected.items():
        assert_stored(ds, step_pos, layer_pos, put_maps, None)
    assert ds.attrs[sf.STEPS_COMPLETE] == list(STEPS)


@pytest.mark.cuda
def test_cuda_maps_are_copied_off_beside_the_models_stream(tmp_path: Path) -> None:
    """The device->host copy runs on a stream of the writer's: the model's work queued after
    put() does not wait for it, and the caller may overwrite its maps at once."""
    path = tmp_path / "t.zarr"
    writer = TraceWriter(make_run(path), directions=sf.DIRECTIONS, n_layers=N_LAYERS)
    rng = np.random.default_rng(17)
    expected = {key: random_maps(rng, sf.DIRECTIONS) for key in all_keys()}
    device = torch.device("cuda", torch.cuda.current_device())
    model = torch.cuda.current_stream(device)
    for step_pos, layer_pos in all_keys():
        maps = {name: t.to(device) for name, t in expected[(step_pos, layer_pos)].items()}
        busy = (step_pos, layer_pos) == (0, 1)
        if busy:  # the writer's copy stream, made by the first put(), kept busy for ~0.5 s
            copies = writer._copy_streams[device]
            with torch.cuda.stream(copies):
                torch.cuda._sleep(1_000_000_000)
        writer.put(step_pos, layer_pos, maps)
        for tensor in maps.values():
            tensor.fill_(float("nan"))  # the caller reuses its memory on the model's stream
        if busy:
            done = torch.cuda.Event()
            done.record(model)
            done.synchronize()
            # The model's stream got past put() and the fill while the copy still waited.
            assert not copies.query()
    writer.close()
    ds = read_run(path)
    for (step_pos, layer_pos), put_maps in expected.items():
        assert_stored(ds, step_pos, layer_pos, put_maps, 9)
    assert ds.attrs[sf.STEPS_COMPLETE] == list(STEPS)


def test_the_step_buffers_are_allocated_beside_the_generation_not_by_put(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pinning a step's host memory takes a fraction of a second per GB on a GPU box: the pool
    (max_pending buffers per direction) is made on a writer thread, never on put()'s."""
    run = make_run(tmp_path / "t.zarr", keepbits=None)
    made: list[str] = []
    empty = torch.empty

    def recording_empty(*args: Any, **kwargs: Any) -> torch.Tensor:
        tensor = empty(*args, **kwargs)
        if tensor.ndim == len(sf.DIMS) - 1:  # a step buffer: [layer, head, token, y, x]
            made.append(threading.current_thread().name)
        return tensor

    monkeypatch.setattr(torch, "empty", recording_empty)
    rng = np.random.default_rng(5)
    writer = TraceWriter(run, directions=sf.DIRECTIONS, n_layers=N_LAYERS, max_pending=2)
    for step_pos, layer_pos in all_keys():
        writer.put(step_pos, layer_pos, random_maps(rng, sf.DIRECTIONS))
    writer.close()
    assert len(made) == 2 * len(sf.DIRECTIONS), made
    assert threading.current_thread().name not in made, made
    assert read_run(tmp_path / "t.zarr").attrs[sf.STEPS_COMPLETE] == list(STEPS)


def test_a_pool_that_cannot_be_allocated_fails_put_with_its_cause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = make_run(tmp_path / "t.zarr", keepbits=None)
    empty = torch.empty

    def no_memory(*args: Any, **kwargs: Any) -> torch.Tensor:
        if len(args) == 1 and len(args[0]) == len(sf.DIMS) - 1:
            raise RuntimeError("out of pinned memory")
        return empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", no_memory)
    writer = TraceWriter(run, directions=sf.DIRECTIONS, n_layers=N_LAYERS, max_pending=2)
    with pytest.raises(WriterError, match=r"allocating the step buffers failed: .*out of pinned"):
        writer.put(0, 0, random_maps(np.random.default_rng(6), sf.DIRECTIONS))
    writer.abort()
    assert zarr.open_group(tmp_path / "t.zarr", path=GROUP).attrs[sf.STEPS_COMPLETE] == []
