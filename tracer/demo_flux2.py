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
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
)
from tokenizers import Tokenizer
from transformers import (
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    PixtralImageProcessor,
    PixtralProcessor,
    PreTrainedTokenizerFast,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from tracer.demo import assemble
from tracer.demo_qwen_image import _qwen_vocab, demo_qwen_tokenizer

__all__ = [
    "demo_flux2_dev_pipeline",
    "demo_flux2_pipeline",
    "demo_mistral_processor",
    "demo_qwen3_encoder",
    "demo_qwen3_tokenizer",
]

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


# Mistral's instruction and image markers, and a chat template in its form (the pipeline reads
# the system message and the user's text from each message's first text part).
_MISTRAL_MARKERS = ("[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]")
_MISTRAL_MARKERS += ("[IMG_BREAK]", "[IMG_END]")
_MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
    "[SYSTEM_PROMPT]{{ m['content'][0]['text'] }}[/SYSTEM_PROMPT]"
    "{% elif m['role'] == 'user' %}[INST]{{ m['content'][0]['text'] }}[/INST]{% endif %}"
    "{% endfor %}"
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


def _denoiser_and_vae(
    num_layers: int,
    num_single_layers: int,
    num_attention_heads: int,
    attention_head_dim: int,
    guidance_embeds: bool,
) -> tuple[Flux2Transformer2DModel, AutoencoderKLFlux2]:
    """FLUX.2's transformer and VAE, tiny (seeded by the caller)."""
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
        guidance_embeds=guidance_embeds,
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
    return transformer, vae


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
        # klein is not guidance-distilled
        transformer, vae = _denoiser_and_vae(
            num_layers, num_single_layers, num_attention_heads, attention_head_dim, False
        )
    return assemble(
        Flux2KleinPipeline,
        dtype,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


def demo_mistral_processor() -> PixtralProcessor:
    """A Pixtral processor around the demo's byte-level BPE, with Mistral's markers and a chat
    template in Mistral's form: BOS, the system prompt, then each user turn."""
    vocab, merges = _qwen_vocab()
    backend = Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges)).backend_tokenizer
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(backend.to_str()),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(_MISTRAL_MARKERS)})
    return PixtralProcessor(
        image_processor=PixtralImageProcessor(),
        tokenizer=tokenizer,
        chat_template=_MISTRAL_CHAT_TEMPLATE,
        patch_size=4,
    )


def demo_flux2_dev_pipeline(
    *,
    seed: int = 0,
    num_layers: int = 2,
    num_single_layers: int = 2,
    num_attention_heads: int = 4,
    attention_head_dim: int = 16,
    dtype: torch.dtype = torch.float32,
) -> Flux2Pipeline:
    """A small random-weight FLUX.2 [dev] pipeline (seeded, caller's RNG untouched): Mistral 3
    through a Pixtral processor, and guidance embedded.

    Pass `max_sequence_length` to each call as well: the pipeline's own default is 512.
    """
    processor = demo_mistral_processor()
    tokenizer = processor.tokenizer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = Mistral3ForConditionalGeneration(
            Mistral3Config(
                text_config={
                    "model_type": "mistral",
                    "vocab_size": len(tokenizer),
                    "hidden_size": _TEXT_HIDDEN,
                    "intermediate_size": 2 * _TEXT_HIDDEN,
                    # The pipeline stacks hidden states 10, 20 and 30.
                    "num_hidden_layers": 30,
                    "num_attention_heads": 2,
                    "num_key_value_heads": 2,
                    "head_dim": 8,
                    "max_position_embeddings": 512,
                    "pad_token_id": tokenizer.pad_token_id,
                },
                vision_config={
                    "model_type": "pixtral",
                    "hidden_size": 16,
                    "intermediate_size": 16,
                    "num_hidden_layers": 1,
                    "num_attention_heads": 2,
                    "head_dim": 8,
                    "patch_size": 4,
                    "image_size": 32,
                },
                image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
            )
        )
        transformer, vae = _denoiser_and_vae(
            num_layers, num_single_layers, num_attention_heads, attention_head_dim, True
        )
    return assemble(
        Flux2Pipeline,
        dtype,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=processor,
        transformer=transformer,
    )
