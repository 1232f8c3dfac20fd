"""A small random-weight CogVideoX pipeline, built offline from the real classes.

The recipe of `tracer.demo` for `diffusers.CogVideoXPipeline`, as CogVideoX-5B is laid out: a T5
encoder reads the prompt padded to `max_sequence_length`; each block attends the text tokens and
then the video tokens in one joint softmax, with 3D rotary position embeddings on the video; the
causal 3D autoencoder compresses 4 video frames into one latent frame (the first alone) and 8×8
pixels into one latent cell, and the transformer cuts 2×2 cells into one token.

```python
pipe = demo_cogvideox_pipeline(seed=0)
video = pipe("a cat on a red chair", height=48, width=64, num_frames=5, num_inference_steps=4,
             max_sequence_length=32).frames[0]
```
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
)
from transformers import T5EncoderModel

from tracer.demo import assemble, demo_t5_config, demo_t5_tokenizer

__all__ = ["demo_cogvideox_pipeline"]

_LATENT_CHANNELS = 4
_T5_D_MODEL = 32


def demo_cogvideox_pipeline(
    *,
    seed: int = 0,
    max_sequence_length: int = 32,
    num_layers: int = 2,
    num_attention_heads: int = 4,
    attention_head_dim: int = 16,
    dtype: torch.dtype = torch.float32,
) -> CogVideoXPipeline:
    """A small random-weight CogVideoX pipeline (seeded, caller's RNG untouched).

    Pass `max_sequence_length` to each call as well: the pipeline's own default is 226.
    """
    tokenizer = demo_t5_tokenizer(max_sequence_length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = T5EncoderModel(demo_t5_config(tokenizer, d_model=_T5_D_MODEL))
        transformer = CogVideoXTransformer3DModel(
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=_LATENT_CHANNELS,
            out_channels=_LATENT_CHANNELS,
            time_embed_dim=32,
            text_embed_dim=_T5_D_MODEL,
            num_layers=num_layers,
            sample_width=8,
            sample_height=8,
            sample_frames=9,
            patch_size=2,
            temporal_compression_ratio=4,
            max_text_seq_length=max_sequence_length,
            use_rotary_positional_embeddings=True,
        )
        vae = AutoencoderKLCogVideoX(
            block_out_channels=(8, 8, 8, 8),
            latent_channels=_LATENT_CHANNELS,
            layers_per_block=1,
            norm_num_groups=2,
            temporal_compression_ratio=4,
        )
    return assemble(
        CogVideoXPipeline,
        dtype,
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        transformer=transformer,
        vae=vae,
        scheduler=CogVideoXDDIMScheduler(),
    )
