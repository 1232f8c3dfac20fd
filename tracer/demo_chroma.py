"""A small random-weight Chroma pipeline, built offline from the real classes.

The recipe of `tracer.demo` for `diffusers.ChromaPipeline`: FLUX's layout (T5 text tokens first,
then 2x2-packed image tokens, double- then single-stream blocks) with T5 alone, and an attention
mask that hides T5's padding but its first token.

```python
pipe = demo_chroma_pipeline(seed=0)
image = pipe("a cat on a red chair", height=128, width=128, num_inference_steps=4,
             max_sequence_length=32).images[0]
```
"""

from __future__ import annotations

import torch
from diffusers import ChromaPipeline, ChromaTransformer2DModel
from transformers import T5EncoderModel

from tracer.demo import _rope_axes, assemble, demo_t5_config, demo_t5_tokenizer, demo_vae

__all__ = ["demo_chroma_pipeline"]

_LATENT_CHANNELS = 16
_T5_D_MODEL = 32


def demo_chroma_pipeline(
    *,
    seed: int = 0,
    max_sequence_length: int = 32,
    num_layers: int = 2,
    num_single_layers: int = 2,
    num_attention_heads: int = 4,
    attention_head_dim: int = 16,
    dtype: torch.dtype = torch.float32,
) -> ChromaPipeline:
    """A small random-weight Chroma pipeline (seeded, caller's RNG untouched).

    Pass `max_sequence_length` to each call as well: the pipeline's own default is 512.
    """
    tokenizer = demo_t5_tokenizer(max_sequence_length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = T5EncoderModel(demo_t5_config(tokenizer, d_model=_T5_D_MODEL))
        transformer = ChromaTransformer2DModel(
            patch_size=1,
            in_channels=_LATENT_CHANNELS * 4,  # 2x2-packed latents
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=_T5_D_MODEL,
            axes_dims_rope=_rope_axes(attention_head_dim),
            approximator_num_channels=16,
            approximator_hidden_dim=32,
            approximator_layers=1,
        )
        vae = demo_vae(_LATENT_CHANNELS, scaling_factor=0.3611, shift_factor=0.1159)
    return assemble(
        ChromaPipeline,
        dtype,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
