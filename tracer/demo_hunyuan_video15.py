"""A small random-weight HunyuanVideo 1.5 text-to-video pipeline, built offline from the real
classes.

The recipe of `tracer.demo` for `diffusers.HunyuanVideo15Pipeline`: a Qwen2.5-VL text model reads
the prompt inside the pipeline's chat template (its system message dropped), padded; a ByT5
encoder reads the prompt's quoted text, if any; the transformer's blocks attend the video tokens
and then the context (the image-conditioning tokens, the ByT5 tokens and the Qwen tokens, each
kept where valid, the rest masked) in one joint softmax. The autoencoder compresses 4 video frames
into one latent frame (the first alone) and 16×16 pixels into one latent cell, one token each.

The pipeline's text lengths are attributes of the instance (Qwen's 1,000 tokens, ByT5's 256, 729
image tokens): the demo sets them small, and the template's system part to this tokenizer's
length of it.

```python
pipe = demo_hunyuan_video15_pipeline(seed=0)
video = pipe("a cat on a red chair", height=48, width=64, num_frames=5,
             num_inference_steps=4).frames[0]
```
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLHunyuanVideo15,
    HunyuanVideo15Pipeline,
    HunyuanVideo15Transformer3DModel,
)
from diffusers.guiders import ClassifierFreeGuidance
from transformers import ByT5Tokenizer, Qwen2_5_VLTextModel, T5EncoderModel

from tracer.adapters.diffusers_hunyuan_video15 import hunyuan_video15_turn
from tracer.adapters.text import chat_template
from tracer.demo import assemble, demo_t5_config
from tracer.demo_flux2 import demo_qwen3_tokenizer
from tracer.demo_qwen_image import _qwen_vl_config

__all__ = ["demo_hunyuan_video15_pipeline"]

_LATENT_CHANNELS = 8
_BYT5_D_MODEL = 16
_IMAGE_DIM = 16


def demo_hunyuan_video15_pipeline(
    *,
    seed: int = 0,
    max_sequence_length: int = 32,
    glyph_length: int = 16,
    image_tokens: int = 4,
    num_layers: int = 2,
    num_attention_heads: int = 4,
    attention_head_dim: int = 16,
    dtype: torch.dtype = torch.float32,
) -> HunyuanVideo15Pipeline:
    """A small random-weight HunyuanVideo 1.5 text-to-video pipeline (seeded, caller's RNG
    untouched): `max_sequence_length` Qwen tokens, `glyph_length` ByT5 tokens and
    `image_tokens` image-conditioning tokens in the context."""
    tokenizer = demo_qwen3_tokenizer()  # a Qwen chat template, as the pipeline renders it
    tokenizer_2 = ByT5Tokenizer()
    rope_t = attention_head_dim // 4
    rope_hw = (attention_head_dim - rope_t) // 2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Two layers: the pipeline reads the third-to-last hidden state (here, the embeddings).
        text_config = _qwen_vl_config(tokenizer).text_config
        text_encoder = Qwen2_5_VLTextModel(text_config)
        text_encoder_2 = T5EncoderModel(demo_t5_config(tokenizer_2, d_model=_BYT5_D_MODEL))
        transformer = HunyuanVideo15Transformer3DModel(
            in_channels=2 * _LATENT_CHANNELS + 1,  # latents, conditioning latents, their mask
            out_channels=_LATENT_CHANNELS,
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            num_layers=num_layers,
            num_refiner_layers=1,
            mlp_ratio=2.0,
            patch_size=1,
            patch_size_t=1,
            text_embed_dim=text_config.hidden_size,
            text_embed_2_dim=_BYT5_D_MODEL,
            image_embed_dim=_IMAGE_DIM,
            rope_axes_dim=(rope_t, rope_hw, attention_head_dim - rope_t - rope_hw),
            target_size=64,
            task_type="t2v",
        )
        vae = AutoencoderKLHunyuanVideo15(
            latent_channels=_LATENT_CHANNELS,
            block_out_channels=(8, 8, 8, 8, 8),
            layers_per_block=1,
            spatial_compression_ratio=16,
            temporal_compression_ratio=4,
        )
    pipe = assemble(
        HunyuanVideo15Pipeline,
        dtype,
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        tokenizer_2=tokenizer_2,
        text_encoder_2=text_encoder_2,
        transformer=transformer,
        vae=vae,
        guider=ClassifierFreeGuidance(guidance_scale=6.0),
    )
    # The pipeline drops the template's tokens before the prompt (108 of Qwen2.5-VL's).
    template = chat_template(hunyuan_video15_turn(pipe))
    before_prompt = template[: template.index("{}")].format()  # the braces unescaped
    pipe.prompt_template_encode_start_idx = len(tokenizer(before_prompt)["input_ids"])
    pipe.tokenizer_max_length = max_sequence_length
    pipe.tokenizer_2_max_length = glyph_length
    pipe.vision_num_semantic_tokens = image_tokens
    return pipe
