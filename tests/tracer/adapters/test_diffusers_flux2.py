"""diffusers FLUX.2 [klein] and [dev]: chat-templated text, the image, then reference images."""

from __future__ import annotations

import family_kit
import numpy as np
import pytest
from PIL import Image
from references import SdpaLog, assert_rows_match_float64

import analysis
import tracer
from analysis.errors import UnsupportedModelError
from tracer.demo_flux2 import demo_flux2_dev_pipeline, demo_flux2_pipeline

TEXT_LEN = 40
PROMPT = family_kit.PROMPT
GRID = (6, 8)  # 96 x 128 pixels: VAE factor 8, 2x2 patches
REFERENCE = (64, 96)  # a reference image's pixels: 4 x 6 tokens after the generated image's


@pytest.fixture(scope="module")
def pipe():
    return demo_flux2_pipeline(seed=0)


def generate(pipe, seed=0, **kwargs):
    return family_kit.generate(pipe, text_len=TEXT_LEN, grid=GRID, seed=seed, **kwargs)


def reference_image():
    pixels = np.random.default_rng(0).integers(0, 256, (*REFERENCE, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def templated_tokens(pipe, prompt):
    """The prompt in Qwen3's chat template, as the tokenizer alone tokenizes it, unpadded."""
    messages = [{"role": "user", "content": prompt}]
    text = pipe.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    return pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer(text)["input_ids"])


def test_store_equals_float64_softmax_with_reference_image_tokens(pipe, tmp_path, monkeypatch):
    n_image = GRID[0] * GRID[1]
    n_reference = (REFERENCE[0] // 16) * (REFERENCE[1] // 16)
    log = SdpaLog(TEXT_LEN + n_image + n_reference)
    log.install(monkeypatch)
    path = tmp_path / "flux2.zarr"
    with tracer.trace(pipe, path, progress=False) as rec:
        generate(pipe, image=reference_image(), guidance_scale=1.0)
    ds = analysis.open_trace(path, rec.last_run)
    assert ds.attrs["pipeline"] == "Flux2KleinPipeline" and ds.attrs["reference_images"] == 1
    assert ds.txt2img_tokens.shape[:3] == (3, 4, 4)
    assert ds.txt2img_tokens.shape[-2:] == GRID
    assert list(ds.layer_kind.values) == ["double", "double", "single", "single"]
    # The reference tokens take part in every softmax but get no map of their own.
    image = range(TEXT_LEN, TEXT_LEN + n_image)
    assert_rows_match_float64(ds, log.calls, range(TEXT_LEN), image)


def test_template_tokens_are_rows_padding_is_one_and_words_are_the_prompts(pipe, tmp_path):
    path = tmp_path / "flux2.zarr"
    with tracer.trace(pipe, path, progress=False) as rec:
        generate(pipe, guidance_scale=1.0)
    ds = analysis.open_trace(path, rec.last_run)
    tokens = templated_tokens(pipe, PROMPT)
    real = len(tokens)
    assert real < TEXT_LEN
    assert ds.token_text.values.tolist()[:real] == tokens
    padding = ds.sel(token=real)
    assert bool(padding.token_padding) and int(padding.token_count) == TEXT_LEN - real
    assert ds.sizes["token"] == real + 1
    assert ds.attrs["spans"]["cat"] == [tokens.index("Ġcat")]
    assert ds.attrs["spans"]["prompt"] == list(range(tokens.index("a"), tokens.index("Ġchair") + 1))
    assert "<think>" in tokens and "<|im_end|>" in tokens  # template tokens: rows, no word


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_output_is_bit_for_bit_unchanged_with_guidance(pipe, tmp_path):
    plain = generate(pipe, seed=5, guidance_scale=4.0).images
    with tracer.trace(pipe, tmp_path / "t.zarr", progress=False):
        traced = generate(pipe, seed=5, guidance_scale=4.0).images
    assert np.array_equal(plain, traced)


def test_kv_cached_reference_attention_is_refused_before_a_store_exists(pipe, tmp_path):
    from diffusers import Flux2KleinKVPipeline

    kv = Flux2KleinKVPipeline(**pipe.components)
    path = tmp_path / "kv.zarr"
    with (
        pytest.raises(UnsupportedModelError, match="not Flux2KleinKVPipeline"),
        tracer.trace(kv, path, progress=False),
    ):
        pass
    assert not path.exists()


# FLUX.2 [dev]: Mistral 3 through a Pixtral processor, the system message before the prompt.
DEV_TEXT_LEN = 512  # the demo tokenizer spells the system message in ~120 tokens


@pytest.fixture(scope="module")
def dev():
    return demo_flux2_dev_pipeline(seed=0)


def dev_tokens(pipe, prompt):
    """The tokens the pipeline's own processor call gives `prompt` (the independent reference)."""
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input

    messages = format_input(prompts=[prompt], system_message=pipe.system_message)
    encoded = pipe.tokenizer.apply_chat_template(
        messages,
        add_generation_prompt=False,
        tokenize=True,
        return_dict=True,
        padding="max_length",
        truncation=True,
        max_length=DEV_TEXT_LEN,
    )
    return pipe.tokenizer.tokenizer.convert_ids_to_tokens(encoded["input_ids"][0])


def test_dev_stores_the_processors_tokens_and_equals_float64_softmax(dev, tmp_path, monkeypatch):
    n_image = GRID[0] * GRID[1]
    log = SdpaLog(DEV_TEXT_LEN + n_image)
    log.install(monkeypatch)
    path = tmp_path / "flux2-dev.zarr"
    with tracer.trace(dev, path, progress=False) as rec:
        family_kit.generate(dev, text_len=DEV_TEXT_LEN, grid=GRID)
    ds = analysis.open_trace(path, rec.last_run)
    assert ds.attrs["pipeline"] == "Flux2Pipeline"
    tokens = dev_tokens(dev, PROMPT)
    real = tokens.index("<pad>")
    assert ds.token_text.values.tolist() == [*tokens[:real], "<pad>"]
    assert int(ds.isel(token=-1).token_count) == DEV_TEXT_LEN - real
    assert ds.attrs["spans"]["cat"] == [tokens.index("Ġcat")]
    assert "[SYSTEM_PROMPT]" in tokens[:2] and tokens[real - 1] == "[/INST]"
    assert_rows_match_float64(
        ds, log.calls, range(DEV_TEXT_LEN), range(DEV_TEXT_LEN, DEV_TEXT_LEN + n_image)
    )


def test_dev_output_is_bit_for_bit_unchanged(dev, tmp_path):
    def run(seed):
        return family_kit.generate(dev, text_len=DEV_TEXT_LEN, grid=GRID, seed=seed).images

    plain = run(3)
    with tracer.trace(dev, tmp_path / "t.zarr", progress=False):
        traced = run(3)
    assert np.array_equal(plain, traced)
