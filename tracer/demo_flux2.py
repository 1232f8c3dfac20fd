"""A small random-weight FLUX.2 [klein] pipeline, built offline from the real classes.

The recipe of `tracer.demo` for `diffusers.Flux2KleinPipeline`: a Qwen3 text encoder reads the
prompt inside its chat template, padded to `max_sequence_length`, and three of its hidden layers
side by side are the text tokens. The joint attention puts them first, then the 2x2-packed image
tokens, then the tokens of any reference images (image editing), in double- then single-stream
blocks.

```python
pipe = demo_flux2_pipeline(seed=0)
image = pipe("a cat on a red chair", height=128, width=128, num_inference_steps=4,
             max_sequence_length=32).images[0]
```
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
)
from transformers import Qwen3Config, Qwen3ForCausalLM

from tracer.demo import frozen
from tracer.demo_qwen_image import demo_qwen_tokenizer

__all__ = ["demo_flux2_pipeline", "demo_qwen3_encoder", "demo_qwen3_tokenizer"]

_LATENT_CHANNELS = 8  # the VAE's; the transformer sees them 2x2-patchified
_TEXT_HIDDEN = 16
# The pipeline stacks Qwen3's hidden states 9, 18 and 27 (of its 36 layers), so the demo encoder
# has 27 layers, each tiny.
_TEXT_LAYERS = 27
_HIDDEN_STATES_STACKED = 3

# Qwen3's chat template, as the pipeline renders it (one user turn, a generation prompt, and an
# empty thinking block when thinking is off).
_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def demo_qwen3_tokenizer() -> Any:
    """The demo's Qwen tokenizer with Qwen3's chat template (thinking on or off)."""
    tokenizer = demo_qwen_tokenizer()
    tokenizer.chat_template = _CHAT_TEMPLATE
    return tokenizer


def demo_qwen3_encoder(tokenizer: Any, num_hidden_layers: int) -> Qwen3ForCausalLM:
    """A tiny random-weight Qwen3 (seeded by the caller) for `tokenizer`'s vocabulary."""
    return Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=_TEXT_HIDDEN,
            intermediate_size=2 * _TEXT_HIDDEN,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=512,
            bos_token_id=None,
            eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def demo_flux2_pipeline(
    *,
    seed: int = 0,
    num_layers: int = 2,
    num_single_layers: int = 2,
    num_attention_heads: int = 4,
    attention_head_dim: int = 16,
    dtype: torch.dtype = torch.float32,
) -> Flux2KleinPipeline:
    """A small random-weight FLUX.2 [klein] pipeline (seeded, caller's RNG untouched).

    Pass `max_sequence_length` to each call as well: the pipeline's own default is 512.
    """
    tokenizer = demo_qwen3_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = demo_qwen3_encoder(tokenizer, _TEXT_LAYERS)
        quarter = attention_head_dim // 4
        transformer = Flux2Transformer2DModel(
            patch_size=1,
            in_channels=_LATENT_CHANNELS * 4,
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=_TEXT_HIDDEN * _HIDDEN_STATES_STACKED,
            timestep_guidance_channels=32,
            axes_dims_rope=(quarter,) * 4,
            guidance_embeds=False,  # klein is not guidance-distilled
        )
        # Four levels: a VAE factor of 8, then 2x2 patches.
        vae = AutoencoderKLFlux2(
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            latent_channels=_LATENT_CHANNELS,
            norm_num_groups=4,
            sample_size=128,
            mid_block_add_attention=False,
        )
    for module in (text_encoder, transformer, vae):
        frozen(module, dtype)
    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
