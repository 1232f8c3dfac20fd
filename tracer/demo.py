"""A small random-weight FLUX pipeline, built offline from the real diffusers/transformers classes.

Nothing here is downloaded: the tokenizers are trained in-process on a built-in English corpus by
the ``tokenizers`` library's own trainers (``UnigramTrainer`` for the T5 side, ``BpeTrainer`` for
the CLIP side), and every model is constructed from a tiny config with weights drawn from a seeded
RNG. The result is a genuine ``diffusers.FluxPipeline`` (same classes, same call path, same
attention processors as FLUX.1), only small enough that a full generation takes a fraction of a
second on a laptop CPU. Its images are noise-like, but its attention has the real FLUX geometry:
text tokens first, then image tokens in row-major latent-grid order, in double-stream blocks
followed by single-stream ones.

The tokenizers come out the same in every process (same pieces, same ids, same merges), so token
ids in recorded traces mean the same thing everywhere: the trainers' dependence on their randomly
seeded hash maps is taken out as ``_t5_vocab`` and ``_clip_vocab`` describe.

```python
pipe = demo_pipeline(seed=0)
sizes = demo_sizes(pipe)
image = pipe("a cat on a red chair", height=96, width=160, num_inference_steps=4,
             max_sequence_length=sizes.text_len).images[0]
sizes.grid(96, 160)        # (6, 10) latent tokens, row-major after the text tokens
```
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from tokenizers import pre_tokenizers, trainers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    PreTrainedTokenizerBase,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

P = TypeVar("P")
C = TypeVar("C")

__all__ = [
    "DEMO_CORPUS",
    "DEMO_SIZES",
    "DemoSizes",
    "assemble",
    "demo_clip_config",
    "demo_clip_tokenizer",
    "demo_pipeline",
    "demo_sizes",
    "demo_t5_config",
    "demo_t5_tokenizer",
    "demo_vae",
    "frozen",
]

# Training text for both tokenizers: image-prompt English, so that the words prompts use most
# become single tokens (as they are in the real CLIP and T5 vocabularies) while rarer words still
# split into sub-word pieces. Some lines start with a capital letter because the T5 side, like the
# real one, is case-sensitive. UnigramTrainer only takes a whole word as a candidate piece when the
# corpus also shows it continued within a whitespace-delimited chunk ("red," "reddish"), so the
# last lines give a few common prompt words ("on", "red", "the", "photo", "sitting") such company.
DEMO_CORPUS = """\
a photo of a cat sitting on a red chair
a photo of a dog sitting on a blue chair
a cat and a dog sitting on the grass in the park
a red apple on a wooden table next to a glass of water
a black cat sleeping on a white sofa in the living room
a small brown dog running on the beach at sunset
an astronaut riding a horse on the moon
a painting of a house by the sea with a green door
a portrait of a woman with long hair wearing a red dress
a portrait of an old man with a white beard and a hat
a close up photo of a yellow flower in the garden
a bowl of fruit on the kitchen table in the morning light
a city street at night with cars and bright lights
a mountain lake under a blue sky with white clouds
a cute cat wearing a small hat sitting on the floor
two dogs playing with a ball in the snow
a bird sitting on a tree branch in the forest
a red car parked in front of a house
a cup of coffee on a table next to a book
a teddy bear sitting on a chair by the window
a boat on the river under a bridge in the city
a girl reading a book under a tree in the park
a boy riding a bike down the street
a blue vase with flowers on a table
a dog lying on a rug in front of the fire
a cat looking out of the window at the rain
a watercolor painting of a fox in the forest
an oil painting of a ship on a stormy sea
a digital art illustration of a castle on a hill
a high quality photo of a cat, detailed, sharp focus, studio lighting
a blurry photo of a dog, low quality, dark
a green chair and a red chair in an empty room
a white horse standing in a field of yellow flowers
a cat sitting on top of a pile of books
a dog and a cat sleeping together on a bed
a plate of food on a wooden table in a restaurant
a person walking a dog on the beach
a sunset over the ocean with orange and pink clouds
a snowy forest at dawn with tall trees
A cat on a chair. A dog on the floor. The sky is blue.
The red chair is next to the table and the lamp.
Photo of the moon over a quiet village, by the lake.
a red, white and blue flag on a pole
a cat on a chair, a dog on the floor, a bird on a branch
one red rose in a glass vase, only one, on a wooden table
there is a cat inside the house, then a dog comes into the room
a kitten with a ball of wool, sitting on a table, photo taken from above
photos of a small grey cat, sitting beside the windows in the mornings, with velvety fur
a photo, of a white cat and a small dog, sitting, by a window, on a velvet chair, in the morning
"""

# Special tokens where the real vocabularies have them: T5's <pad>, </s>, <unk> are ids 0, 1, 2
# (FluxPipeline pads T5 input with id 0). CLIP's start/end markers get ids 0 and 1 here (the real
# vocabulary has them last): the pipeline and CLIPTextModel read their ids from the tokenizer.
_T5_SPECIALS = ("<pad>", "</s>", "<unk>")
_CLIP_BOS, _CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
_CLIP_MAX_LENGTH = 77  # FluxPipeline reads it from the CLIP tokenizer's model_max_length
_CLIP_END_OF_WORD = "</w>"  # CLIP's BPE marks a word's last symbol with this suffix

# The T5 side knows these characters even where the corpus lacks them, so ordinary prompts never
# hit <unk>; anything else (other scripts, emoji) still tokenizes, as <unk>, like real T5 does.
_T5_ALPHABET = [
    *"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
    *".,;:!?'\"()[]{}-_/&%$#@*+=<>|~`^",
    *"àáâäãåçèéêëìíîïñòóôöõùúûüýÿæœßÀÁÂÄÇÈÉÊËÎÏÑÒÓÔÖÙÚÛÜ",
]

# Vocabulary caps. Neither is reached on DEMO_CORPUS: Unigram's EM keeps only pieces the corpus
# supports, and BPE stops once no pair occurs twice (min_frequency=2).
_T5_VOCAB_SIZE = 1000
_CLIP_VOCAB_SIZE = 1000

# UnigramTrainer's step between the scores of the characters it appends after EM (see _t5_vocab),
# and the decimals its scores are rounded to, far coarser than EM's summation-order noise.
_UNIGRAM_ADDED_CHAR_STEP = 1e-4
_T5_SCORE_DECIMALS = 6

# Tiny text encoders. Their widths feed the transformer's joint_attention_dim (T5) and
# pooled_projection_dim (CLIP pooler output), as 4096 and 768 do in FLUX.1.
_T5_D_MODEL = 32
_CLIP_HIDDEN = 32

# FLUX packs 2x2 latent patches into one token and its VAE downsamples by 8.
_VAE_SCALE_FACTOR = 8
_PACK = 2
_LATENT_CHANNELS = 16


def _train(tokenizer: PreTrainedTokenizerBase, trainer: trainers.Trainer) -> dict:
    """The model JSON of ``tokenizer``'s backend after ``trainer`` trained it on DEMO_CORPUS.

    ``tokenizer`` is an empty instance of the target class: training through its own backend makes
    the trainer see words exactly as the final tokenizer will (same normalizer, pre-tokenizer and
    model options).
    """
    backend = tokenizer.backend_tokenizer
    backend.train_from_iterator(DEMO_CORPUS.splitlines(), trainer)
    return json.loads(backend.to_str())["model"]


@functools.cache
def _t5_vocab() -> tuple[tuple[str, float], ...]:
    """The T5-side Unigram vocabulary, trained on DEMO_CORPUS once per process, in canonical order.

    UnigramTrainer's output varies between processes in two ways, both from its randomly seeded
    hash maps, and both are taken out here. Characters it must keep but EM dropped (_T5_ALPHABET,
    rare corpus characters) are appended at the model's lowest score plus 1e-4 per character, in
    hash-set order: they all get the lowest score. EM sums over the words in hash-map order, so
    scores differ in their last bits: they are rounded. Then the pieces are sorted by (-score,
    piece) after the special tokens, which keep ids 0, 1, 2. (The pieces themselves, as a set,
    were the same in every process tried.)
    """
    trainer = trainers.UnigramTrainer(
        vocab_size=_T5_VOCAB_SIZE,
        special_tokens=list(_T5_SPECIALS),
        unk_token="<unk>",
        initial_alphabet=_T5_ALPHABET,
        show_progress=False,
    )
    vocab = _train(T5Tokenizer(extra_ids=0), trainer)["vocab"]
    specials, pieces = vocab[: len(_T5_SPECIALS)], vocab[len(_T5_SPECIALS) :]
    lowest = min(score for _, score in pieces)
    # Above every appended character's score: one step per character the trainer may append.
    appended_below = lowest + _UNIGRAM_ADDED_CHAR_STEP * len(set(_T5_ALPHABET).union(DEMO_CORPUS))

    def canonical(piece: str, score: float) -> float:
        if len(piece) == 1 and score < appended_below:
            score = lowest  # a character the trainer appended after EM
        return round(score, _T5_SCORE_DECIMALS)

    scored = sorted(
        ((piece, canonical(piece, score)) for piece, score in pieces), key=lambda x: (-x[1], x[0])
    )
    return tuple((piece, score) for piece, score in specials) + tuple(scored)


@functools.cache
def _clip_vocab() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    """The CLIP-side byte-level BPE (vocab, merges), trained on DEMO_CORPUS once per process.

    BpeTrainer breaks ties between equally frequent pairs by symbol id, and numbers the
    end-of-word symbols ("a</w>") as it meets them in a randomly seeded hash map, so its merge
    order, not only its ids, would vary between processes. Listing those symbols, sorted, among
    the trainer's special tokens (which it numbers first, in order) fixes every id and hence the
    merge order. Layout: the two markers, the 256 byte symbols with "</w>", the 256 plain byte
    symbols (sorted, from initial_alphabet), then the merged symbols in merge order.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    trainer = trainers.BpeTrainer(
        vocab_size=_CLIP_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[_CLIP_BOS, _CLIP_EOS, *(char + _CLIP_END_OF_WORD for char in alphabet)],
        initial_alphabet=alphabet,
        end_of_word_suffix=_CLIP_END_OF_WORD,
        show_progress=False,
    )
    model = _train(CLIPTokenizer(), trainer)
    return tuple(model["vocab"].items()), tuple((a, b) for a, b in model["merges"])


def demo_t5_tokenizer(max_sequence_length: int = 32) -> T5Tokenizer:
    """A T5 (fast, Unigram) tokenizer trained on DEMO_CORPUS: <pad>=0, </s>=1, <unk>=2.

    ``model_max_length`` is set to ``max_sequence_length``, the demo's T5 text length.
    """
    # extra_ids=0: FLUX never uses T5's sentinel tokens, and leaving them out keeps ids compact.
    return T5Tokenizer(vocab=list(_t5_vocab()), extra_ids=0, model_max_length=max_sequence_length)


def demo_clip_tokenizer() -> CLIPTokenizer:
    """A CLIP (fast, byte-level BPE) tokenizer trained on DEMO_CORPUS; pads with <|endoftext|>."""
    vocab, merges = _clip_vocab()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        bos_token=_CLIP_BOS,
        eos_token=_CLIP_EOS,
        unk_token=_CLIP_EOS,
        pad_token=_CLIP_EOS,  # as in FLUX.1's tokenizer/ folder
        model_max_length=_CLIP_MAX_LENGTH,
    )


@dataclass(frozen=True)
class DemoSizes:
    """Shapes of a FLUX pipeline's joint attention, to derive expected trace shapes from."""

    num_layers: int  # double-stream blocks: transformer_blocks.0 .. num_layers-1
    num_single_layers: int  # single-stream blocks: single_transformer_blocks.0 .. n-1
    num_attention_heads: int
    attention_head_dim: int
    axes_dims_rope: tuple[int, int, int]
    text_len: int  # T5 tokens in the joint sequence (= max_sequence_length of the call)
    clip_max_length: int  # CLIP tokens (pooled only; never in the joint attention)
    joint_attention_dim: int  # T5 hidden size
    pooled_projection_dim: int  # CLIP hidden size
    latent_channels: int
    vae_scale_factor: int
    guidance_embeds: bool

    @property
    def inner_dim(self) -> int:
        """Transformer width: heads × head dim."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def num_blocks(self) -> int:
        """All attention layers, double then single."""
        return self.num_layers + self.num_single_layers

    @property
    def pixels_per_token(self) -> int:
        """Image pixels per latent token side (VAE factor × 2x2 packing): 16 for FLUX."""
        return self.vae_scale_factor * _PACK

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Latent token grid (rows, cols) for an image of height × width pixels.

        Like FluxPipeline, sizes that are not multiples of 16 are rounded down.
        """
        step = self.pixels_per_token
        return height // step, width // step

    def image_tokens(self, height: int, width: int) -> int:
        """Number of image tokens in the joint sequence."""
        rows, cols = self.grid(height, width)
        return rows * cols

    def joint_len(self, height: int, width: int) -> int:
        """Length of the joint sequence: text tokens then image tokens."""
        return self.text_len + self.image_tokens(height, width)

    def image_size(self, height: int, width: int) -> tuple[int, int]:
        """Size (height, width) in pixels of the image the pipeline actually returns."""
        rows, cols = self.grid(height, width)
        return rows * self.pixels_per_token, cols * self.pixels_per_token


def _rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Split head_dim into FLUX-like rope axes: about 1/8 for the unused index axis, rest y, x.

    For 128 this is FLUX.1's (16, 56, 56). Every part must be even (rope pairs channels).
    """
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"attention_head_dim must be even and at least 6, got {head_dim}")
    yx = 4 * ((head_dim - head_dim // 8) // 4)
    return head_dim - yx, yx // 2, yx // 2


def demo_t5_config(
    tokenizer: Any, d_model: int = _T5_D_MODEL, kind: type[C] = T5Config, **overrides: Any
) -> C:
    """A tiny T5 v1.1 encoder config (the family FLUX uses; `kind=UMT5Config` for Wan's) for
    `tokenizer`'s vocabulary."""
    return kind(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        **overrides,
    )


def demo_clip_config(tokenizer: Any, positions: int = _CLIP_MAX_LENGTH) -> CLIPTextConfig:
    """A tiny CLIP text encoder config for `tokenizer`'s vocabulary (77 positions, as CLIP's,
    unless `positions` says otherwise)."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=_CLIP_HIDDEN,
        intermediate_size=2 * _CLIP_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=positions,
        projection_dim=_CLIP_HIDDEN,
        hidden_act="quick_gelu",
        # CLIPTextModel pools at the first eos_token_id; with the legacy value 2 it would take
        # the argmax id instead, which is wrong for this vocabulary.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def demo_vae(latent_channels: int, *, scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    """A tiny random-weight AutoencoderKL that downsamples by 8, without quant convs."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        # Four levels: the pipelines derive their VAE factor 8 from len(block_out_channels).
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=latent_channels,
        sample_size=128,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def frozen(module: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """`module` in eval mode without gradients, as from_pretrained returns it, cast to dtype."""
    # Freshly constructed modules are in training mode (from_pretrained returns eval mode).
    module.eval().requires_grad_(False)
    if dtype != torch.float32:
        # The plain nn.Module cast: diffusers' override warns about modules to keep in float32
        # whenever the list exists, even when it is empty, as it is for these classes.
        torch.nn.Module.to(module, dtype)
    return module


def assemble(pipeline: type[P], dtype: torch.dtype, **components: Any) -> P:
    """`pipeline` built from `components`, its models frozen in `dtype` as from_pretrained
    returns them, with a flow-matching scheduler unless one is given, and no progress bar."""
    for component in components.values():
        if isinstance(component, torch.nn.Module):
            frozen(component, dtype)
    components.setdefault(
        "scheduler", FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    )
    pipe = pipeline(**components)
    # A tqdm bar per 4-step call is noise in tests and benchmarks; callers can turn it back on.
    pipe.set_progress_bar_config(disable=True)
    return pipe


def demo_pipeline(
    *,
    seed: int = 0,
    max_sequence_length: int = 32,
    num_layers: int = 2,
    num_single_layers: int = 3,
    num_attention_heads: int = 4,
    attention_head_dim: int = 16,
    axes_dims_rope: tuple[int, int, int] | None = None,
    guidance_embeds: bool = True,
    dtype: torch.dtype = torch.float32,
) -> FluxPipeline:
    """A small random-weight FLUX pipeline built from the real diffusers/transformers classes.

    All weights come from ``torch.manual_seed(seed)`` inside a forked RNG, so the same arguments
    give the same pipeline and the caller's global RNG is left untouched. The transformer geometry
    is overridable (e.g. FLUX's head dim 128 with fewer heads and layers, for benchmarks); the text
    encoders and VAE stay tiny. ``guidance_embeds=True`` is FLUX.1-dev-like (guidance_scale is fed
    to the model), False is schnell-like.

    The pipeline's own ``max_sequence_length`` default stays 512 (it is a call argument): pass
    ``max_sequence_length=demo_sizes(pipe).text_len`` to each call. ``tokenizer_2.model_max_length``
    is set to it so that tokenizing a prompt alone reproduces the pipeline's T5 tokens.
    """
    if not 1 <= max_sequence_length <= 512:
        # FluxPipeline refuses more than 512, and fewer than one token leaves no room for </s>.
        raise ValueError(f"max_sequence_length must be in 1..512, got {max_sequence_length}")
    axes = tuple(axes_dims_rope) if axes_dims_rope is not None else _rope_axes(attention_head_dim)
    if len(axes) != 3 or sum(axes) != attention_head_dim:
        raise ValueError(
            f"axes_dims_rope {axes} must be three dims summing to {attention_head_dim}"
        )

    tokenizer = demo_clip_tokenizer()
    tokenizer_2 = demo_t5_tokenizer(max_sequence_length)

    # fork_rng: seeding must not leak into the caller's global RNG (tests, the generation itself).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(demo_clip_config(tokenizer))
        text_encoder_2 = T5EncoderModel(demo_t5_config(tokenizer_2))
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=_LATENT_CHANNELS * _PACK * _PACK,
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=_T5_D_MODEL,
            pooled_projection_dim=_CLIP_HIDDEN,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=axes,
        )
        # FLUX.1's latent normalisation.
        vae = demo_vae(_LATENT_CHANNELS, scaling_factor=0.3611, shift_factor=0.1159)
    # FLUX.1's scheduler config: resolution-dependent shift of the sigmas.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )

    return assemble(
        FluxPipeline,
        dtype,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def demo_sizes(pipe: FluxPipeline, max_sequence_length: int | None = None) -> DemoSizes:
    """Sizes of a FLUX pipeline's attention, read from its components' configs.

    Works for any FluxPipeline; ``text_len`` is ``max_sequence_length`` if given, else the T5
    tokenizer's ``model_max_length`` (the demo's max_sequence_length; 512 for FLUX.1).
    """
    cfg = pipe.transformer.config
    return DemoSizes(
        num_layers=cfg.num_layers,
        num_single_layers=cfg.num_single_layers,
        num_attention_heads=cfg.num_attention_heads,
        attention_head_dim=cfg.attention_head_dim,
        axes_dims_rope=tuple(cfg.axes_dims_rope),
        text_len=(
            max_sequence_length
            if max_sequence_length is not None
            else pipe.tokenizer_2.model_max_length
        ),
        clip_max_length=pipe.tokenizer_max_length,
        joint_attention_dim=cfg.joint_attention_dim,
        pooled_projection_dim=cfg.pooled_projection_dim,
        latent_channels=pipe.vae.config.latent_channels,
        vae_scale_factor=pipe.vae_scale_factor,
        guidance_embeds=cfg.guidance_embeds,
    )


# The default demo's sizes, without building it.
DEMO_SIZES = DemoSizes(
    num_layers=2,
    num_single_layers=3,
    num_attention_heads=4,
    attention_head_dim=16,
    axes_dims_rope=_rope_axes(16),
    text_len=32,
    clip_max_length=_CLIP_MAX_LENGTH,
    joint_attention_dim=_T5_D_MODEL,
    pooled_projection_dim=_CLIP_HIDDEN,
    latent_channels=_LATENT_CHANNELS,
    vae_scale_factor=_VAE_SCALE_FACTOR,
    guidance_embeds=True,
)
