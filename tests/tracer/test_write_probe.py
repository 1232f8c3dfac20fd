"""tracer.write_probe: the writer's rate here, measured by short recordings of its own."""

from __future__ import annotations

import math
import os
from typing import ClassVar

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from zarr.storage import MemoryStore

from analysis import store_format as fmt
from tracer import write_probe
from tracer.estimate import MEASURED_BYTES_PER_VALUE
from tracer.rounding import bitround_
from tracer.writer import TraceWriter

SHAPE = {"layers": 6, "heads": 3, "rows": 5, "grid": (8, 8)}
DIRECTIONS = ("txt2img", "img2txt")


class _SeenWriter(TraceWriter):
    """A TraceWriter that notes what it was given, and reads its store back once closed."""

    seen: ClassVar[list[dict]] = []

    def __init__(self, run, **kwargs):
        super().__init__(run, **kwargs)
        self._noted = {"kwargs": kwargs, "puts": [], "plan": run}
        _SeenWriter.seen.append(self._noted)

    def put(self, step_pos, layer_pos, maps):
        self._noted["puts"].append((step_pos, layer_pos, {d: m.clone() for d, m in maps.items()}))
        super().put(step_pos, layer_pos, maps)

    def close(self):
        super().close()
        # Plain xarray, before the probe removes the store: what a reader of it would get.
        group = self.run
        self._noted["read"] = xr.open_zarr(
            group.store.root, group=group.path, consolidated=False
        ).load()
        self._noted["steps_complete"] = list(group.attrs[fmt.STEPS_COMPLETE])


@pytest.fixture
def seen(monkeypatch):
    _SeenWriter.seen = []
    monkeypatch.setattr(write_probe, "TraceWriter", _SeenWriter)
    return _SeenWriter.seen


def test_the_probe_records_steps_of_the_shape_asked_as_a_recording_would(tmp_path, seen):
    rate = write_probe.writer_rate(
        tmp_path, directions=DIRECTIONS, keepbits=7, max_pending_steps=3, **SHAPE
    )
    assert math.isfinite(rate) and rate > 0
    assert list(tmp_path.iterdir()) == []  # every store it wrote is removed
    # A warm-up store of 1 + STEPS steps, one of one step, one of 1 + STEPS.
    steps = 1 + write_probe.STEPS
    assert [len({p[0] for p in s["puts"]}) for s in seen] == [steps, 1, steps]
    cells = 8 * 8
    for s in seen:
        assert s["kwargs"] == {
            "directions": list(DIRECTIONS),
            "n_layers": 6,
            "max_pending": 3,
            "fsync": True,
        }
        steps = sorted({p[0] for p in s["puts"]})
        assert [(p[0], p[1]) for p in s["puts"]] == [(t, i) for t in steps for i in range(6)]
        assert s["steps_complete"] == steps
        for *_, maps in s["puts"]:
            assert set(maps) == set(DIRECTIONS)
            for m in maps.values():
                assert m.shape == (3, 5, cells) and m.dtype == torch.float32
                # Attention-like: rows of probabilities over the cells.
                assert torch.allclose(m.sum(-1), torch.ones(3, 5), atol=1e-5)
        # What the store holds is the maps within keepbits 7's bound (2^-8), nothing else.
        values = next(m for _, _, maps in s["puts"] for m in maps.values()).numpy().astype("f8")
        for direction in DIRECTIONS:
            read = s["read"][direction].isel(step=steps).values.reshape(len(steps), 6, 3, 5, cells)
            assert np.all(np.abs(read - values) <= 2.0**-8 * np.abs(values))


def test_a_video_models_probe_writes_frames_and_its_one_direction(tmp_path, seen):
    shape = {"layers": 2, "heads": 2, "rows": 3, "grid": (2, 4, 4)}
    rate = write_probe.writer_rate(tmp_path, directions=("img2txt",), keepbits=9, **shape)
    assert rate > 0 and list(tmp_path.iterdir()) == []
    for s in seen:
        assert list(s["read"].data_vars) == ["img2txt"]
        assert s["read"]["img2txt"].dims == fmt.VIDEO_DIMS
        assert s["read"]["img2txt"].shape[1:] == (2, 2, 3, 2, 4, 4)


def test_a_step_is_capped_at_step_bytes_by_its_layers(tmp_path, seen, monkeypatch):
    layer_bytes = 3 * 5 * 64 * 4 * 2
    monkeypatch.setattr(write_probe, "STEP_BYTES", 2 * layer_bytes + 1)
    write_probe.writer_rate(tmp_path, directions=DIRECTIONS, keepbits=None, **SHAPE)
    assert {s["kwargs"]["n_layers"] for s in seen} == {2}
    monkeypatch.setattr(write_probe, "STEP_BYTES", 1)  # a step holds one layer at the least
    seen.clear()
    write_probe.writer_rate(tmp_path, directions=DIRECTIONS, keepbits=None, **SHAPE)
    assert {s["kwargs"]["n_layers"] for s in seen} == {1}


@pytest.mark.parametrize(
    ("timings", "extra"),
    [
        ((9.0, 1.0, 3.0), 2.0),  # the 5-step store took 2.0 s more than the 1-step store
        ((9.0, 3.0, 2.5), 2.5 / 5 * 4),  # crossed over (a busy host): its whole rate instead
    ],
)
def test_the_rate_is_the_steps_beyond_a_one_step_store(tmp_path, monkeypatch, timings, extra):
    given = iter(timings)
    monkeypatch.setattr(write_probe, "_record", lambda *args, **kwargs: next(given))
    rate = write_probe.writer_rate(tmp_path, directions=("txt2img",), keepbits=7, **SHAPE)
    # By hand: 4 steps of 6 layers × 3 heads × 5 rows × 64 cells × 4 bytes, one direction.
    assert rate == pytest.approx(4 * 6 * 3 * 5 * 64 * 4 / extra)


def test_the_probe_syncs_as_the_recording_would(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    write_probe.writer_rate(tmp_path, directions=DIRECTIONS, keepbits=7, **SHAPE)
    assert synced

    def forbidden(fd):
        raise AssertionError("fsync with fsync=False")

    monkeypatch.setattr(os, "fsync", forbidden)
    rate = write_probe.writer_rate(
        tmp_path, directions=DIRECTIONS, keepbits=7, fsync=False, **SHAPE
    )
    assert rate > 0 and list(tmp_path.iterdir()) == []


def test_synthetic_maps_store_about_the_bytes_real_maps_do():
    # FLUX.1-dev's chunks: 24 heads × 64×64, 26 token rows, rounded to bf16's 7 bits.
    maps = bitround_(write_probe.synthetic_maps(24, 26, 64 * 64), 7)
    shape = (1, 1, 24, 26, 64, 64)  # step, layer, head, token, y, x
    objects: dict = {}
    array = zarr.create_array(MemoryStore(objects), shape=shape, **fmt.attention_encoding(shape))
    array[0, 0] = maps.numpy().reshape(shape[2:])
    stored = sum(len(v.to_bytes()) for k, v in objects.items() if not k.endswith("zarr.json"))
    # Against docs/benchmarks.md's figure for a real recording's chunks at keepbits 7.
    assert stored / maps.numel() == pytest.approx(MEASURED_BYTES_PER_VALUE[7], rel=0.10)


@pytest.mark.cuda
def test_on_a_gpu_the_maps_are_made_and_rounded_there(tmp_path, seen):
    rate = write_probe.writer_rate(
        tmp_path, directions=DIRECTIONS, keepbits=7, device="cuda", **SHAPE
    )
    assert rate > 0 and list(tmp_path.iterdir()) == []
    assert {m.device.type for s in seen for _, _, maps in s["puts"] for m in maps.values()} == {
        "cuda"
    }
