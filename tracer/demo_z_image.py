"""A small random-weight Z-Image pipeline, built offline from the real classes.

The recipe of `tracer.demo` for `diffusers.ZImagePipeline`: a Qwen3 text encoder reads the prompt
inside its chat template (thinking on), unpadded; the transformer refines the image tokens and
the text tokens apart, then runs single-stream layers over the image tokens followed by the text
tokens, each part padded with a learned token to a multiple of 32.

```python
pipe = demo_z_image_pipeline(seed=0)
image = pipe("a cat on a red chair", height=128, width=128, num_inference_steps=4).images[0]
```
"""

from __future__ import annotations

import torch
from diffusers import ZImagePipeline, ZImageTransformer2DModel

from tracer.demo import assemble, demo_vae
from tracer.demo_flux2 import demo_qwen3_encoder, demo_qwen3_tokenizer

__all__ = ["demo_z_image_pipeline"]

_LATENT_CHANNELS = 16
_TEXT_HIDDEN = 16  # the demo Qwen3's; the pipeline reads its next-to-last hidden state


def demo_z_image_pipeline(
    *,
    seed: int = 0,
    num_layers: int = 2,
    num_attention_heads: int = 4,
    attention_head_dim: int = 16,
    dtype: torch.dtype = torch.float32,
) -> ZImagePipeline:
    """A small random-weight Z-Image pipeline (seeded, caller's RNG untouched)."""
    tokenizer = demo_qwen3_tokenizer()
    yx = 4 * ((attention_head_dim - attention_head_dim // 8) // 4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = demo_qwen3_encoder(tokenizer, num_hidden_layers=2)
        transformer = ZImageTransformer2DModel(
            in_channels=_LATENT_CHANNELS,
            dim=num_attention_heads * attention_head_dim,
            n_layers=num_layers,
            n_refiner_layers=1,
            n_heads=num_attention_heads,
            n_kv_heads=num_attention_heads,
            cap_feat_dim=_TEXT_HIDDEN,
            axes_dims=[attention_head_dim - yx, yx // 2, yx // 2],
            axes_lens=[512, 64, 64],
        )
        vae = demo_vae(_LATENT_CHANNELS, scaling_factor=0.3611, shift_factor=0.1159)
    return assemble(
        ZImagePipeline,
        dtype,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
