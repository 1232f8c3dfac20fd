"""A small random-weight Qwen-Image pipeline, built offline from the real classes.

The recipe of `tracer.demo` for `diffusers.QwenImagePipeline`: a Qwen2.5-VL text encoder reads
the prompt inside a chat template, the pipeline drops the template's first tokens and keeps the
rest unpadded, and the joint attention puts those text tokens first, then the 2x2-packed image
tokens. A batch of prompts of different lengths is padded and masked per sample.

```python
pipe = demo_qwen_image_pipeline(seed=0)
image = pipe("a cat on a red chair", height=128, width=128, num_inference_steps=4).images[0]
```
"""

from __future__ import annotations

import functools

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from tokenizers import pre_tokenizers, trainers
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from tracer.demo import _train, assemble

__all__ = ["demo_qwen_image_pipeline", "demo_qwen_tokenizer"]

_LATENT_CHANNELS = 16
_TEXT_HIDDEN = 32
_QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
_QWEN_VOCAB_SIZE = 1000


@functools.cache
def _qwen_vocab() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    """Qwen's byte-level BPE (vocab, merges), trained on DEMO_CORPUS once per process.

    The byte symbols come from the sorted initial alphabet, so every id, and with it the merge
    order (ties go to the lower id), is the same in every process.
    """
    trainer = trainers.BpeTrainer(
        vocab_size=_QWEN_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(_QWEN_SPECIALS),
        initial_alphabet=sorted(pre_tokenizers.ByteLevel.alphabet()),
        show_progress=False,
    )
    model = _train(Qwen2Tokenizer(), trainer)
    return tuple(model["vocab"].items()), tuple((a, b) for a, b in model["merges"])


def demo_qwen_tokenizer(*, add_bos_token: bool = False) -> Qwen2Tokenizer:
    """A Qwen2 (fast, byte-level BPE) tokenizer trained on DEMO_CORPUS, with the chat markers;
    `add_bos_token` starts every text with `<|endoftext|>` (as GLM-4's starts with its own)."""
    vocab, merges = _qwen_vocab()
    bos = {"bos_token": _QWEN_SPECIALS[0], "add_bos_token": True} if add_bos_token else {}
    tokenizer = Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges), **bos)
    tokenizer.add_special_tokens({"additional_special_tokens": list(_QWEN_SPECIALS[1:])})
    return tokenizer


def _qwen_vl_config(tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLConfig:
    """A tiny Qwen2.5-VL config: two text layers; the vision tower is never run on text."""
    heads = 2
    return Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": _TEXT_HIDDEN,
            "intermediate_size": 2 * _TEXT_HIDDEN,
            "num_hidden_layers": 2,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},  # head dim 16 / 2
            "max_position_embeddings": 256,
            "bos_token_id": None,
            "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": _TEXT_HIDDEN,
        },
        vocab_size=len(tokenizer),
        hidden_size=_TEXT_HIDDEN,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )


def demo_qwen_image_pipeline(
    *,
    seed: int = 0,
    num_layers: int = 2,
    num_attention_heads: int = 4,
    attention_head_dim: int = 16,
    dtype: torch.dtype = torch.float32,
) -> QwenImagePipeline:
    """A small random-weight Qwen-Image pipeline (seeded, caller's RNG untouched)."""
    tokenizer = demo_qwen_tokenizer()
    yx = 4 * ((attention_head_dim - attention_head_dim // 8) // 4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = Qwen2_5_VLForConditionalGeneration(_qwen_vl_config(tokenizer))
        transformer = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=_LATENT_CHANNELS * 4,  # 2x2-packed latents
            out_channels=_LATENT_CHANNELS,
            num_layers=num_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=_TEXT_HIDDEN,
            axes_dims_rope=(attention_head_dim - yx, yx // 2, yx // 2),
        )
        # Three levels (two spatial downsamplings and one temporal): a VAE factor of 8.
        vae = AutoencoderKLQwenImage(
            base_dim=8,
            z_dim=_LATENT_CHANNELS,
            dim_mult=[1, 2, 2, 2],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
        )
    pipe = assemble(
        QwenImagePipeline,
        dtype,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    # The pipeline drops the template's part before the prompt by count: 34 tokens with Qwen's
    # tokenizer, this many with the demo's.
    template = pipe.prompt_template_encode
    prefix = template[: template.index("{}")]
    pipe.prompt_template_encode_start_idx = len(tokenizer(prefix)["input_ids"])
    return pipe
