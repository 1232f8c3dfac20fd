"""diffusers CogView4: GLM text left-padded to a multiple of 16, then the image tokens."""

from __future__ import annotations

import family_kit
import numpy as np
import pytest
from references import SdpaLog, assert_rows_match_float64

import analysis
import tracer
from tracer.demo_cogview4 import demo_cogview4_pipeline

PROMPT = family_kit.PROMPT
GRID = (6, 8)  # 96 x 128 pixels: VAE factor 8, 2x2 patches


@pytest.fixture(scope="module")
def pipe():
    return demo_cogview4_pipeline(seed=0)


def generate(pipe, seed=0, **kwargs):
    return family_kit.generate(pipe, text_len=1024, grid=GRID, seed=seed, **kwargs)


def test_store_equals_float64_softmax_for_every_step_layer_head(pipe, tmp_path, monkeypatch):
    tokens = len(pipe.tokenizer(PROMPT)["input_ids"])
    text_len = -(-tokens // 16) * 16
    n_image = GRID[0] * GRID[1]
    log = SdpaLog(text_len + n_image)
    log.install(monkeypatch)
    path = tmp_path / "cogview4.zarr"
    with tracer.trace(pipe, path, progress=False) as rec:
        generate(pipe, guidance_scale=4.0, negative_prompt="blurry")
    ds = analysis.open_trace(path, rec.last_run)
    assert ds.attrs["pipeline"] == "CogView4Pipeline" and ds.attrs["text_len"] == text_len
    assert ds.txt2img_tokens.shape[:3] == (3, 2, 4) and ds.txt2img_tokens.shape[-2:] == GRID
    # Each step runs the prompt's call, then the negative prompt's (its text padded to the same
    # 16 tokens): the first of each pair of calls is the recorded one.
    layers = ds.sizes["layer"]
    assert len(log.calls) == 2 * ds.sizes["step"] * layers
    recorded = [call for i, call in enumerate(log.calls) if (i // layers) % 2 == 0]
    assert_rows_match_float64(ds, recorded, range(text_len), range(text_len, text_len + n_image))


def test_the_left_padding_is_one_row_before_the_prompt(pipe, tmp_path):
    path = tmp_path / "cogview4.zarr"
    with tracer.trace(pipe, path, progress=False) as rec:
        generate(pipe, guidance_scale=1.0)
    ds = analysis.open_trace(path, rec.last_run)
    ids = pipe.tokenizer(PROMPT)["input_ids"]
    tokens = pipe.tokenizer.convert_ids_to_tokens(ids)
    pad = (-len(ids)) % 16
    first = ds.isel(token=0)
    assert bool(first.token_padding) and int(first.token_count) == pad and int(first.token) == 0
    assert ds.token_text.values.tolist()[1:] == tokens
    assert ds.attrs["spans"]["cat"] == [pad + tokens.index("Ġcat")]


def test_output_is_bit_for_bit_unchanged_with_guidance(pipe, tmp_path):
    plain = generate(pipe, seed=9, guidance_scale=4.0).images
    with tracer.trace(pipe, tmp_path / "t.zarr", progress=False):
        traced = generate(pipe, seed=9, guidance_scale=4.0).images
    assert np.array_equal(plain, traced)
