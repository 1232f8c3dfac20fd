"""A small random-weight HiDream-I1 pipeline, built offline from the real classes.

The recipe of `tracer.demo` for `diffusers.HiDreamImagePipeline`: two CLIP encoders give the
pooled embedding only; T5 and a Llama decoder give the text tokens. Every block of the
transformer reads the image tokens, then T5's tokens, the last listed Llama layer's and one Llama
layer of its own (the config's `llama_layers`, one per block). Llama 3.1's tokenizer is a
byte-level BPE that starts each text with its BOS token; the demo's Qwen one, with a BOS, plays
it.

```python
pipe = demo_hidream_pipeline(seed=0)
image = pipe("a cat on a red chair", num_inference_steps=4,
             max_sequence_length=32).images[0]
```
"""

from __future__ import annotations

import torch
from diffusers import HiDreamImagePipeline, HiDreamImageTransformer2DModel
from transformers import (
    CLIPTextModelWithProjection,
    LlamaConfig,
    LlamaForCausalLM,
    T5EncoderModel,
)

from tracer.demo import (
    assemble,
    demo_clip_config,
    demo_clip_tokenizer,
    demo_t5_config,
    demo_t5_tokenizer,
    demo_vae,
)
from tracer.demo_qwen_image import demo_qwen_tokenizer

__all__ = ["demo_hidream_pipeline"]

_LATENT_CHANNELS = 16  # HiDream uses FLUX.1's VAE
_T5_D_MODEL = 32
_LLAMA_HIDDEN = 16
_LLAMA_LAYERS = 2
_CLIP_POOLED = 2 * 32  # CLIP-L's and CLIP-G's projections, joined
# HiDream's CLIP encoders read up to 218 tokens (the pipeline's limit), in 248 positions.
_CLIP_POSITIONS = 248


def demo_hidream_pipeline(
    *,
    seed: int = 0,
    max_sequence_length: int = 32,
    num_layers: int = 2,
    num_single_layers: int = 2,
    num_attention_heads: int = 4,
    attention_head_dim: int = 16,
    sample_size: int = 16,
    dtype: torch.dtype = torch.float32,
) -> HiDreamImagePipeline:
    """A small random-weight HiDream-I1 pipeline (seeded, caller's RNG untouched).

    Pass `max_sequence_length` to each call as well: the pipeline's own default is 128. The
    blocks read the demo Llama's two layers in turn. Every image has the area of
    `sample_size` × 8 pixels squared (the pipeline rescales the size asked for to it, keeping its
    aspect ratio; HiDream-I1's is 1024²), and a non-square one is padded to 1,024 image tokens.
    """
    tokenizer, tokenizer_2 = demo_clip_tokenizer(), demo_clip_tokenizer()
    for clip in (tokenizer, tokenizer_2):
        clip.model_max_length = _CLIP_POSITIONS
    tokenizer_3 = demo_t5_tokenizer(max_sequence_length)
    tokenizer_4 = demo_qwen_tokenizer(add_bos_token=True)
    blocks = num_layers + num_single_layers
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModelWithProjection(demo_clip_config(tokenizer, _CLIP_POSITIONS))
        text_encoder_2 = CLIPTextModelWithProjection(demo_clip_config(tokenizer_2, _CLIP_POSITIONS))
        text_encoder_3 = T5EncoderModel(demo_t5_config(tokenizer_3, d_model=_T5_D_MODEL))
        text_encoder_4 = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(tokenizer_4),
                hidden_size=_LLAMA_HIDDEN,
                intermediate_size=2 * _LLAMA_HIDDEN,
                num_hidden_layers=_LLAMA_LAYERS,
                num_attention_heads=2,
                num_key_value_heads=2,
                head_dim=8,
                max_position_embeddings=512,
                bos_token_id=tokenizer_4.bos_token_id,
                eos_token_id=tokenizer_4.eos_token_id,
                pad_token_id=tokenizer_4.pad_token_id,
                # The pipeline asks Llama for its attention maps, which only eager returns.
                attn_implementation="eager",
            )
        )
        transformer = HiDreamImageTransformer2DModel(
            patch_size=2,
            in_channels=_LATENT_CHANNELS,
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            caption_channels=[_T5_D_MODEL, _LLAMA_HIDDEN],
            text_emb_dim=_CLIP_POOLED,
            num_routed_experts=4,
            num_activated_experts=2,
            # HiDream-I1's split of the head channels, (64, 32, 32) of 128: an axis text and
            # image share, then rows and columns.
            axes_dims_rope=(attention_head_dim // 2, *(attention_head_dim // 4,) * 2),
            max_resolution=(64, 64),
            llama_layers=[block % _LLAMA_LAYERS for block in range(blocks)],
        )
        vae = demo_vae(_LATENT_CHANNELS, scaling_factor=0.3611, shift_factor=0.1159)
    pipe = assemble(
        HiDreamImagePipeline,
        dtype,
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
        text_encoder_4=text_encoder_4,
        tokenizer_4=tokenizer_4,
    )
    pipe.default_sample_size = sample_size
    return pipe
