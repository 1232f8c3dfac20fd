"""The tap lives in diffusers' own HookRegistry: the user's hooks keep running, before and after."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from diffusers.hooks import HookRegistry, ModelHook, apply_group_offloading

import analysis
import tracer
from analysis.verify import format_report, verify
from tracer.demo import demo_pipeline
from tracer.tap import HOOK_NAME

TEXT_LEN = 32


@pytest.fixture
def pipe():
    return demo_pipeline(seed=0, max_sequence_length=TEXT_LEN)


def generate(pipe):
    return pipe(
        "a cat on a red chair",
        num_inference_steps=2,
        height=64,
        width=64,
        max_sequence_length=TEXT_LEN,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images


class Counting(ModelHook):
    """A user's hook: counts the forwards it sees."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def pre_forward(self, module, *args, **kwargs):
        self.calls += 1
        return args, kwargs


def test_a_hook_added_during_a_trace_is_still_there_after_it_and_still_runs(pipe, tmp_path):
    attention = pipe.transformer.transformer_blocks[0].attn
    user = Counting()
    with tracer.trace(pipe, tmp_path / "t.zarr", progress=False):
        HookRegistry.check_if_exists_or_initialize(attention).register_hook(user, "user")
        generate(pipe)
    during = user.calls
    assert during == 2  # one conditional branch, two steps
    registry = attention._diffusers_hook
    assert list(registry.hooks) == ["user"]  # the tap's hook is gone, the user's kept
    generate(pipe)
    assert user.calls == 2 * during  # and it still runs


def test_a_hook_added_before_a_trace_runs_during_it_and_stays(pipe, tmp_path):
    attention = pipe.transformer.single_transformer_blocks[1].attn
    user = Counting()
    HookRegistry.check_if_exists_or_initialize(attention).register_hook(user, "user")
    plain = generate(pipe)
    with tracer.trace(pipe, tmp_path / "t.zarr", progress=False) as rec:
        assert HOOK_NAME in attention._diffusers_hook.hooks
        traced = generate(pipe)
    assert np.array_equal(traced, plain)  # bit-identical with the tap in the chain
    assert user.calls == 4
    assert list(attention._diffusers_hook.hooks) == ["user"]
    ds = analysis.open_trace(tmp_path / "t.zarr", rec.last_run)
    assert not np.isnan(ds.txt2img.values).any()


def test_group_offloading_keeps_working_during_a_trace_and_after_it(pipe, tmp_path):
    plain = generate(pipe)
    cpu = torch.device("cpu")
    apply_group_offloading(
        pipe.transformer,
        onload_device=cpu,
        offload_device=cpu,
        offload_type="block_level",
        num_blocks_per_group=1,
    )
    offloaded = dict(pipe.transformer._diffusers_hook.hooks)
    assert offloaded, "group offloading registers its hooks in the transformer's registry"
    with tracer.trace(pipe, tmp_path / "t.zarr", progress=False) as rec:
        traced = generate(pipe)
    assert np.array_equal(traced, plain)
    assert dict(pipe.transformer._diffusers_hook.hooks) == offloaded
    assert np.array_equal(generate(pipe), plain)
    ds = analysis.open_trace(tmp_path / "t.zarr", rec.last_run)
    assert ds.attrs["status"] == "complete"
    assert not np.isnan(ds.img2txt.values).any()


def test_maps_a_cache_hook_skips_are_stored_as_not_computed(pipe, tmp_path):
    # First-block cache with a threshold nothing stays under: from step 1 on, only the first
    # block runs and every later block's output comes from the cache.
    from diffusers.hooks import FirstBlockCacheConfig

    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=1e9))
    plain = generate(pipe)
    path = tmp_path / "cached.zarr"
    with tracer.trace(pipe, path, progress=False) as rec:
        traced = generate(pipe)
    assert np.array_equal(plain, traced)
    names = [f"transformer_blocks.{i}" for i in range(2)]
    names += [f"single_transformer_blocks.{i}" for i in range(3)]
    attrs = dict(zarr.open_group(path, path=rec.last_run, mode="r").attrs)
    assert attrs["status"] == "complete" and attrs["steps_complete"] == [0, 1]
    assert attrs["skipped"] == [[1, name] for name in names[1:]]
    ds = analysis.open_trace(path)
    want = np.array([[True] * 5, [True] + [False] * 4])
    np.testing.assert_array_equal(ds.computed.values, want)
    for direction in ("txt2img", "img2txt"):
        values = ds[direction].values  # step, layer, head, span, y, x
        assert np.isnan(values[1, 1:]).all()
        assert not np.isnan(values[0]).any() and not np.isnan(values[1, 0]).any()
    report = verify(path)
    assert report.ok and not report.findings, format_report(report)
