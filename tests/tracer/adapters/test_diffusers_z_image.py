"""diffusers Z-Image: image tokens first, then chat-templated Qwen3 text, each padded to 32."""

from __future__ import annotations

import family_kit
import numpy as np
import pytest
from references import SdpaLog, assert_rows_match_float64

import analysis
import tracer
from tracer.demo_z_image import demo_z_image_pipeline

PROMPT = family_kit.PROMPT
NEGATIVE = "a blurry photo of a dog sitting on the grass in the park at night"
GRID = (6, 8)  # 96 x 128 pixels: VAE factor 8, 2x2 patches
UNGUIDED = {"guidance_scale": 0.0}  # Z-Image guides whenever the scale is above 0
MULTIPLE = 32  # Z-Image pads the image part and the text part each to a multiple of 32


def padded(n):
    return -(-n // MULTIPLE) * MULTIPLE


@pytest.fixture(scope="module")
def pipe():
    return demo_z_image_pipeline(seed=0)


def generate(pipe, seed=0, **kwargs):
    return family_kit.generate(pipe, text_len=512, grid=GRID, seed=seed, **kwargs)


def templated_tokens(pipe, prompt):
    """The prompt in Qwen3's chat template (thinking on), as the tokenizer alone tokenizes it."""
    messages = [{"role": "user", "content": prompt}]
    text = pipe.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    return pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer(text)["input_ids"])


@pytest.mark.parametrize("guided", [False, True], ids=["unguided", "guided batch"])
def test_store_equals_float64_softmax_for_every_step_layer_head(
    pipe, tmp_path, monkeypatch, guided
):
    n_image, text_len = GRID[0] * GRID[1], padded(len(templated_tokens(pipe, PROMPT)))
    image_part = padded(n_image)
    # Guided, the negative prompt is longer: the batch is padded to it, and the recorded
    # (positive) sample's tail is masked out.
    longest = max(text_len, padded(len(templated_tokens(pipe, NEGATIVE)))) if guided else text_len
    log = SdpaLog(image_part + longest)
    log.install(monkeypatch)
    path = tmp_path / "z.zarr"
    kwargs = {"guidance_scale": 4.0, "negative_prompt": NEGATIVE} if guided else UNGUIDED
    with tracer.trace(pipe, path, progress=False) as rec:
        generate(pipe, **kwargs)
    ds = analysis.open_trace(path, rec.last_run)
    assert ds.attrs["pipeline"] == "ZImagePipeline"
    assert ds.txt2img_tokens.shape[:3] == (3, 2, 4) and ds.txt2img_tokens.shape[-2:] == GRID
    assert ds.attrs["text_len"] == text_len
    assert {q.shape[0] for q, *_ in log.calls} == {2 if guided else 1}
    if guided:
        assert all(mask is not None for _, _, mask, _ in log.calls)
    text = range(image_part, image_part + text_len)
    assert_rows_match_float64(ds, log.calls, text, range(n_image))


def test_text_rows_are_the_templated_prompt_then_its_padding(pipe, tmp_path):
    path = tmp_path / "z.zarr"
    with tracer.trace(pipe, path, progress=False) as rec:
        generate(pipe, **UNGUIDED)
    ds = analysis.open_trace(path, rec.last_run)
    tokens = templated_tokens(pipe, PROMPT)
    assert ds.token_text.values.tolist()[: len(tokens)] == tokens
    padding = ds.isel(token=-1)
    assert bool(padding.token_padding)
    assert int(padding.token_count) == padded(len(tokens)) - len(tokens)
    assert ds.attrs["spans"]["cat"] == [tokens.index("Ġcat")]


def test_output_is_bit_for_bit_unchanged_with_guidance(pipe, tmp_path):
    plain = generate(pipe, seed=7, negative_prompt=NEGATIVE).images
    with tracer.trace(pipe, tmp_path / "t.zarr", progress=False):
        traced = generate(pipe, seed=7, negative_prompt=NEGATIVE).images
    assert np.array_equal(plain, traced)
