"""End to end: trace the demo diffusers FLUX pipeline, check the store against float64 math."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from diffusers import FluxPipeline
from references import SdpaLog, stated_bound, stored_rows

import analysis
import tracer
from tracer.demo import demo_pipeline

TEXT_LEN = 32
PROMPT = "a cat on a red chair"


@pytest.fixture(scope="module")
def pipe() -> FluxPipeline:
    return demo_pipeline(seed=0, max_sequence_length=TEXT_LEN)


def generate(pipe, *, seed=0, steps=3, height=128, width=128, **kwargs):
    return pipe(
        kwargs.pop("prompt", PROMPT),
        num_inference_steps=steps,
        height=height,
        width=width,
        max_sequence_length=TEXT_LEN,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        **kwargs,
    )


def reference_maps(q, k, mask, scale, spans, text_len):
    """float64 softmax over all keys, then txt2img, img2txt as docs/store-format.md has them."""
    q, k = q[0].double(), k[0].double()
    logits = torch.einsum("hnd,hmd->hnm", q, k) * scale
    if mask is not None:
        mask = mask[0] if mask.ndim == 4 else mask
        logits = (
            logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
        )
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    txt2img = torch.stack([probs[:, idx, text_len:].mean(1) for idx in spans], dim=1)
    img2txt = torch.stack([probs[:, text_len:, idx].sum(2) for idx in spans], dim=1)
    return {"txt2img": txt2img.numpy(), "img2txt": img2txt.numpy()}


def open_run(path, run):
    return xr.open_zarr(path, group=run, consolidated=False)


def assert_matches_reference(ds, log, layers_per_call, calls_per_step=1):
    bound = stated_bound(ds.attrs)
    rows = stored_rows(ds)
    ny, nx = ds.sizes["y"], ds.sizes["x"]
    for step_pos, step in enumerate(ds.step.values):
        for layer_pos in range(layers_per_call):
            call = (step * calls_per_step) * layers_per_call + layer_pos
            q, k, mask, scale = log.calls[call]
            ref = reference_maps(q, k, mask, scale, rows, TEXT_LEN)
            for name in ("txt2img", "img2txt"):
                stored = ds[name].isel(step=step_pos, layer=layer_pos).values
                expected = ref[name].reshape(stored.shape[0], len(rows), ny, nx)
                np.testing.assert_allclose(stored, expected, rtol=bound + 1e-5, atol=1e-6)


def assert_spans_match_reference(path, run, log, spans, layers_per_call):
    """Spans chosen when reading equal float64 softmax over their own positions."""
    ds = analysis.open_trace(path, run, spans=list(spans))
    bound = stated_bound(ds.attrs)
    ny, nx = ds.sizes["y"], ds.sizes["x"]
    for step_pos, step in enumerate(ds.step.values):
        for layer_pos in range(layers_per_call):
            q, k, mask, scale = log.calls[step * layers_per_call + layer_pos]
            ref = reference_maps(q, k, mask, scale, list(spans.values()), TEXT_LEN)
            for name in ("txt2img", "img2txt"):
                stored = ds[name].isel(step=step_pos, layer=layer_pos).values
                expected = ref[name].reshape(stored.shape[0], len(spans), ny, nx)
                np.testing.assert_allclose(stored, expected, rtol=bound + 1e-5, atol=1e-6)


def test_store_equals_float64_softmax_for_every_layer_step_head(pipe, tmp_path, monkeypatch):
    height, width = 96, 160  # a non-square 6 x 10 token grid
    log = SdpaLog(TEXT_LEN + 6 * 10)
    log.install(monkeypatch)
    path = tmp_path / "cat.zarr"
    with tracer.trace(pipe, path, spans={"cat": "cat", "first8": (0, 8)}, progress=False) as rec:
        generate(pipe, height=height, width=width)
    ds = open_run(path, rec.last_run)
    real = sum(pipe.tokenizer_2(PROMPT)["attention_mask"])  # the prompt's tokens and </s>
    assert ds.txt2img.dims == ("step", "layer", "head", "token", "y", "x")
    # Then the padding, summed, but for the padding token `first8` covers: kept as its own row.
    assert ds.txt2img.shape == (3, 5, 4, real + 2, 6, 10)
    assert list(ds.token_count.values) == [1] * real + [1, TEXT_LEN - real - 1]
    assert list(ds.token_padding.values) == [False] * real + [True, True]
    assert list(ds.attrs["spans"]) == ["prompt", "cat", "first8"]
    assert ds.attrs["spans"]["first8"] == list(range(8))
    assert len(log.calls) == 3 * 5
    assert_matches_reference(ds, log, layers_per_call=5)
    # Any span, chosen after the fact: a phrase, a range with padding, the whole text.
    chair = [i for i, t in enumerate(ds.token_text.values) if "chair" in t]
    red = [i for i, t in enumerate(ds.token_text.values) if "red" in t]
    spans = {
        "red chair": sorted(red + chair),
        f"3:{TEXT_LEN}": list(range(3, TEXT_LEN)),
        "prompt": ds.attrs["spans"]["prompt"],
    }
    assert_spans_match_reference(path, rec.last_run, log, spans, layers_per_call=5)


def test_a_bf16_model_keeps_bf16s_precision_unless_asked_for_more(tmp_path):
    """bf16's 7 mantissa bits by default (its attention kernel rounds its probabilities so), the
    bound stated to match; an explicit keepbits wins."""
    pipe = demo_pipeline(seed=0, max_sequence_length=TEXT_LEN, dtype=torch.bfloat16)
    path = tmp_path / "bf16.zarr"
    with tracer.trace(pipe, path, progress=False) as rec:
        generate(pipe, steps=2, height=64, width=64)
    default = rec.last_run
    with tracer.trace(pipe, path, keepbits=9, progress=False) as rec:
        generate(pipe, steps=2, height=64, width=64)
    for run, keepbits in ((default, 7), (rec.last_run, 9)):
        group = zarr.open_group(path, path=run, mode="r")
        assert group.attrs["error_bound"] == 2.0 ** -(keepbits + 1)
        assert group.attrs["capture"]["keepbits"] == keepbits
        for name in ("txt2img", "img2txt"):
            assert group[name].attrs["keepbits"] == keepbits
            bits = group[name][:].view(np.int32)
            assert not (bits & ((1 << (23 - keepbits)) - 1)).any()  # the rest are zeros
            assert (bits & (1 << (23 - keepbits))).any()  # the last kept bit is used


def test_output_is_bit_for_bit_unchanged(pipe, tmp_path):
    plain = generate(pipe, seed=3).images
    with tracer.trace(pipe, tmp_path / "t.zarr", progress=False):
        traced = generate(pipe, seed=3).images
    assert np.array_equal(plain, traced)


def test_detach_restores_pipeline_even_when_generation_raises(pipe, tmp_path):
    attention = pipe.transformer.transformer_blocks[0].attn
    hooks_before = dict(pipe.transformer._forward_pre_hooks)

    def explode(*args, **kwargs):
        raise RuntimeError("boom at step end")

    path = tmp_path / "fail.zarr"
    with (
        pytest.raises(RuntimeError, match="boom"),
        tracer.trace(pipe, path, progress=False) as rec,
    ):
        generate(pipe, callback_on_step_end=explode)
    assert type(pipe) is FluxPipeline
    assert "forward" not in attention.__dict__
    assert dict(pipe.transformer._forward_pre_hooks) == hooks_before
    ds = open_run(path, rec.last_run)
    assert ds.attrs["status"].startswith("failed: RuntimeError: boom")
    assert ds.attrs["steps_complete"] == [0]  # step 0 was written before the callback raised
    assert not np.isnan(ds.txt2img.sel(step=0).values).any()
    assert np.isnan(ds.txt2img.sel(step=1).values).all()


def test_run_metadata_image_and_default_spans(pipe, tmp_path):
    path = tmp_path / "meta.zarr"
    with tracer.trace(pipe, path, progress=False) as rec:
        out = generate(pipe, seed=7, prompt="A red cat, a red chair")
    ds = open_run(path, rec.last_run)
    assert ds.attrs["status"] == "complete"
    assert ds.attrs["steps_complete"] == [0, 1, 2]
    assert ds.attrs["seed"] == 7
    assert ds.attrs["prompt"] == "A red cat, a red chair"
    assert list(ds.attrs["spans"]) == ["prompt", "a", "red", "cat", "chair"]
    # Word spans cover every occurrence of the word, found through the tokenizer's offsets.
    encoded = pipe.tokenizer_2("A red cat, a red chair", return_offsets_mapping=True)
    red_chars = set(range(2, 5)) | set(range(13, 16))
    red = [i for i, (s, e) in enumerate(encoded["offset_mapping"]) if red_chars & set(range(s, e))]
    assert ds.attrs["spans"]["red"] == red and len(red) >= 2
    # No padding or special token is averaged into a default span.
    real = [i for i, m in enumerate(encoded["attention_mask"]) if m]
    assert set(ds.attrs["spans"]["prompt"]) <= set(real[:-1])  # the last real token is </s>
    assert ds.layer.values[0] == "transformer_blocks.0"
    assert ds.layer.values[-1] == "single_transformer_blocks.2"
    assert list(ds.layer_kind.values) == ["double"] * 2 + ["single"] * 3
    assert ds.timestep.shape == (3,) and ds.sigma.shape == (3,)
    expected = (out.images[0] * 255).round().astype(np.uint8)
    assert np.array_equal(ds.image.values, expected)


def test_narrowing_layers_heads_steps_directions(pipe, tmp_path):
    path = tmp_path / "narrow.zarr"
    with tracer.trace(
        pipe,
        path,
        layers=["single_transformer_blocks.*", "transformer_blocks.1"],
        heads=[1, 3],
        steps=[0, 2],
        directions=["img2txt"],
        spans={"chair": "chair"},
        progress=False,
    ) as rec:
        generate(pipe)
    ds = open_run(path, rec.last_run)
    assert set(ds.data_vars) == {"img2txt", "image"}
    assert list(ds.layer.values) == [
        "transformer_blocks.1",
        "single_transformer_blocks.0",
        "single_transformer_blocks.1",
        "single_transformer_blocks.2",
    ]
    assert list(ds["head"].values) == [1, 3]
    assert list(ds.step.values) == [0, 2]
    assert ds.attrs["steps_complete"] == [0, 2]
    assert not np.isnan(ds.img2txt.values).any()


def test_true_cfg_records_the_conditional_branch(pipe, tmp_path, monkeypatch):
    log = SdpaLog(TEXT_LEN + 8 * 8)
    log.install(monkeypatch)
    path = tmp_path / "cfg.zarr"
    with tracer.trace(pipe, path, progress=False) as rec:
        generate(pipe, steps=2, true_cfg_scale=2.0, negative_prompt="blurry")
    assert len(log.calls) == 2 * 2 * 5  # two denoiser calls per step
    ds = open_run(path, rec.last_run)
    assert ds.branch.item() == "cond"
    assert_matches_reference(ds, log, layers_per_call=5, calls_per_step=2)


def test_each_generation_appends_a_run(pipe, tmp_path):
    path = tmp_path / "sweep.zarr"
    with tracer.trace(pipe, path, steps=[0], progress=False) as rec:
        generate(pipe, steps=2, prompt="a cat")
        generate(pipe, steps=2, prompt="a dog")
    assert rec.runs == ["run-0000", "run-0001"]
    tree = xr.open_datatree(path, engine="zarr", consolidated=False)
    assert tree["run-0001"].attrs["prompt"] == "a dog"
    assert list(tree["run-0000"].attrs["spans"]) == ["prompt", "a", "cat"]


@pytest.mark.parametrize(
    ("spans", "message"),
    [
        ({"dog": "dog"}, "'dog' matches no word of the prompt"),
        ({"far": (30, 40)}, r"token range \(30, 40\) is out of range"),
        ({"odd": 3.5}, "neither a word of the prompt"),
    ],
)
def test_bad_spans_fail_before_generation(pipe, tmp_path, spans, message):
    path = tmp_path / "bad.zarr"
    calls = []
    hook = pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=message), tracer.trace(pipe, path, spans=spans):
            generate(pipe)
    finally:
        hook.remove()
    assert calls == []
    assert list(xr.open_datatree(path, engine="zarr", consolidated=False).children) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layers": ["blocks.99"]}, "unknown layer 'blocks.99'; this trace has layer"),
        ({"heads": [4]}, r"head 4 is out of range: head must be in 0\.\.3"),
        ({"heads": "2:9"}, r"head '2:9' is out of range: head must be in 0\.\.3"),
        ({"directions": ["sideways"]}, r"directions must name each of .*\['sideways'\] unknown"),
        ({"keepbits": 40}, "keepbits must be an integer in 1..23"),
        ({"chunk_size": 0}, "chunk_size must be a positive integer"),
        ({"fsync": "no"}, "fsync must be True or False, got 'no'"),
    ],
)
def test_bad_options_are_refused_at_attach(pipe, tmp_path, kwargs, message):
    with (
        pytest.raises(ValueError, match=message),
        tracer.trace(pipe, tmp_path / "x.zarr", **kwargs),
    ):
        pass
    assert type(pipe) is FluxPipeline


def test_fsync_off_records_the_same_steps_and_syncs_nothing(pipe, tmp_path, monkeypatch):
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(descriptor: int) -> None:
        synced.append(descriptor)
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    with tracer.trace(pipe, tmp_path / "synced.zarr", progress=False) as rec:
        generate(pipe, steps=2)
    assert synced, "a default recording syncs its steps"
    synced.clear()
    with tracer.trace(pipe, tmp_path / "unsynced.zarr", progress=False, fsync=False) as rec:
        generate(pipe, steps=2)
    assert synced == []
    unsynced = open_run(tmp_path / "unsynced.zarr", rec.last_run)
    assert unsynced.attrs["steps_complete"] == [0, 1]
    # Plain xarray reads both stores: the same maps and coordinates (attributes differ: the time
    # each run was created).
    xr.testing.assert_equal(
        unsynced[["txt2img", "img2txt"]],
        open_run(tmp_path / "synced.zarr", rec.last_run)[["txt2img", "img2txt"]],
    )


def test_a_run_missing_one_asked_direction_reads_as_being_laid_down(pipe, tmp_path):
    # xarray lays a run's arrays down in no fixed order: a kill can leave img2txt but no txt2img.
    path = tmp_path / "half.zarr"
    with tracer.trace(pipe, path, progress=False) as rec:
        generate(pipe, steps=2)
    shutil.rmtree(path / rec.last_run / "txt2img")
    zarr.open_group(path, path=rec.last_run, mode="r+").attrs.update(
        {"status": "recording", "steps_complete": []}
    )
    with pytest.raises(analysis.FormatError, match=r"\(txt2img\).*being laid down"):
        analysis.open_trace(path, complete_only=False)


def test_every_array_the_tracer_writes_carries_a_checksum(pipe, tmp_path):
    # Read as plain JSON: the codecs each array's zarr.json names, shard index codecs included.
    import json

    path = tmp_path / "sums.zarr"
    with tracer.trace(pipe, path, progress=False) as rec:
        generate(pipe, steps=1)
    metas = sorted((path / rec.last_run).glob("*/zarr.json"))
    names = {meta.parent.name for meta in metas}
    assert {"txt2img", "img2txt", "image", "step", "timestep", "token", "token_text"} <= names

    def names_of(codecs):
        for codec in codecs:
            yield codec["name"]
            config = codec.get("configuration", {})
            yield from names_of(config.get("codecs", []))
            yield from names_of(config.get("index_codecs", []))

    for meta in metas:
        codecs = list(names_of(json.loads(meta.read_text())["codecs"]))
        assert "crc32c" in codecs, (meta.parent.name, codecs)
