"""A small random-weight Lumina-Image 2.0 pipeline, built offline from the real classes.

The recipe of `tracer.demo` for `diffusers.Lumina2Pipeline`: a Gemma2 text encoder reads the
pipeline's system prompt, `<Prompt Start>` and the prompt, padded; the transformer refines the
text and the image tokens apart, then its joint layers attend the text's real tokens (the
padding dropped) followed by the image tokens.

```python
pipe = demo_lumina2_pipeline(seed=0)
image = pipe("a cat on a red chair", height=128, width=128, num_inference_steps=4,
             max_sequence_length=64).images[0]
```
"""

from __future__ import annotations

import torch
from diffusers import Lumina2Pipeline, Lumina2Transformer2DModel

from tracer.demo import assemble, demo_vae
from tracer.demo_sana import demo_gemma_encoder, demo_gemma_tokenizer

__all__ = ["demo_lumina2_pipeline"]

_LATENT_CHANNELS = 16
_TEXT_HIDDEN = 32  # the demo Gemma2's


def demo_lumina2_pipeline(
    *,
    seed: int = 0,
    num_layers: int = 2,
    num_attention_heads: int = 4,
    attention_head_dim: int = 16,
    dtype: torch.dtype = torch.float32,
) -> Lumina2Pipeline:
    """A small random-weight Lumina2 pipeline (seeded, caller's RNG untouched).

    Pass `max_sequence_length` to each call as well: the pipeline's own default is 256.
    """
    tokenizer = demo_gemma_tokenizer()
    yx = 4 * ((attention_head_dim - attention_head_dim // 8) // 4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = demo_gemma_encoder(tokenizer)
        transformer = Lumina2Transformer2DModel(
            sample_size=16,
            patch_size=2,
            in_channels=_LATENT_CHANNELS,
            hidden_size=num_attention_heads * attention_head_dim,
            num_layers=num_layers,
            num_refiner_layers=1,
            num_attention_heads=num_attention_heads,
            num_kv_heads=num_attention_heads // 2,  # grouped-query attention, as Lumina2's
            multiple_of=16,
            axes_dim_rope=(attention_head_dim - yx, yx // 2, yx // 2),
            axes_lens=(512, 64, 64),
            cap_feat_dim=_TEXT_HIDDEN,
        )
        vae = demo_vae(_LATENT_CHANNELS, scaling_factor=0.3611, shift_factor=0.1159)
    return assemble(
        Lumina2Pipeline,
        dtype,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
