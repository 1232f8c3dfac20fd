"""diffusers HiDream-I1: image tokens first (a non-square image's padded to the model's maximum),
then T5's and Llama's tokens twice, the guided batch's cond half."""

from __future__ import annotations

import family_kit
import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from references import SdpaLog, assert_rows_match_float64

import analysis
import tracer
from analysis.errors import UnsupportedModelError
from tracer.demo_hidream import demo_hidream_pipeline

TEXT_LEN = 16  # T5's and Llama's each
JOINT_TEXT = 3 * TEXT_LEN  # T5, Llama's last listed layer, the block's own Llama layer
PROMPT = family_kit.PROMPT
SQUARE = (8, 8)  # 128 x 128 pixels, the demo's area: VAE factor 8, 2x2 patches
NON_SQUARE = (9, 6)  # 144 x 96 pixels, the same area as the pipeline rescales to
MAX_SEQ = 32 * 32  # the demo's max_resolution (64, 64) in 2x2 patches


@pytest.fixture(scope="module")
def pipe():
    return demo_hidream_pipeline(seed=0, max_sequence_length=TEXT_LEN)


def generate(pipe, grid=SQUARE, seed=0, **kwargs):
    return family_kit.generate(pipe, text_len=TEXT_LEN, grid=grid, seed=seed, **kwargs)


@pytest.mark.parametrize(
    ("grid", "guidance_scale"),
    [(SQUARE, 1.0), (SQUARE, 5.0), (NON_SQUARE, 5.0)],
    ids=["square unguided", "square guided batch", "non-square guided batch"],
)
def test_store_equals_float64_softmax_for_every_step_layer_head(
    pipe, tmp_path, monkeypatch, grid, guidance_scale
):
    n_image = grid[0] * grid[1]
    # A non-square image's tokens are padded to MAX_SEQ, and the text comes after the padding.
    image_len = n_image if grid[0] == grid[1] else MAX_SEQ
    log = SdpaLog(image_len + JOINT_TEXT)
    log.install(monkeypatch)
    path = tmp_path / "hidream.zarr"
    with tracer.trace(pipe, path, progress=False) as rec:
        generate(pipe, grid=grid, guidance_scale=guidance_scale)
    ds = analysis.open_trace(path, rec.last_run)
    blocks = len(pipe.transformer.double_stream_blocks) + len(pipe.transformer.single_stream_blocks)
    assert ds.txt2img_tokens.shape[:3] == (3, blocks, 4)
    assert ds.txt2img_tokens.shape[-2:] == grid
    assert list(ds.layer.values[:2]) == ["double_stream_blocks.0", "double_stream_blocks.1"]
    assert list(ds.layer_kind.values) == ["double", "double", "single", "single"]
    assert (ds.attrs["height"], ds.attrs["width"]) == (grid[0] * 16, grid[1] * 16)
    guided = guidance_scale > 1
    assert {q.shape[0] for q, *_ in log.calls} == {2 if guided else 1}
    text, image = range(image_len, image_len + JOINT_TEXT), range(n_image)
    assert_rows_match_float64(ds, log.calls, text, image, batch=1 if guided else 0)


def test_output_is_bit_for_bit_unchanged(pipe, tmp_path):
    plain = generate(pipe, seed=4).images
    with tracer.trace(pipe, tmp_path / "t.zarr", progress=False):
        traced = generate(pipe, seed=4).images
    assert np.array_equal(plain, traced)


def test_a_word_has_tokens_in_all_three_segments_and_spans_say_which(pipe, tmp_path):
    path = tmp_path / "hidream.zarr"
    with tracer.trace(pipe, path, progress=False) as rec:
        generate(pipe, guidance_scale=1.0)
    names = ["cat", "t5:cat", "llama:cat", "llama_layer:cat"]
    ds = analysis.open_trace(path, rec.last_run, spans=names)
    t5_cat = pipe.tokenizer_3(PROMPT)["input_ids"].index(
        pipe.tokenizer_3.convert_tokens_to_ids("▁cat")
    )
    llama_ids = pipe.tokenizer_4(PROMPT)["input_ids"]
    assert llama_ids[0] == pipe.tokenizer_4.bos_token_id  # Llama's BOS leads: not a word's
    llama_cat = llama_ids.index(pipe.tokenizer_4.convert_tokens_to_ids("Ġcat"))
    expected = {
        "t5:cat": t5_cat,
        "llama:cat": TEXT_LEN + llama_cat,
        "llama_layer:cat": 2 * TEXT_LEN + llama_cat,
    }
    assert ds.attrs["spans"]["cat"] == sorted(expected.values())
    assert ds.attrs["segments"] == {
        "t5": [0, TEXT_LEN],
        "llama": [TEXT_LEN, 2 * TEXT_LEN],
        "llama_layer": [2 * TEXT_LEN, 3 * TEXT_LEN],
    }
    token = {int(p): i for i, p in enumerate(ds.token.values)}
    rows = ds.txt2img_tokens.isel(step=0, layer=0, head=0).values
    for name, position in expected.items():
        np.testing.assert_array_equal(
            ds.txt2img.sel(span=name).isel(step=0, layer=0, head=0).values, rows[token[position]]
        )
    # Each Llama segment's padding is one summed row of its own.
    padding = ds.token_padding.values
    assert sorted(ds.token_segment.values[padding]) == ["llama", "llama_layer", "t5"]


def test_latents_patched_by_the_caller_are_refused_by_name(pipe):
    from tracer.adapters.diffusers_hidream import DiffusersHiDream

    patched = {"hidden_states": torch.zeros(1, 64, 64), "hidden_states_masks": torch.ones(1, 64)}
    with pytest.raises(UnsupportedModelError, match=r"shape \[1, 64, 64\], patched by the caller"):
        DiffusersHiDream(pipe).denoiser_call(patched)


def test_another_attention_processor_is_refused_before_the_store_exists(tmp_path):
    pipe = demo_hidream_pipeline(seed=0, max_sequence_length=TEXT_LEN)
    pipe.transformer.single_stream_blocks[0].block.attn1.set_processor(AttnProcessor2_0())
    path = tmp_path / "never.zarr"
    with (
        pytest.raises(
            UnsupportedModelError,
            match=r"single_stream_blocks\.0 runs its attention through AttnProcessor2_0",
        ),
        tracer.trace(pipe, path),
    ):
        pass
    assert not path.exists()
