"""A small random-weight DiffSynth-Studio FLUX pipeline, built offline from real diffsynth classes.

The result is a genuine ``diffsynth.pipelines.flux_image.FluxImagePipeline`` (same units, same
``model_fn_flux_image`` step loop, same EliGen regional mask, CFG and VRAM-management code paths),
whose models are instances of DiffSynth's own FLUX classes at toy sizes:

- ``dit``: a ``FluxDiT`` whose parts are small ``FluxJointTransformerBlock`` /
  ``FluxSingleTransformerBlock`` / ``RoPEEmbedding`` / ``TimestepEmbeddings`` /
  ``AdaLayerNormContinuous`` instances. ``FluxDiT.__init__`` hard-codes FLUX.1's 3072 channels,
  24 heads and 38 single blocks (12 B parameters), so it is constructed on the meta device, where
  nothing is allocated, and each part is then replaced by a small one of the same class;
- ``text_encoder_1``: a ``FluxTextEncoderClip`` (its constructor takes its sizes);
- ``text_encoder_2``: a ``FluxTextEncoderT5`` initialised from a small ``T5Config`` (its
  constructor hard-codes the 4.7 B-parameter T5-XXL config; its ``forward`` is used unchanged);
- ``vae_decoder``: a ``FluxVAEDecoder`` rebuilt with 32 channels from DiffSynth's VAE blocks;
- the tokenizers of :mod:`tracer.demo`, trained in-process (T5 fast Unigram, CLIP byte BPE).

```python
from tracer.adapters.diffsynth_flux import box_mask

pipe = demo_diffsynth_pipeline(seed=0)
image = pipe("a cat and a dog", height=96, width=128, num_inference_steps=3, seed=0,
             t5_sequence_length=DEMO_T5_LENGTH, eligen_entity_prompts=["a cat"],
             eligen_entity_masks=[box_mask(96, 128, (0, 0, 64, 96))])
```
"""

from __future__ import annotations

from typing import Any

import torch
from diffsynth.models.flux_dit import (
    AdaLayerNormContinuous,
    FluxDiT,
    FluxJointTransformerBlock,
    FluxSingleTransformerBlock,
    RoPEEmbedding,
)
from diffsynth.models.flux_text_encoder_clip import FluxTextEncoderClip
from diffsynth.models.flux_text_encoder_t5 import FluxTextEncoderT5
from diffsynth.models.flux_vae import FluxVAEDecoder, ResnetBlock, UpSampler, VAEAttentionBlock
from diffsynth.models.general_modules import TimestepEmbeddings
from diffsynth.pipelines.flux_image import FluxImagePipeline
from transformers import T5EncoderModel

from tracer.demo import _rope_axes, demo_clip_tokenizer, demo_t5_config, demo_t5_tokenizer

__all__ = ["DEMO_T5_LENGTH", "demo_diffsynth_pipeline"]

# T5 tokens per prompt (DiffSynth's `t5_sequence_length` call argument; 512 for FLUX.1).
DEMO_T5_LENGTH = 16

_TEXT_WIDTH = 32  # hidden size of both toy text encoders (768 for CLIP, 4096 for T5 in FLUX.1)
_CLIP_MAX_LENGTH = 77  # DiffSynth always pads CLIP input to 77 tokens
_VAE_CHANNELS = 32  # DiffSynth's VAE blocks use GroupNorm(32 groups): 32 is the smallest width
_PATCH_CHANNELS = 64  # 16 latent channels x 2x2 patch: FluxDiT's input_dim and output width
_ROPE_THETA = 10000  # FluxDiT's


def _assert_materialized(module: torch.nn.Module, what: str) -> None:
    """Fail loudly if a part built on the meta device was left unreplaced."""
    left = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{what}: parts left on the meta device: {left[:5]}")


def _small_dit(
    *,
    num_blocks: int,
    num_single_blocks: int,
    num_heads: int,
    head_dim: int,
    guidance_embedder: bool,
) -> FluxDiT:
    dim = num_heads * head_dim
    with torch.device("meta"):
        dit = FluxDiT(disable_guidance_embedder=not guidance_embedder, num_blocks=num_blocks)
    dit.pos_embedder = RoPEEmbedding(dim, _ROPE_THETA, list(_rope_axes(head_dim)))
    dit.time_embedder = TimestepEmbeddings(256, dim)
    dit.guidance_embedder = TimestepEmbeddings(256, dim) if guidance_embedder else None
    dit.pooled_text_embedder = torch.nn.Sequential(
        torch.nn.Linear(_TEXT_WIDTH, dim), torch.nn.SiLU(), torch.nn.Linear(dim, dim)
    )
    dit.context_embedder = torch.nn.Linear(_TEXT_WIDTH, dim)
    dit.x_embedder = torch.nn.Linear(_PATCH_CHANNELS, dim)
    dit.blocks = torch.nn.ModuleList(
        [FluxJointTransformerBlock(dim, num_heads) for _ in range(num_blocks)]
    )
    dit.single_blocks = torch.nn.ModuleList(
        [FluxSingleTransformerBlock(dim, num_heads) for _ in range(num_single_blocks)]
    )
    dit.final_norm_out = AdaLayerNormContinuous(dim)
    dit.final_proj_out = torch.nn.Linear(dim, _PATCH_CHANNELS)
    _assert_materialized(dit, "FluxDiT")
    return dit


def _small_vae_decoder() -> FluxVAEDecoder:
    c = _VAE_CHANNELS
    with torch.device("meta"):
        vae = FluxVAEDecoder()
    vae.conv_in = torch.nn.Conv2d(16, c, kernel_size=3, padding=1)
    # FluxVAEDecoder's layout (mid block with attention, then up blocks), one resnet per level;
    # three upsamplers give DiffSynth's VAE factor of 8.
    vae.blocks = torch.nn.ModuleList(
        [
            ResnetBlock(c, c, eps=1e-6),
            VAEAttentionBlock(1, c, c, 1, eps=1e-6),
            ResnetBlock(c, c, eps=1e-6),
            *[m for _ in range(3) for m in (ResnetBlock(c, c, eps=1e-6), UpSampler(c))],
            ResnetBlock(c, c, eps=1e-6),
        ]
    )
    vae.conv_norm_out = torch.nn.GroupNorm(num_channels=c, num_groups=32, eps=1e-6)
    vae.conv_out = torch.nn.Conv2d(c, 3, kernel_size=3, padding=1)
    _assert_materialized(vae, "FluxVAEDecoder")
    return vae


def _small_t5(tokenizer: Any) -> FluxTextEncoderT5:
    config = demo_t5_config(tokenizer, is_encoder_decoder=False, use_cache=False)
    # FluxTextEncoderT5.__init__ only builds T5-XXL's config and hands it to T5EncoderModel; doing
    # that step with a small config gives a real FluxTextEncoderT5 (its forward, returning the
    # last hidden state, is what the pipeline calls).
    encoder = FluxTextEncoderT5.__new__(FluxTextEncoderT5)
    T5EncoderModel.__init__(encoder, config)
    return encoder


def demo_diffsynth_pipeline(
    *,
    seed: int = 0,
    t5_sequence_length: int = DEMO_T5_LENGTH,
    num_blocks: int = 2,
    num_single_blocks: int = 2,
    num_heads: int = 4,
    head_dim: int = 16,
    guidance_embedder: bool = True,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> FluxImagePipeline:
    """A small random-weight DiffSynth ``FluxImagePipeline`` built from the real diffsynth classes.

    Weights come from ``torch.manual_seed(seed)`` inside a forked RNG (same arguments, same
    pipeline; the caller's RNG is untouched). Pass ``t5_sequence_length`` (the T5 tokenizer's
    ``model_max_length``, :data:`DEMO_T5_LENGTH` by default) to every call: DiffSynth's own default
    is 512. ``guidance_embedder=True`` is FLUX.1-dev-like (``embedded_guidance`` is fed to the
    model). ``pipe.vae_encoder`` is None: text-to-image only, like a pipeline loaded without it.
    """
    if not 1 <= t5_sequence_length <= 512:
        raise ValueError(f"t5_sequence_length must be in 1..512, got {t5_sequence_length}")
    tokenizer_1 = demo_clip_tokenizer()
    tokenizer_2 = demo_t5_tokenizer(t5_sequence_length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder_1 = FluxTextEncoderClip(
            embed_dim=_TEXT_WIDTH,
            vocab_size=len(tokenizer_1),
            max_position_embeddings=_CLIP_MAX_LENGTH,
            num_encoder_layers=2,
            encoder_intermediate_size=2 * _TEXT_WIDTH,
        )
        text_encoder_2 = _small_t5(tokenizer_2)
        dit = _small_dit(
            num_blocks=num_blocks,
            num_single_blocks=num_single_blocks,
            num_heads=num_heads,
            head_dim=head_dim,
            guidance_embedder=guidance_embedder,
        )
        vae_decoder = _small_vae_decoder()

    pipe = FluxImagePipeline(device=device, torch_dtype=dtype)
    pipe.tokenizer_1 = tokenizer_1
    pipe.tokenizer_2 = tokenizer_2
    for name, model in (
        ("text_encoder_1", text_encoder_1),
        ("text_encoder_2", text_encoder_2),
        ("dit", dit),
        ("vae_decoder", vae_decoder),
    ):
        # Freshly built modules are in training mode; DiffSynth's loader returns eval models.
        setattr(pipe, name, model.eval().requires_grad_(False).to(device=device, dtype=dtype))
    return pipe
