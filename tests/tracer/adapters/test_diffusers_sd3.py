"""diffusers SD3: image tokens first, CLIP and T5 text segments, the guided batch's cond half."""

from __future__ import annotations

import family_kit
import numpy as np
import pytest
from diffusers.models.attention_processor import AttnProcessor2_0
from references import SdpaLog, assert_rows_match_float64

import analysis
import tracer
from analysis.errors import UnsupportedModelError
from tracer.demo_sd3 import demo_sd3_pipeline

T5_LEN, CLIP_LEN = 16, 77
TEXT_LEN = CLIP_LEN + T5_LEN
PROMPT = family_kit.PROMPT
GRID = (8, 6)  # 128 x 96 pixels: VAE factor 8, 2x2 patches


@pytest.fixture(scope="module")
def pipe():
    return demo_sd3_pipeline(seed=0, max_sequence_length=T5_LEN)


def generate(pipe, seed=0, **kwargs):
    return family_kit.generate(pipe, text_len=T5_LEN, grid=GRID, seed=seed, **kwargs)


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0], ids=["unguided", "guided batch"])
def test_store_equals_float64_softmax_for_every_step_layer_head(
    pipe, tmp_path, monkeypatch, guidance_scale
):
    n_image = GRID[0] * GRID[1]
    log = SdpaLog(n_image + TEXT_LEN)
    log.install(monkeypatch)
    path = tmp_path / "sd3.zarr"
    with tracer.trace(pipe, path, progress=False) as rec:
        generate(pipe, guidance_scale=guidance_scale)
    ds = analysis.open_trace(path, rec.last_run)
    assert ds.txt2img_tokens.shape[:3] == (3, len(pipe.transformer.transformer_blocks), 4)
    assert ds.txt2img_tokens.shape[-2:] == GRID
    guided = guidance_scale > 1
    assert {q.shape[0] for q, *_ in log.calls} == {2 if guided else 1}
    # Image tokens first; a guided batch is [negative, positive].
    text, image = range(n_image, n_image + TEXT_LEN), range(n_image)
    assert_rows_match_float64(ds, log.calls, text, image, batch=1 if guided else 0)


def test_output_is_bit_for_bit_unchanged(pipe, tmp_path):
    plain = generate(pipe, seed=4).images
    with tracer.trace(pipe, tmp_path / "t.zarr", progress=False):
        traced = generate(pipe, seed=4).images
    assert np.array_equal(plain, traced)


def test_a_word_has_tokens_in_both_segments_and_spans_say_which(pipe, tmp_path):
    path = tmp_path / "sd3.zarr"
    with tracer.trace(pipe, path, progress=False) as rec:
        generate(pipe, guidance_scale=1.0)
    ds = analysis.open_trace(path, rec.last_run, spans=["cat", "clip:cat", "t5:cat"])
    clip_cat = pipe.tokenizer(PROMPT)["input_ids"].index(
        pipe.tokenizer.convert_tokens_to_ids("cat</w>")
    )
    t5_ids = pipe.tokenizer_3(PROMPT)["input_ids"]
    t5_cat = CLIP_LEN + t5_ids.index(pipe.tokenizer_3.convert_tokens_to_ids("▁cat"))
    assert ds.attrs["spans"]["cat"] == [clip_cat, t5_cat]
    assert ds.attrs["segments"] == {"clip": [0, CLIP_LEN], "t5": [CLIP_LEN, TEXT_LEN]}
    token = {int(p): i for i, p in enumerate(ds.token.values)}
    rows = ds.txt2img_tokens.isel(step=0, layer=0, head=0).values
    for name, positions in (("clip:cat", [clip_cat]), ("t5:cat", [t5_cat])):
        np.testing.assert_array_equal(
            ds.txt2img.sel(span=name).isel(step=0, layer=0, head=0).values,
            rows[token[positions[0]]],
        )
    both = rows[[token[clip_cat], token[t5_cat]]].astype(np.float64).mean(0)
    np.testing.assert_allclose(
        ds.txt2img.sel(span="cat").isel(step=0, layer=0, head=0).values, both, rtol=1e-6
    )


def test_another_attention_processor_is_refused_before_the_store_exists(tmp_path):
    pipe = demo_sd3_pipeline(seed=0, max_sequence_length=T5_LEN)
    pipe.transformer.transformer_blocks[1].attn.set_processor(AttnProcessor2_0())
    path = tmp_path / "never.zarr"
    with (
        pytest.raises(
            UnsupportedModelError,
            match=r"transformer_blocks\.1 runs its attention through AttnProcessor2_0",
        ),
        tracer.trace(pipe, path),
    ):
        pass
    assert not path.exists()
