"""diffusers Chroma: FLUX's layout with T5 alone and a mask over T5's padding."""

from __future__ import annotations

import family_kit
import numpy as np
import pytest
from references import SdpaLog, assert_rows_match_float64

import analysis
import tracer
from tracer.demo_chroma import demo_chroma_pipeline

TEXT_LEN = 24
PROMPT = family_kit.PROMPT
GRID = (6, 8)  # 96 x 128 pixels: VAE factor 8, 2x2 packing


@pytest.fixture(scope="module")
def pipe():
    return demo_chroma_pipeline(seed=0, max_sequence_length=TEXT_LEN)


def generate(pipe, seed=0, **kwargs):
    return family_kit.generate(pipe, text_len=TEXT_LEN, grid=GRID, seed=seed, **kwargs)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # diffusers' own FluxPosEmbed deprecation
def test_store_equals_float64_softmax_under_the_models_mask(pipe, tmp_path, monkeypatch):
    n_image = GRID[0] * GRID[1]
    log = SdpaLog(TEXT_LEN + n_image)
    log.install(monkeypatch)
    path = tmp_path / "chroma.zarr"
    with tracer.trace(pipe, path, progress=False) as rec:
        generate(pipe, guidance_scale=1.0)
    ds = analysis.open_trace(path, rec.last_run)
    assert ds.attrs["pipeline"] == "ChromaPipeline"
    assert ds.txt2img_tokens.shape[-2:] == GRID
    assert all(mask is not None for _, _, mask, _ in log.calls)
    assert_rows_match_float64(ds, log.calls, range(TEXT_LEN), range(TEXT_LEN, TEXT_LEN + n_image))
    # Chroma means to hide T5's padding but its first token: that token is a row of its own,
    # apart from the summed rest. (diffusers 0.42 hands SDPA that mask as float 0/1, which SDPA
    # adds to the logits instead of masking: the store holds what the model computed.)
    real = sum(pipe.tokenizer(PROMPT)["attention_mask"])
    first_pad, rest = ds.sel(token=real), ds.sel(token=real + 1)
    assert int(first_pad.token_count) == 1 and first_pad.token_text.item() == "<pad>"
    assert not bool(first_pad.token_padding)
    assert int(rest.token_count) == TEXT_LEN - real - 1 and bool(rest.token_padding)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_output_is_bit_for_bit_unchanged_with_guidance(pipe, tmp_path):
    plain = generate(pipe, seed=2, negative_prompt="blurry").images
    with tracer.trace(pipe, tmp_path / "t.zarr", progress=False):
        traced = generate(pipe, seed=2, negative_prompt="blurry").images
    assert np.array_equal(plain, traced)
