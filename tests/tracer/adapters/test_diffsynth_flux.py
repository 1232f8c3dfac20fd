"""Tracing a real DiffSynth-Studio FluxImagePipeline (toy sizes) with EliGen regional prompts.

References are independent of the tracer: the test logs the q, k and mask of every SDPA call of
the DiT in an untraced run (its own monkeypatch), recomputes the softmax in float64 and compares
it with the store as plain xarray reads it. The traced run is the same seed, so its attention
inputs are the same (the tests also check that the model's output is bit-for-bit unchanged).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from diffsynth.pipelines.flux_image import FluxImagePipeline, model_fn_flux_image
from references import BF16_BOUND, stated_bound, stored_rows

import analysis
import tracer
from tracer.adapters import UnsupportedModelError, adapter_for
from tracer.adapters.diffsynth_flux import DiffSynthFlux, box_mask
from tracer.demo_diffsynth import DEMO_T5_LENGTH, demo_diffsynth_pipeline

L = DEMO_T5_LENGTH  # T5 tokens per prompt
HEIGHT, WIDTH = 96, 128  # a non-square 6 x 8 token grid
GRID = (6, 8)
N_IMAGE = GRID[0] * GRID[1]
HEADS, HEAD_DIM = 4, 16  # the demo DiT's
N_LAYERS = 4  # 2 double + 2 single blocks
PROMPT = "a cat and a dog on the grass"
ENTITIES = ["a cat", "a dog"]
# (left, top, right, bottom) in pixels: the cat on the left half, the dog bottom right. The dog's
# box is not aligned to the 16-pixel tokens, so tokens it only partly covers are exercised too.
BOXES = [(0, 0, 64, 96), (72, 40, 128, 96)]
SDPA = torch.nn.functional.scaled_dot_product_attention


@pytest.fixture(scope="module")
def pipe() -> FluxImagePipeline:
    return demo_diffsynth_pipeline(seed=0)


def generate(pipe, *, prompt=PROMPT, entities=ENTITIES, boxes=BOXES, steps=3, seed=0, **kwargs):
    if entities:
        kwargs["eligen_entity_prompts"] = list(entities)
        kwargs["eligen_entity_masks"] = [box_mask(HEIGHT, WIDTH, box) for box in boxes]
    return pipe(
        prompt,
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=steps,
        seed=seed,
        t5_sequence_length=L,
        progress_bar_cmd=lambda steps: steps,
        **kwargs,
    )


class SdpaLog:
    """The q, k, mask and scale of every DiT attention call (the test's own interception)."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]] = []

    def install(self, monkeypatch) -> None:
        original = SDPA

        def logged(query, key, value, attn_mask=None, *args, scale=None, **kwargs):
            # The DiT's attentions are the only ones with its heads x head dim (the toy CLIP has
            # 12 heads of 64, the toy T5 heads of 8, the VAE's attention one head).
            if query.ndim == 4 and tuple(query.shape[1:4:2]) == (HEADS, HEAD_DIM):
                s = query.shape[-1] ** -0.5 if scale is None else scale
                mask = None if attn_mask is None else attn_mask.clone()
                self.calls.append((query.clone(), key.clone(), mask, s))
            return original(query, key, value, attn_mask, *args, scale=scale, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", logged)


class LatentLog:
    """The final latents handed to the VAE decoder: the model's output, before any rounding."""

    def __init__(self, pipe) -> None:
        self.latents: list[torch.Tensor] = []
        self.handle = pipe.vae_decoder.register_forward_pre_hook(
            lambda module, args: self.latents.append(args[0].detach().clone())
        )


def float64_probs(q, k, mask, scale) -> torch.Tensor:
    """softmax(q·kᵀ·scale + mask) over all keys in float64, batch element 0: [H, N, N]."""
    logits = torch.einsum("hnd,hmd->hnm", q[0].double(), k[0].double()) * scale
    if mask is not None:
        logits = logits + mask[0].double()  # DiffSynth's EliGen mask: additive, (1, N, N)
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


def reference_maps(probs, spans, text_len):
    txt2img = torch.stack([probs[:, idx, text_len:].mean(1) for idx in spans], dim=1)
    img2txt = torch.stack([probs[:, text_len:, idx].sum(2) for idx in spans], dim=1)
    shape = (probs.shape[0], len(spans), *GRID)
    return {"txt2img": txt2img.reshape(shape).numpy(), "img2txt": img2txt.reshape(shape).numpy()}


def open_run(path, run) -> xr.Dataset:
    return xr.open_zarr(path, group=run, consolidated=False)


@pytest.fixture(scope="module")
def eligen(pipe, tmp_path_factory):
    """One EliGen + CFG generation logged untraced, then the same one traced into a store."""
    monkeypatch = pytest.MonkeyPatch()
    log, plain = SdpaLog(), LatentLog(pipe)
    call = {"cfg_scale": 2.0, "negative_prompt": "blurry"}
    try:
        log.install(monkeypatch)
        plain_image = generate(pipe, **call)
    finally:
        monkeypatch.undo()
        plain.handle.remove()
    path = tmp_path_factory.mktemp("eligen") / "eligen.zarr"
    adapter = DiffSynthFlux(pipe, entity_names=["kitten", "puppy"])
    traced = LatentLog(pipe)
    try:
        with tracer.trace(pipe, path, adapter=adapter, progress=False) as rec:
            traced_image = generate(pipe, **call)
    finally:
        traced.handle.remove()
    return {
        "ds": open_run(path, rec.last_run),
        "spans": analysis.open_trace(path, rec.last_run),
        "log": log,
        "latents": (plain.latents, traced.latents),
        "images": (plain_image, traced_image),
    }


def test_layout_entities_first_then_prompt_then_image(eligen, pipe):
    ds = eligen["ds"]
    assert ds.attrs["status"] == "complete" and ds.attrs["backend"] == "diffsynth"
    assert ds.attrs["text_len"] == 3 * L
    assert list(ds.attrs["spans"])[:3] == ["kitten", "puppy", "prompt"]
    # Three segments of L positions; each its tokens, then its padding summed in one row.
    assert ds.attrs["segments"] == {"kitten": [0, L], "puppy": [L, 2 * L], "prompt": [2 * L, 3 * L]}
    padding = ds.token.values[ds.token_padding.values].tolist()
    assert list(ds.token_segment.values[ds.token_padding.values]) == ["kitten", "puppy", "prompt"]
    assert sum(ds.token_count.values) == 3 * L and len(padding) == 3
    spans = ds.attrs["spans"]
    for name, text, first in (
        ("kitten", "a cat", 0),
        ("puppy", "a dog", L),
        ("prompt", PROMPT, 2 * L),
    ):
        encoded = pipe.tokenizer_2(text, return_special_tokens_mask=True)
        content = [i for i, special in enumerate(encoded["special_tokens_mask"]) if not special]
        assert spans[name] == [first + i for i in content]
        tokens = pipe.tokenizer_2.convert_ids_to_tokens(encoded["input_ids"])
        assert ds.attrs["span_tokens"][name] == [tokens[i] for i in content]
    assert ds.attrs["entity_prompts"] == ENTITIES
    assert list(ds.entity.values) == ["kitten", "puppy"]
    assert ds.entity_mask.dims == ("entity", "y", "x")  # on the token grid, as applied
    assert ds.entity_mask.shape == (2, *GRID)
    assert list(ds.layer.values) == ["blocks.0", "blocks.1", "single_blocks.0", "single_blocks.1"]
    assert list(ds.layer_kind.values) == ["double", "double", "single", "single"]
    assert ds.txt2img.shape == (3, N_LAYERS, HEADS, len(ds.token), *GRID)
    np.testing.assert_array_equal(ds.timestep.values, pipe.scheduler.timesteps.double().numpy())
    np.testing.assert_array_equal(ds.sigma.values, pipe.scheduler.sigmas.double().numpy())


def test_store_equals_float64_softmax_with_the_regional_mask(eligen):
    ds, calls = eligen["ds"], eligen["log"].calls
    text_len = 3 * L
    # DiffSynth runs posi then nega each step; EliGen (and its mask) is on the posi call only.
    assert len(calls) == 3 * 2 * N_LAYERS
    for step in range(3):
        posi = calls[2 * step * N_LAYERS : (2 * step + 1) * N_LAYERS]
        nega = calls[(2 * step + 1) * N_LAYERS : (2 * step + 2) * N_LAYERS]
        assert all(q.shape[2] == text_len + N_IMAGE and m is not None for q, _, m, _ in posi)
        assert all(q.shape[2] == L + N_IMAGE and m is None for q, _, m, _ in nega)
        assert all(torch.isinf(m).any() for _, _, m, _ in posi)  # the regional mask is in force

    bound = stated_bound(ds.attrs)  # the default, lossy store
    views = eligen["spans"]
    for stored_ds, spans in (
        (ds, stored_rows(ds)),
        (views, [ds.attrs["spans"][name] for name in views.span.values]),
    ):
        for step in range(3):
            for layer in range(N_LAYERS):
                q, k, mask, scale = calls[2 * step * N_LAYERS + layer]
                ref = reference_maps(float64_probs(q, k, mask, scale), spans, text_len)
                for name in ("txt2img", "img2txt"):
                    stored = stored_ds[name].isel(step=step, layer=layer).values
                    np.testing.assert_allclose(stored, ref[name], rtol=bound + 1e-5, atol=1e-6)


def test_positions_the_mask_forbids_are_exactly_zero(eligen):
    ds = eligen["ds"]
    inside = ds.entity_mask.values.astype(bool)
    assert inside[0].sum() == 24 and inside[1].sum() == 16  # the dog box covers tokens partly
    # The stored masks are exactly where DiffSynth's attention mask lets each entity look.
    mask = eligen["log"].calls[0][2]
    for e in range(2):
        allowed = torch.isfinite(mask[0, 0, e * L, 3 * L :]).numpy().reshape(GRID)
        np.testing.assert_array_equal(allowed, inside[e])
    for e, name in enumerate(["kitten", "puppy"]):
        for direction in ("txt2img", "img2txt"):
            maps = eligen["spans"][direction].sel(span=name).values  # step, layer, head, y, x
            assert (maps[..., ~inside[e]] == 0.0).all()
            assert (maps[..., inside[e]] > 0.0).all()
    # The global prompt sees the whole image.
    assert (eligen["spans"].txt2img.sel(span="prompt").values > 0.0).all()
    # So every map of an entity has all its mass inside the stored mask, exactly.
    views = eligen["spans"]
    for name in ("kitten", "puppy"):
        for direction in ("txt2img", "img2txt"):
            scores = analysis.mask_agreement(
                views[direction].sel(span=name), views.entity_mask.sel(entity=name)
            ).compute()
            assert (scores.mass_inside.values == 1.0).all()


def test_tracing_leaves_the_model_output_bit_for_bit_unchanged(eligen):
    plain, traced = eligen["latents"]
    assert len(plain) == len(traced) == 1
    assert torch.equal(plain[0], traced[0])
    images = [np.asarray(image) for image in eligen["images"]]
    np.testing.assert_array_equal(images[0], images[1])
    np.testing.assert_array_equal(eligen["ds"].image.values, images[1])


def test_writeup_computation_matches_the_store(pipe, tmp_path, monkeypatch):
    """The write-up's own map, at toy size: one entity, its L prompt tokens (padding included)
    as queries against the image keys, head 0, mean over the queries, reshaped to the grid.
    With FLUX.1's 512 tokens and 1024² images that is queries 0:512, keys 1024:5120, 64x64."""
    log = SdpaLog()
    log.install(monkeypatch)
    generate(pipe, entities=ENTITIES[:1], boxes=BOXES[:1], seed=5)
    monkeypatch.undo()
    path = tmp_path / "writeup.zarr"
    spans = {"first": (0, L)}
    with tracer.trace(pipe, path, spans=spans, progress=False) as rec:
        generate(pipe, entities=ENTITIES[:1], boxes=BOXES[:1], seed=5)
    ds = analysis.open_trace(path, rec.last_run)
    assert list(ds.span.values) == ["entity0", "prompt", "first"]
    # The same positions asked for as a range when reading give the same maps.
    for request in (f"0:{L}", "entity0:all"):  # the write-up's rows: the entity's whole block
        later = analysis.open_trace(path, rec.last_run, spans={"first": request})
        np.testing.assert_array_equal(later.txt2img.values, ds.txt2img.sel(span=["first"]).values)
    assert len(log.calls) == 3 * N_LAYERS
    for i, (q, k, mask, scale) in enumerate(log.calls):
        step, layer = divmod(i, N_LAYERS)
        # As the write-up computes it: softmax over all keys, then slice and average.
        attn = torch.softmax(
            (q[0, 0].double() @ k[0, 0].double().T) * scale + mask[0, 0].double(), dim=-1
        )
        expected = attn[0:L, 2 * L : 2 * L + N_IMAGE].mean(dim=0).reshape(GRID).numpy()
        stored = ds.txt2img.sel(span="first", head=0).isel(step=step, layer=layer).values
        np.testing.assert_allclose(stored, expected, rtol=stated_bound(ds.attrs) + 1e-5, atol=1e-6)


def test_vram_management_offload_keeps_hooks_and_output(tmp_path, monkeypatch):
    from diffsynth.core.vram.layers import AutoWrappedLinear, enable_vram_management
    from diffsynth.models.model_loader import ModelPool

    pipe = demo_diffsynth_pipeline(seed=1)
    # Weights kept in bfloat16 between uses and cast to float32 to compute, as DiffSynth's loader
    # sets it up from a ModelConfig's offload options.
    vram = {
        "offload_dtype": torch.bfloat16,
        "offload_device": "cpu",
        "onload_dtype": torch.bfloat16,
        "onload_device": "cpu",
        "preparing_dtype": torch.float32,
        "preparing_device": "cpu",
        "computation_dtype": torch.float32,
        "computation_device": "cpu",
    }
    for name in ("dit", "text_encoder_1", "text_encoder_2", "vae_decoder"):
        model = getattr(pipe, name)
        module_map = ModelPool().fetch_module_map(
            f"{type(model).__module__}.{type(model).__name__}", vram
        )
        setattr(pipe, name, enable_vram_management(model, module_map, vram_config=vram))
    pipe.vram_management_enabled = pipe.check_vram_management_state()
    assert pipe.vram_management_enabled
    assert isinstance(pipe.dit.blocks[0].attn.a_to_qkv, AutoWrappedLinear)
    # DiffSynth frees the accelerator cache between models; a CPU-only torch has no such call.
    monkeypatch.setattr(torch.cpu, "empty_cache", lambda: None, raising=False)
    # The first run moves every model through onload/offload, rounding fp32 weights to bfloat16
    # on the way: only runs after it compute with the same weights.
    generate(pipe, steps=1)

    plain = LatentLog(pipe)
    generate(pipe, steps=2, cfg_scale=1.5)
    plain.handle.remove()
    traced = LatentLog(pipe)
    with tracer.trace(pipe, tmp_path / "offload.zarr", progress=False) as rec:
        generate(pipe, steps=2, cfg_scale=1.5)
    traced.handle.remove()
    assert torch.equal(plain.latents[0], traced.latents[0])
    assert pipe.dit.blocks[0].attn.a_to_qkv.weight.dtype == torch.bfloat16  # offloaded again
    ds = open_run(tmp_path / "offload.zarr", rec.last_run)
    assert ds.attrs["status"] == "complete" and ds.attrs["vram_management"] is True
    assert ds.attrs["steps_complete"] == [0, 1]
    assert not np.isnan(ds.txt2img.values).any() and not np.isnan(ds.img2txt.values).any()


def test_detach_restores_the_pipeline(pipe, tmp_path):
    block = pipe.dit.single_blocks[0]
    with tracer.trace(pipe, tmp_path / "t.zarr", progress=False) as rec:
        assert isinstance(rec.adapter, DiffSynthFlux)
        assert "model_fn" in pipe.__dict__ and "forward" in block.__dict__
        generate(pipe, entities=None, steps=1)
    assert type(pipe) is FluxImagePipeline
    assert "forward" not in block.__dict__ and "forward" not in pipe.dit.blocks[0].attn.__dict__
    assert pipe.model_fn is model_fn_flux_image
    ds = open_run(tmp_path / "t.zarr", rec.last_run)
    assert next(iter(ds.attrs["spans"])) == "prompt" and ds.attrs["text_len"] == L
    assert "entity_mask" not in ds


def test_a_model_fn_wrapped_during_the_trace_is_kept_and_no_longer_traced(tmp_path):
    pipe = demo_diffsynth_pipeline(seed=0)
    calls = []
    replaced = pytest.warns(UserWarning, match="pipe.model_fn was replaced during the trace")
    with replaced, tracer.trace(pipe, tmp_path / "t.zarr", progress=False) as rec:
        traced = pipe.model_fn

        def theirs(*args, **kwargs):
            calls.append(1)
            return traced(*args, **kwargs)

        pipe.model_fn = theirs
        generate(pipe, entities=None, steps=1)
    assert pipe.model_fn is theirs and len(calls) == 1
    runs = list(rec.runs)
    generate(pipe, entities=None, steps=1)  # after detach: theirs runs, nothing is recorded
    assert len(calls) == 2 and rec.runs == runs
    assert zarr.open_group(tmp_path / "t.zarr", mode="r").attrs  # the store is intact


def test_unsupported_diffsynth_family_names_the_supported_ones(tmp_path):
    from diffsynth.pipelines.qwen_image import QwenImagePipeline

    other = QwenImagePipeline(device="cpu", torch_dtype=torch.float32)
    with pytest.raises(UnsupportedModelError) as error:
        adapter_for(other)
    message = str(error.value)
    assert "QwenImagePipeline" in message
    assert "diffsynth (DiffSynth-Studio FLUX.1 (`FluxImagePipeline` with a `FluxDiT`)" in message
    assert "diffusers" in message
    with pytest.raises(UnsupportedModelError), tracer.trace(other, tmp_path / "no.zarr"):
        pass


def test_unsupported_features_and_bad_entity_names_fail_before_generating(pipe, tmp_path):
    with (
        pytest.raises(ValueError, match=r"tiled=True.*Supported: text-to-image"),
        tracer.trace(pipe, tmp_path / "a.zarr", progress=False),
    ):
        generate(pipe, tiled=True)
    with (
        pytest.raises(ValueError, match="entity_names has 1 names"),
        tracer.trace(
            pipe, tmp_path / "b.zarr", adapter=DiffSynthFlux(pipe, ["cat"]), progress=False
        ),
    ):
        generate(pipe)
    with pytest.raises(ValueError, match="distinct"):
        DiffSynthFlux(pipe, ["prompt", "dog"])
    assert pipe.model_fn is model_fn_flux_image and type(pipe) is FluxImagePipeline


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param("cuda", marks=pytest.mark.cuda),
    ],
)
def test_bfloat16_with_offload_between_models(device, tmp_path, monkeypatch):
    """FLUX's real setting: bfloat16, weights kept on the CPU and moved to the device per model."""
    from diffsynth.core.vram.layers import enable_vram_management
    from diffsynth.models.model_loader import ModelPool

    pipe = demo_diffsynth_pipeline(seed=2, dtype=torch.bfloat16, device=device)
    vram = {
        "offload_dtype": torch.bfloat16,
        "offload_device": "cpu",
        "onload_dtype": torch.bfloat16,
        "onload_device": "cpu",
        "preparing_dtype": torch.bfloat16,
        "preparing_device": device,
        "computation_dtype": torch.bfloat16,
        "computation_device": device,
    }
    for name in ("dit", "text_encoder_1", "text_encoder_2", "vae_decoder"):
        model = getattr(pipe, name).to("cpu")
        module_map = ModelPool().fetch_module_map(
            f"{type(model).__module__}.{type(model).__name__}", vram
        )
        setattr(pipe, name, enable_vram_management(model, module_map, vram_config=vram))
    pipe.vram_management_enabled = pipe.check_vram_management_state()
    monkeypatch.setattr(torch.cpu, "empty_cache", lambda: None, raising=False)
    log = SdpaLog()
    log.install(monkeypatch)
    plain = LatentLog(pipe)
    generate(pipe, cfg_scale=2.0, negative_prompt="blurry")
    plain.handle.remove()
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", SDPA)
    traced = LatentLog(pipe)
    with tracer.trace(pipe, tmp_path / "bf16.zarr", progress=False) as rec:
        generate(pipe, cfg_scale=2.0, negative_prompt="blurry")
    traced.handle.remove()
    assert torch.equal(plain.latents[0], traced.latents[0])
    assert pipe.dit.blocks[0].attn.a_to_qkv.weight.device.type == "cpu"  # offloaded again
    ds = open_run(tmp_path / "bf16.zarr", rec.last_run)
    assert ds.attrs["dtype"] == "bfloat16" and ds.attrs["status"] == "complete"
    # The model saw bfloat16 timesteps; the store has the scheduler's exact ones.
    np.testing.assert_array_equal(ds.timestep.values, pipe.scheduler.timesteps.double().numpy())
    spans = stored_rows(ds)
    for step in range(3):
        for layer in range(N_LAYERS):
            q, k, mask, scale = log.calls[2 * step * N_LAYERS + layer]
            assert q.dtype == torch.bfloat16 and q.device.type == device
            probs = float64_probs(q.cpu(), k.cpu(), mask.cpu(), scale)
            ref = reference_maps(probs, spans, 3 * L)
            for name in ("txt2img", "img2txt"):
                stored = ds[name].isel(step=step, layer=layer).values
                np.testing.assert_allclose(
                    stored, ref[name], rtol=stated_bound(ds.attrs, BF16_BOUND) + 1e-5, atol=1e-6
                )
