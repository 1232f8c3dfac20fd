"""A small random-weight Wan text-to-video pipeline, built offline from the real classes.

The recipe of `tracer.demo` for `diffusers.WanPipeline`: a UMT5 encoder reads the prompt padded
to `max_sequence_length`; the transformer's blocks attend the video tokens to themselves, then
(cross-attention) to the text; Wan's causal 3D autoencoder compresses 4 video frames into one
latent frame (the first frame alone into the first) and 8×8 pixels into one latent cell, and the
transformer cuts 2×2 cells into one token.

```python
pipe = demo_wan_pipeline(seed=0)
video = pipe("a cat on a red chair", height=48, width=64, num_frames=5, num_inference_steps=4,
             max_sequence_length=32).frames[0]
```
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan, WanImageToVideoPipeline, WanPipeline, WanTransformer3DModel
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    UMT5Config,
    UMT5EncoderModel,
)

from tracer.demo import assemble, demo_t5_config, demo_t5_tokenizer

__all__ = ["demo_wan_pipeline"]

_LATENT_CHANNELS = 16  # Wan 2.1's autoencoder
_T5_D_MODEL = 32
_CLIP_HIDDEN, _CLIP_IMAGE, _CLIP_PATCH = 16, 28, 14  # 4 patches and the class token


def demo_wan_pipeline(
    *,
    seed: int = 0,
    max_sequence_length: int = 32,
    num_layers: int = 2,
    num_attention_heads: int = 4,
    attention_head_dim: int = 12,
    image_to_video: bool = False,
    dtype: torch.dtype = torch.float32,
) -> WanPipeline | WanImageToVideoPipeline:
    """A small random-weight Wan 2.1 pipeline (seeded, caller's RNG untouched): text-to-video, or
    with `image_to_video` Wan 2.1 I2V's (a CLIP image encoder's tokens of the conditioning image
    before the text, the first frame's latents beside the noise).

    Pass `max_sequence_length` to each call as well: the pipeline's own default is 512, which
    image-to-video needs (its attention takes the last 512 context tokens for the text).
    """
    tokenizer = demo_t5_tokenizer(max_sequence_length)
    inner = num_attention_heads * attention_head_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = UMT5EncoderModel(
            demo_t5_config(tokenizer, d_model=_T5_D_MODEL, kind=UMT5Config)
        )
        image = {}
        if image_to_video:
            image["image_encoder"] = CLIPVisionModel(
                CLIPVisionConfig(
                    hidden_size=_CLIP_HIDDEN,
                    intermediate_size=2 * _CLIP_HIDDEN,
                    num_hidden_layers=2,
                    num_attention_heads=2,
                    image_size=_CLIP_IMAGE,
                    patch_size=_CLIP_PATCH,
                )
            )
            image["image_processor"] = CLIPImageProcessor(
                size={"shortest_edge": _CLIP_IMAGE}, crop_size=_CLIP_IMAGE
            )
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            # Image-to-video: the noise, then the first frame's latents and their 4-channel mask.
            in_channels=_LATENT_CHANNELS + (_LATENT_CHANNELS + 4 if image_to_video else 0),
            out_channels=_LATENT_CHANNELS,
            text_dim=_T5_D_MODEL,
            freq_dim=32,
            ffn_dim=2 * inner,
            num_layers=num_layers,
            rope_max_seq_len=64,
            **({"image_dim": _CLIP_HIDDEN, "added_kv_proj_dim": inner} if image_to_video else {}),
        )
        vae = AutoencoderKLWan(
            base_dim=3,
            z_dim=_LATENT_CHANNELS,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
        )
    return assemble(
        WanImageToVideoPipeline if image_to_video else WanPipeline,
        dtype,
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        transformer=transformer,
        vae=vae,
        **image,
    )
