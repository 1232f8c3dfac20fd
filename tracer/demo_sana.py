"""A small random-weight Sana pipeline, built offline from the real classes.

The recipe of `tracer.demo` for `diffusers.SanaPipeline`: a Gemma2 text encoder reads the
lower-cased prompt after the pipeline's long instruction, padded, of which the first token and
the last `max_sequence_length - 1` stay; each block's self-attention over the image is linear
(no softmax map) and its cross-attention lets the image tokens attend those text tokens, with
the padding masked. The DC autoencoder downsamples by 32, as Sana's.

```python
pipe = demo_sana_pipeline(seed=0)
image = pipe("a cat on a red chair", height=512, width=512, num_inference_steps=4,
             max_sequence_length=32).images[0]
```
"""

from __future__ import annotations

import functools
import json

import torch
from diffusers import (
    AutoencoderDC,
    DPMSolverMultistepScheduler,
    SanaPipeline,
    SanaTransformer2DModel,
)
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import Gemma2Config, Gemma2Model, GemmaTokenizer

from tracer.demo import DEMO_CORPUS, assemble

__all__ = ["demo_gemma_encoder", "demo_gemma_tokenizer", "demo_sana_pipeline"]

_LATENT_CHANNELS = 8
_TEXT_HIDDEN = 32
_GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
_GEMMA_VOCAB_SIZE = 1000
# Characters of the pipeline's own instruction beyond the corpus's, so it tokenizes without <unk>.
_EXTRA_CHARACTERS = "\n'\":,.!?-()<>0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Sana's VAE factor: six levels of the DC autoencoder, each halving.
_VAE_LEVELS = 6


@functools.cache
def _gemma_vocab() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    """Gemma's BPE (vocab, merges) over "▁"-marked words, trained on DEMO_CORPUS once per process.

    Every character comes from the sorted initial alphabet, so every id, and with it the merge
    order (ties go to the lower id), is the same in every process.
    """
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    characters = set(DEMO_CORPUS.replace("\n", "").replace(" ", "▁") + _EXTRA_CHARACTERS)
    trainer = trainers.BpeTrainer(
        vocab_size=_GEMMA_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(_GEMMA_SPECIALS),
        initial_alphabet=sorted(characters),
        show_progress=False,
    )
    backend.train_from_iterator(DEMO_CORPUS.splitlines(), trainer)
    model = json.loads(backend.to_str())["model"]
    return tuple(model["vocab"].items()), tuple((a, b) for a, b in model["merges"])


def demo_gemma_tokenizer() -> GemmaTokenizer:
    """A Gemma (fast, BPE) tokenizer trained on DEMO_CORPUS; adds <bos>, pads with <pad>."""
    vocab, merges = _gemma_vocab()
    return GemmaTokenizer(vocab=dict(vocab), merges=list(merges), add_bos_token=True)


def demo_gemma_encoder(tokenizer: GemmaTokenizer) -> Gemma2Model:
    """A tiny random-weight Gemma2 (seeded by the caller) for `tokenizer`'s vocabulary; long
    enough for Sana's instruction before the prompt."""
    return Gemma2Model(
        Gemma2Config(
            vocab_size=len(tokenizer),
            hidden_size=_TEXT_HIDDEN,
            intermediate_size=2 * _TEXT_HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=4096,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )


def demo_sana_pipeline(
    *,
    seed: int = 0,
    num_layers: int = 2,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
    num_cross_attention_heads: int = 4,
    dtype: torch.dtype = torch.float32,
) -> SanaPipeline:
    """A small random-weight Sana pipeline (seeded, caller's RNG untouched).

    Pass `max_sequence_length` to each call as well: the pipeline's own default is 300. Its
    resolution binning maps any size to a 512-pixel bin; pass `use_resolution_binning=False` to
    keep the size asked for.
    """
    tokenizer = demo_gemma_tokenizer()
    inner = num_attention_heads * attention_head_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = demo_gemma_encoder(tokenizer)
        transformer = SanaTransformer2DModel(
            in_channels=_LATENT_CHANNELS,
            out_channels=_LATENT_CHANNELS,
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            num_layers=num_layers,
            num_cross_attention_heads=num_cross_attention_heads,
            cross_attention_head_dim=inner // num_cross_attention_heads,
            cross_attention_dim=inner,
            caption_channels=_TEXT_HIDDEN,
            sample_size=16,  # the 512-pixel resolution bins
            patch_size=1,
        )
        vae = AutoencoderDC(
            in_channels=3,
            latent_channels=_LATENT_CHANNELS,
            attention_head_dim=2,
            encoder_block_types="ResBlock",
            decoder_block_types="ResBlock",
            encoder_block_out_channels=(_LATENT_CHANNELS,) * _VAE_LEVELS,
            decoder_block_out_channels=(_LATENT_CHANNELS,) * _VAE_LEVELS,
            encoder_layers_per_block=(1,) * _VAE_LEVELS,
            decoder_layers_per_block=(1,) * _VAE_LEVELS,
            encoder_qkv_multiscales=((),) * _VAE_LEVELS,
            decoder_qkv_multiscales=((),) * _VAE_LEVELS,
            upsample_block_type="interpolate",
            downsample_block_type="conv",
            decoder_norm_types="rms_norm",
            decoder_act_fns="silu",
            scaling_factor=0.41407,
        )
    return assemble(
        SanaPipeline,
        dtype,
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True),
    )
