"""diffusers Lumina2: the text's real tokens (system prompt, then the prompt), then the image."""

from __future__ import annotations

import family_kit
import numpy as np
import pytest
from references import SdpaLog, assert_rows_match_float64

import analysis
import tracer
from tracer.demo_lumina2 import demo_lumina2_pipeline

PROMPT = family_kit.PROMPT
LONGER = "a photo of a dog sitting on the grass in the park"  # in a batch after PROMPT: longer
GRID = (6, 8)  # 96 x 128 pixels: VAE factor 8, 2x2 patches
TEXT_LEN = 256


@pytest.fixture(scope="module")
def pipe():
    return demo_lumina2_pipeline(seed=0)


def generate(pipe, seed=0, **kwargs):
    return family_kit.generate(pipe, text_len=TEXT_LEN, grid=GRID, seed=seed, **kwargs)


def real_tokens(pipe, prompt):
    """The tokens the pipeline's tokenizer gives its system prompt and `prompt`, less padding."""
    text = pipe.system_prompt + " <Prompt Start> " + prompt
    return pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer(text)["input_ids"])


def test_store_equals_float64_softmax_in_a_masked_batch(pipe, tmp_path, monkeypatch):
    # The recorded prompt is the batch's shorter one: the joint sequence's tail is masked for it.
    text_len, longer = len(real_tokens(pipe, PROMPT)), len(real_tokens(pipe, LONGER))
    n_image = GRID[0] * GRID[1]
    log = SdpaLog(longer + n_image)
    log.install(monkeypatch)
    path = tmp_path / "lumina2.zarr"
    with tracer.trace(pipe, path, progress=False) as rec:
        generate(pipe, prompt=[PROMPT, LONGER], guidance_scale=1.0)
    ds = analysis.open_trace(path, rec.last_run)
    assert ds.attrs["pipeline"] == "Lumina2Pipeline" and ds.attrs["text_len"] == text_len
    assert ds.txt2img_tokens.shape[:3] == (3, 2, 4) and ds.txt2img_tokens.shape[-2:] == GRID
    assert all(mask is not None for _, _, mask, _ in log.calls)
    assert_rows_match_float64(ds, log.calls, range(text_len), range(text_len, text_len + n_image))


def test_text_rows_are_the_system_prompt_and_prompt_tokens(pipe, tmp_path):
    path = tmp_path / "lumina2.zarr"
    with tracer.trace(pipe, path, progress=False) as rec:
        generate(pipe, guidance_scale=1.0)
    ds = analysis.open_trace(path, rec.last_run)
    tokens = real_tokens(pipe, PROMPT)
    assert ds.token_text.values.tolist() == tokens and not ds.token_padding.values.any()
    assert ds.attrs["spans"]["cat"] == [tokens.index("▁cat")]
    assert ds.attrs["spans"]["prompt"] == list(
        range(tokens.index("▁a", len(tokens) - 6), len(tokens))
    )


def test_output_is_bit_for_bit_unchanged_with_guidance(pipe, tmp_path):
    plain = generate(pipe, seed=8, guidance_scale=4.0).images
    with tracer.trace(pipe, tmp_path / "t.zarr", progress=False):
        traced = generate(pipe, seed=8, guidance_scale=4.0).images
    assert np.array_equal(plain, traced)
