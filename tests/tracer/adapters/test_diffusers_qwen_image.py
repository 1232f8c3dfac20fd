"""diffusers Qwen-Image: templated text, unpadded per prompt, masked per sample in a batch."""

from __future__ import annotations

import family_kit
import numpy as np
import pytest
import torch
from references import SdpaLog, assert_rows_match_float64

import analysis
import tracer
from tracer.demo_qwen_image import demo_qwen_image_pipeline

PROMPT = family_kit.PROMPT
SHORT = "a dog"  # shorter than PROMPT: in a batch after it, its text is padded and masked
GRID = (6, 8)  # 96 x 128 pixels: VAE factor 8, 2x2 packing


@pytest.fixture(scope="module")
def pipe():
    return demo_qwen_image_pipeline(seed=0)


def generate(pipe, prompt=PROMPT, seed=0, **kwargs):
    kwargs = {"true_cfg_scale": 1.0} | kwargs
    return family_kit.generate(pipe, prompt=prompt, text_len=512, grid=GRID, seed=seed, **kwargs)


def kept_tokens(pipe, prompt):
    """The text tokens the pipeline keeps of `prompt`, by the tokenizer alone: the templated
    prompt's tokens after the dropped prefix."""
    ids = pipe.tokenizer(pipe.prompt_template_encode.format(prompt))["input_ids"]
    return pipe.tokenizer.convert_ids_to_tokens(ids[pipe.prompt_template_encode_start_idx :])


def test_store_equals_float64_softmax_under_the_per_sample_mask(pipe, tmp_path, monkeypatch):
    # The recorded prompt is the batch's shorter one, so its padding is masked out.
    text_len, short_len = len(kept_tokens(pipe, PROMPT)), len(kept_tokens(pipe, SHORT))
    n_image = GRID[0] * GRID[1]
    log = SdpaLog(text_len + n_image)
    log.install(monkeypatch)
    path = tmp_path / "qwen.zarr"
    with tracer.trace(pipe, path, progress=False) as rec:
        generate(pipe, prompt=[SHORT, PROMPT])
    ds = analysis.open_trace(path, rec.last_run)
    assert ds.attrs["pipeline"] == "QwenImagePipeline"
    assert ds.txt2img_tokens.shape[:3] == (3, len(pipe.transformer.transformer_blocks), 4)
    assert ds.txt2img_tokens.shape[-2:] == GRID
    assert all(mask is not None and mask.dtype == torch.bool for _, _, mask, _ in log.calls)
    assert_rows_match_float64(ds, log.calls, range(text_len), range(text_len, text_len + n_image))
    # Every masked text position gets exactly no attention from any image token.
    padding = ds.sel(token=short_len)
    assert bool(padding.token_padding) and int(padding.token_count) == text_len - short_len
    assert not np.any(padding.img2txt_tokens.values)
    assert np.all(ds.img2txt_tokens.sel(token=slice(0, short_len - 1)).values > 0)


def test_the_template_tokens_kept_are_rows_and_words_are_the_prompts(pipe, tmp_path):
    path = tmp_path / "qwen.zarr"
    with tracer.trace(pipe, path, progress=False) as rec:
        generate(pipe)
    ds = analysis.open_trace(path, rec.last_run)
    kept = kept_tokens(pipe, PROMPT)
    assert ds.token_text.values.tolist() == kept
    assert not ds.token_padding.values.any()
    assert ds.attrs["prompt_template_dropped_tokens"] == pipe.prompt_template_encode_start_idx
    # The prompt's own tokens lead; the template's closing tokens are kept but are no word.
    cat, red, chair = (kept.index(t) for t in ("Ġcat", "Ġred", "Ġchair"))
    assert ds.attrs["spans"]["cat"] == [cat]
    phrase = analysis.open_trace(path, rec.last_run, spans=["red chair"])
    assert phrase.attrs["spans"]["red chair"] == [red, chair]
    assert kept[-1] == "Ċ" and "<|im_end|>" in kept
    assert ds.attrs["spans"]["prompt"] == list(range(kept.index("<|im_end|>")))


def test_output_is_bit_for_bit_unchanged_with_true_cfg(pipe, tmp_path):
    guided = {"negative_prompt": "blurry", "true_cfg_scale": 4.0}
    plain = generate(pipe, seed=3, **guided).images
    with tracer.trace(pipe, tmp_path / "t.zarr", progress=False) as rec:
        traced = generate(pipe, seed=3, **guided).images
    assert np.array_equal(plain, traced)
    ds = analysis.open_trace(tmp_path / "t.zarr", rec.last_run)
    assert ds.token_text.values.tolist() == kept_tokens(pipe, PROMPT)  # the positive prompt's
