"""A small random-weight Stable Diffusion 3 pipeline, built offline from the real classes.

The same recipe as `tracer.demo` (tokenizers trained in-process, tiny configs, seeded weights),
for `diffusers.StableDiffusion3Pipeline`: two CLIP text encoders whose tokens share the first 77
text positions, then T5's tokens, in a joint attention that puts the image tokens first.

```python
pipe = demo_sd3_pipeline(seed=0)
image = pipe("a cat on a red chair", height=128, width=128, num_inference_steps=4,
             max_sequence_length=32).images[0]
```
"""

from __future__ import annotations

import torch
from diffusers import (
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextModelWithProjection, T5EncoderModel

from tracer.demo import (
    assemble,
    demo_clip_config,
    demo_clip_tokenizer,
    demo_t5_config,
    demo_t5_tokenizer,
    demo_vae,
)

__all__ = ["demo_sd3_pipeline"]

_LATENT_CHANNELS = 16  # SD3's VAE
# The two CLIP encoders' hidden states are joined on the channel axis and padded to T5's width,
# which must hold both; their pooled outputs, joined, are the pooled projection.
_T5_D_MODEL = 64
_CLIP_POOLED = 2 * 32


def demo_sd3_pipeline(
    *,
    seed: int = 0,
    max_sequence_length: int = 32,
    num_layers: int = 3,
    num_attention_heads: int = 4,
    attention_head_dim: int = 8,
    dtype: torch.dtype = torch.float32,
) -> StableDiffusion3Pipeline:
    """A small random-weight SD3 pipeline (seeded, caller's RNG untouched).

    Pass `max_sequence_length` to each call as well: the pipeline's own default is 256. The last
    block is context-pre-only, as in SD3.
    """
    tokenizer, tokenizer_2 = demo_clip_tokenizer(), demo_clip_tokenizer()
    tokenizer_3 = demo_t5_tokenizer(max_sequence_length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModelWithProjection(demo_clip_config(tokenizer))
        text_encoder_2 = CLIPTextModelWithProjection(demo_clip_config(tokenizer_2))
        text_encoder_3 = T5EncoderModel(demo_t5_config(tokenizer_3, d_model=_T5_D_MODEL))
        transformer = SD3Transformer2DModel(
            sample_size=16,
            patch_size=2,
            in_channels=_LATENT_CHANNELS,
            out_channels=_LATENT_CHANNELS,
            num_layers=num_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=_T5_D_MODEL,
            caption_projection_dim=num_attention_heads * attention_head_dim,
            pooled_projection_dim=_CLIP_POOLED,
            pos_embed_max_size=64,
        )
        # SD3's latent normalisation.
        vae = demo_vae(_LATENT_CHANNELS, scaling_factor=1.5305, shift_factor=0.0609)
    return assemble(
        StableDiffusion3Pipeline,
        dtype,
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
