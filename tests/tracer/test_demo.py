"""The demo FLUX pipeline: real classes, right shapes, deterministic, tokenizer offsets."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

from tracer import demo
from tracer.demo import (
    DEMO_SIZES,
    demo_clip_tokenizer,
    demo_pipeline,
    demo_sizes,
    demo_t5_tokenizer,
)

TEXT_LEN = 32
PROMPT = "a cat on a red chair"
# Capitals, punctuation, a digit, double spaces, words outside the corpus and outside the alphabet.
HARD_PROMPTS = (
    PROMPT,
    "A photo of an astronaut riding a zebra, 4k  ultra-detailed!",
    "Un café très élégant 🐱 sur la table",
    "xylophone quokka",
)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pipe() -> FluxPipeline:
    return demo_pipeline(seed=0, max_sequence_length=TEXT_LEN)


def generate(pipe: FluxPipeline, *, height=96, width=160, steps=2, gen_seed=0, **kwargs):
    return pipe(
        kwargs.pop("prompt", PROMPT),
        num_inference_steps=steps,
        height=height,
        width=width,
        max_sequence_length=TEXT_LEN,
        generator=torch.Generator().manual_seed(gen_seed),
        **kwargs,
    )


class CallLog:
    """Keyword arguments of every transformer forward call."""

    def __init__(self, module: torch.nn.Module):
        self.calls: list[dict] = []
        self.handle = module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.calls.append(dict(kwargs))

    def remove(self):
        self.handle.remove()


def test_made_of_the_real_classes(pipe):
    assert type(pipe) is FluxPipeline
    assert type(pipe.transformer) is FluxTransformer2DModel
    assert type(pipe.vae) is AutoencoderKL
    assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler
    assert type(pipe.text_encoder) is CLIPTextModel
    assert type(pipe.text_encoder_2) is T5EncoderModel
    assert isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.tokenizer_2, T5Tokenizer)
    # The tracer finds words through offsets, which only fast tokenizers give.
    assert pipe.tokenizer.is_fast
    assert pipe.tokenizer_2.is_fast
    assert not any(
        m.training for m in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)
    )


def test_sizes_describe_the_pipeline(pipe):
    sizes = demo_sizes(pipe)
    assert sizes == DEMO_SIZES
    assert len(pipe.transformer.transformer_blocks) == sizes.num_layers == 2
    assert len(pipe.transformer.single_transformer_blocks) == sizes.num_single_layers == 3
    assert pipe.transformer.transformer_blocks[0].attn.heads == sizes.num_attention_heads
    assert pipe.transformer.inner_dim == sizes.inner_dim
    assert sum(sizes.axes_dims_rope) == sizes.attention_head_dim
    assert sizes.text_len == TEXT_LEN == pipe.tokenizer_2.model_max_length
    assert pipe.tokenizer_max_length == sizes.clip_max_length == 77
    assert pipe.vae_scale_factor == sizes.vae_scale_factor == 8
    assert sizes.grid(96, 160) == (6, 10)
    assert sizes.joint_len(96, 160) == TEXT_LEN + 60
    assert sizes.image_size(100, 170) == (96, 160)
    assert demo_sizes(pipe, max_sequence_length=512).text_len == 512


@pytest.mark.parametrize(("height", "width"), [(96, 160), (100, 170)])
def test_generates_the_requested_non_square_size(pipe, height, width):
    image = generate(pipe, height=height, width=width).images[0]
    assert isinstance(image, Image.Image)
    # PIL sizes are (width, height); sizes off the 16-pixel grid round down, as in FLUX.
    expected_h, expected_w = DEMO_SIZES.image_size(height, width)
    assert image.size == (expected_w, expected_h)
    array = generate(pipe, height=height, width=width, output_type="np").images
    assert array.shape == (1, expected_h, expected_w, 3)
    assert array.dtype == np.float32
    assert array.std() > 0.01  # not a constant image


def test_transformer_sees_the_sizes_geometry(pipe):
    log = CallLog(pipe.transformer)
    try:
        latents = generate(pipe, steps=3, output_type="latent").images
    finally:
        log.remove()
    rows, cols = DEMO_SIZES.grid(96, 160)
    assert latents.shape == (1, rows * cols, 4 * DEMO_SIZES.latent_channels)
    assert len(log.calls) == 3
    call = log.calls[0]
    assert call["hidden_states"].shape == (1, rows * cols, 4 * DEMO_SIZES.latent_channels)
    assert call["encoder_hidden_states"].shape == (1, TEXT_LEN, DEMO_SIZES.joint_attention_dim)
    assert call["pooled_projections"].shape == (1, DEMO_SIZES.pooled_projection_dim)
    assert call["txt_ids"].shape == (TEXT_LEN, 3)
    assert call["guidance"] is not None  # guidance_embeds=True: FLUX.1-dev-like
    # Image tokens are in row-major order over the (rows, cols) grid.
    img_ids = call["img_ids"]
    ys, xs = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    assert torch.equal(img_ids[:, 1], ys.flatten().to(img_ids.dtype))
    assert torch.equal(img_ids[:, 2], xs.flatten().to(img_ids.dtype))


def test_deterministic_for_a_seed(pipe):
    state = torch.random.get_rng_state()
    same = demo_pipeline(seed=0, max_sequence_length=TEXT_LEN)
    other = demo_pipeline(seed=1, max_sequence_length=TEXT_LEN)
    # Building seeds a forked RNG: the caller's global RNG is untouched.
    assert torch.equal(torch.random.get_rng_state(), state)

    first = generate(pipe, output_type="np").images
    assert np.array_equal(first, generate(pipe, output_type="np").images)
    assert np.array_equal(first, generate(same, output_type="np").images)
    # Same generator, different weights: a different image.
    assert np.abs(first - generate(other, output_type="np").images).mean() > 0.01
    # Same weights, different generator: a different image.
    assert np.abs(first - generate(pipe, gen_seed=1, output_type="np").images).mean() > 0.01


def _tokenizers_digest() -> str:
    """Hash of both tokenizers' full serialization: vocabulary, ids, merges, pipeline."""
    text = demo_t5_tokenizer().backend_tokenizer.to_str()
    text += demo_clip_tokenizer().backend_tokenizer.to_str()
    return hashlib.sha256(text.encode()).hexdigest()


def test_retraining_gives_the_same_tokenizers():
    # The tokenizers library's trainers seed their hash maps randomly on every run, in one process
    # too: on their own, three trainings give three different vocabularies (ids, merge order).
    digest = _tokenizers_digest()
    for _ in range(3):
        demo._t5_vocab.cache_clear()
        demo._clip_vocab.cache_clear()
        assert _tokenizers_digest() == digest


def test_tokenizers_are_the_same_in_every_process():
    # Token ids end up in recorded traces: another process (other hash seeds, Python's and the
    # trainers' own) must agree.
    code = "import test_demo; print(test_demo._tokenizers_digest())"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    path = [str(REPO), str(Path(__file__).parent), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, path))
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == _tokenizers_digest()


def test_known_words_are_single_tokens(pipe):
    t5 = pipe.tokenizer_2(PROMPT)
    assert pipe.tokenizer_2.convert_ids_to_tokens(t5.input_ids) == [
        *("▁" + word for word in PROMPT.split()),
        "</s>",
    ]
    clip = pipe.tokenizer(PROMPT)
    assert pipe.tokenizer.convert_ids_to_tokens(clip.input_ids) == [
        "<|startoftext|>",
        *(word + "</w>" for word in PROMPT.split()),
        "<|endoftext|>",
    ]


@pytest.mark.parametrize("side", ["t5", "clip"])
@pytest.mark.parametrize("prompt", HARD_PROMPTS)
def test_offsets_map_tokens_to_words(pipe, side, prompt):
    tokenizer = pipe.tokenizer_2 if side == "t5" else pipe.tokenizer
    encoded = tokenizer(prompt, return_offsets_mapping=True, return_special_tokens_mask=True)
    words = [m.span() for m in re.finditer(r"\S+", prompt)]
    covered = set()
    for (start, end), special in zip(
        encoded["offset_mapping"], encoded["special_tokens_mask"], strict=True
    ):
        if special:
            assert start == end == 0
            continue
        assert start < end
        # Each token's characters lie inside one word of the prompt.
        assert any(ws <= start and end <= we for ws, we in words), prompt[start:end]
        covered.update(range(start, end))
    assert covered == {i for ws, we in words for i in range(ws, we)}


def test_t5_pads_with_id_0_masked_out(pipe):
    tokenizer = pipe.tokenizer_2
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<pad>", 0)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("</s>", 1)
    # The call FluxPipeline makes; model_max_length is the demo's text length.
    encoded = tokenizer(PROMPT, padding="max_length", truncation=True)
    ids, mask = encoded.input_ids, encoded.attention_mask
    n = len(PROMPT.split()) + 1  # one token per word, then </s>
    assert len(ids) == len(mask) == TEXT_LEN
    assert ids[n - 1] == 1
    assert ids[n:] == [0] * (TEXT_LEN - n)
    assert mask == [1] * n + [0] * (TEXT_LEN - n)
    # Unknown characters still tokenize (as <unk>) instead of failing.
    assert tokenizer.unk_token_id in tokenizer("🐱").input_ids


def test_clip_side_pads_to_77_with_eos(pipe):
    tokenizer = pipe.tokenizer
    encoded = tokenizer(PROMPT, padding="max_length", max_length=pipe.tokenizer_max_length)
    n = len(PROMPT.split()) + 2
    assert encoded.input_ids[n:] == [tokenizer.eos_token_id] * (77 - n)
    assert encoded.attention_mask == [1] * n + [0] * (77 - n)
    # CLIPTextModel pools at the first eos: its config must name the tokenizer's.
    assert pipe.text_encoder.config.eos_token_id == tokenizer.eos_token_id


def test_true_cfg_runs_the_transformer_twice_per_step(pipe):
    log = CallLog(pipe.transformer)
    try:
        plain = generate(pipe, output_type="np").images
        assert len(log.calls) == 2
        guided = generate(
            pipe, output_type="np", true_cfg_scale=2.0, negative_prompt="blurry"
        ).images
    finally:
        log.remove()
    assert len(log.calls) == 2 + 4
    cond, uncond = log.calls[2]["encoder_hidden_states"], log.calls[3]["encoder_hidden_states"]
    assert cond.shape == uncond.shape == (1, TEXT_LEN, DEMO_SIZES.joint_attention_dim)
    assert not torch.equal(cond, uncond)
    assert guided.shape == plain.shape
    assert not np.array_equal(guided, plain)


def test_geometry_overrides_for_benchmarks():
    pipe = demo_pipeline(
        num_layers=1,
        num_single_layers=1,
        num_attention_heads=2,
        attention_head_dim=128,
        guidance_embeds=False,
        max_sequence_length=64,
    )
    sizes = demo_sizes(pipe)
    assert sizes.axes_dims_rope == (16, 56, 56)  # FLUX.1's split of head dim 128
    assert (sizes.num_layers, sizes.num_single_layers, sizes.num_attention_heads) == (1, 1, 2)
    assert sizes.text_len == 64
    assert not sizes.guidance_embeds
    latents = pipe(
        PROMPT,
        num_inference_steps=1,
        height=64,
        width=32,
        max_sequence_length=sizes.text_len,
        output_type="latent",
    ).images
    assert latents.shape == (1, sizes.image_tokens(64, 32), 4 * sizes.latent_channels)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"attention_head_dim": 15},
        {"axes_dims_rope": (4, 4, 4)},
        {"max_sequence_length": 0},
        {"max_sequence_length": 513},
    ],
)
def test_rejects_bad_geometry(kwargs):
    with pytest.raises(ValueError):
        demo_pipeline(**kwargs)
