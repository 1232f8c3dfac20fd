"""A small random-weight CogView4 pipeline, built offline from the real classes.

The recipe of `tracer.demo` for `diffusers.CogView4Pipeline`: a GLM text encoder reads the
prompt, unpadded, left-padded to a multiple of 16 (the padding attended); the joint attention
puts those text tokens first, then the 2x2-patched image tokens. The tokenizer is the demo's
byte-level BPE, as GLM-4's is one, starting every text with a special token as GLM-4's does.

```python
pipe = demo_cogview4_pipeline(seed=0)
image = pipe("a cat on a red chair", height=128, width=128, num_inference_steps=4).images[0]
```
"""

from __future__ import annotations

import torch
from diffusers import CogView4Pipeline, CogView4Transformer2DModel
from transformers import GlmConfig, GlmModel

from tracer.demo import assemble, demo_vae
from tracer.demo_qwen_image import demo_qwen_tokenizer

__all__ = ["demo_cogview4_pipeline"]

_LATENT_CHANNELS = 16
_TEXT_HIDDEN = 32


def demo_cogview4_pipeline(
    *,
    seed: int = 0,
    num_layers: int = 2,
    num_attention_heads: int = 4,
    attention_head_dim: int = 16,
    dtype: torch.dtype = torch.float32,
) -> CogView4Pipeline:
    """A small random-weight CogView4 pipeline (seeded, caller's RNG untouched)."""
    tokenizer = demo_qwen_tokenizer(add_bos_token=True)  # never empty, as GLM-4's
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = GlmModel(
            GlmConfig(
                vocab_size=len(tokenizer),
                hidden_size=_TEXT_HIDDEN,
                intermediate_size=2 * _TEXT_HIDDEN,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=2,
                head_dim=16,
                max_position_embeddings=512,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        transformer = CogView4Transformer2DModel(
            patch_size=2,
            in_channels=_LATENT_CHANNELS,
            out_channels=_LATENT_CHANNELS,
            num_layers=num_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            text_embed_dim=_TEXT_HIDDEN,
            time_embed_dim=32,
            condition_dim=16,
            pos_embed_max_size=64,
            sample_size=16,
            rope_axes_dim=(64, 64),
        )
        vae = demo_vae(_LATENT_CHANNELS, scaling_factor=1.0, shift_factor=0.0)
    return assemble(
        CogView4Pipeline,
        dtype,
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
    )
