"""diffusers HunyuanVideo 1.5: video tokens, then the context (valid tokens first, the masked ones
after), in one joint softmax; a frame axis."""

from __future__ import annotations

import family_kit
import numpy as np
import pytest
from references import SdpaLog, assert_rows_match_float64

import analysis
import tracer
from analysis.errors import UnsupportedModelError
from tracer.demo_hunyuan_video15 import demo_hunyuan_video15_pipeline

NUM_FRAMES = family_kit.VIDEO_FRAMES
GRID = family_kit.VIDEO_GRID
PROMPT = family_kit.PROMPT


@pytest.fixture(scope="module")
def pipe():
    return demo_hunyuan_video15_pipeline(seed=0)


def context_len(pipe):
    return pipe.vision_num_semantic_tokens + pipe.tokenizer_2_max_length + pipe.tokenizer_max_length


def generate(pipe, seed=0, **kwargs):
    return family_kit.generate_video(pipe, seed=seed, **kwargs)


@pytest.mark.parametrize(
    "prompt", [PROMPT, 'a cat holding a sign that says "hi"'], ids=["plain", "quoted text"]
)
def test_store_equals_float64_softmax_for_every_step_layer_head_and_frame(
    pipe, tmp_path, monkeypatch, prompt
):
    n_video, text_len = int(np.prod(GRID)), context_len(pipe)
    log = SdpaLog(n_video + text_len)
    log.install(monkeypatch)
    path = tmp_path / "hunyuan.zarr"
    with tracer.trace(pipe, path, progress=False) as rec:
        generate(pipe, prompt=prompt)
    ds = analysis.open_trace(path, rec.last_run)
    assert ds.attrs["pipeline"] == "HunyuanVideo15Pipeline" and ds.attrs["text_len"] == text_len
    assert ds.txt2img_tokens.dims == ("step", "layer", "head", "token", "frame", "y", "x")
    assert ds.txt2img_tokens.shape[-3:] == GRID
    # The guider runs the prompt's call, then the negative prompt's: the first of each pair.
    layers = ds.sizes["layer"]
    assert len(log.calls) == 2 * ds.sizes["step"] * layers
    recorded = [call for i, call in enumerate(log.calls) if (i // layers) % 2 == 0]
    text, video = range(n_video, n_video + text_len), range(n_video)
    assert_rows_match_float64(ds, recorded, text, video)
    # The masked context is one padding row: no query attends it, and its queries attend nothing.
    masked = ds.isel(token=-1)
    assert bool(masked.token_padding) and str(masked.token_segment.values) == "masked"
    assert not masked.txt2img_tokens.values.any() and not masked.img2txt_tokens.values.any()


def test_rows_are_the_tokens_the_encoders_read_in_the_models_order(pipe, tmp_path):
    read = []
    hook = pipe.text_encoder.register_forward_pre_hook(
        lambda module, args, kwargs: read.append(kwargs["input_ids"]), with_kwargs=True
    )
    try:
        path = tmp_path / "hunyuan.zarr"
        with tracer.trace(pipe, path, progress=False) as rec:
            generate(pipe, prompt='A cat holding a sign that says "hi"')
    finally:
        hook.remove()
    crop = pipe.prompt_template_encode_start_idx
    ids = [i for i in read[0][0, crop:].tolist() if i != pipe.tokenizer.pad_token_id]
    ds = analysis.open_trace(path, rec.last_run)
    segments = ds.token_segment.values.tolist()
    prompt_rows = [t for t, s in zip(ds.token_text.values, segments, strict=True) if s == "prompt"]
    assert prompt_rows == pipe.tokenizer.convert_ids_to_tokens(ids)
    glyph = [t for t, s in zip(ds.token_text.values, segments, strict=True) if s == "glyph"]
    assert "".join(glyph[:-1]) == 'Text "hi". ' and glyph[-1] == "</s>"
    assert segments.index("glyph") < segments.index("prompt")  # ByT5's valid tokens first
    texts = ds.token_text.values.tolist()
    cat = [i for i, (t, s) in enumerate(zip(texts, segments, strict=True)) if t == "Ġcat"]
    assert segments[cat[0]] == "prompt"
    assert ds.attrs["spans"]["cat"] == [int(ds.token.values[cat[0]])]  # the word, in the prompt


def test_output_is_bit_for_bit_unchanged(pipe, tmp_path):
    plain = generate(pipe, seed=4).frames
    with tracer.trace(pipe, tmp_path / "t.zarr", progress=False):
        traced = generate(pipe, seed=4).frames
    assert np.array_equal(plain, traced)


def test_image_to_video_is_refused_by_name(tmp_path):
    from diffusers import HunyuanVideo15ImageToVideoPipeline

    pipe = demo_hunyuan_video15_pipeline(seed=0)
    i2v = HunyuanVideo15ImageToVideoPipeline.__new__(HunyuanVideo15ImageToVideoPipeline)
    i2v.__dict__.update(pipe.__dict__)
    with (
        pytest.raises(UnsupportedModelError, match="image-to-video"),
        tracer.trace(i2v, tmp_path / "never.zarr"),
    ):
        pass
    assert not (tmp_path / "never.zarr").exists()
