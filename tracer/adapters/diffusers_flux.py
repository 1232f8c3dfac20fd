"""diffusers FLUX and Chroma: `FluxPipeline`, `ChromaPipeline` and their relatives."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from tracer.adapters.base import (
    DenoiserCall,
    Generation,
    Layer,
    first_of,
    token_grid,
)
from tracer.adapters.diffusers_common import DiffusersAdapter
from tracer.adapters.text import padded_segment
from tracer.spans import TextTokens


class DiffusersFlux(DiffusersAdapter):
    """Traces diffusers FLUX.1 and Chroma: T5 text tokens first, then the packed image tokens."""

    families = "FLUX.1, Chroma"
    transformer_classes = ("FluxTransformer2DModel", "ChromaTransformer2DModel")
    timestep_scale = 1000.0  # the pipelines hand the transformer `timestep / 1000`

    def __init__(self, pipe: Any) -> None:
        super().__init__(pipe)
        self._grids: dict[tuple[int, ...], tuple[int, int]] = {}  # token grid per img_ids shape

    def layers(self) -> list[Layer]:
        layers = []
        for prefix, kind in (
            ("transformer_blocks", "double"),
            ("single_transformer_blocks", "single"),
        ):
            for index, block in enumerate(getattr(self.transformer, prefix)):
                name = f"{prefix}.{index}"
                layers.append(Layer(name, kind, block.attn, int(block.attn.heads)))
        return layers

    @property
    def masks_padding(self) -> bool:
        """Whether the transformer masks T5's padding out of the joint attention (Chroma)."""
        from diffusers import ChromaTransformer2DModel

        return isinstance(self.transformer, ChromaTransformer2DModel)

    def generation(self, arguments: Mapping[str, Any]) -> Generation:
        pipe = self.pipe
        prompt = first_of(arguments.get("prompt"))
        # FluxPipeline sends prompt_2 (or else prompt) to T5, whose tokens are the joint text;
        # Chroma has T5 alone, as its first tokenizer.
        t5_prompt = first_of(arguments.get("prompt_2")) or prompt
        t5_tokenizer = getattr(pipe, "tokenizer_2", None) or pipe.tokenizer
        max_len = int(arguments.get("max_sequence_length") or 512)
        scale = getattr(pipe, "vae_scale_factor", 8) * getattr(pipe, "default_sample_size", 128)
        names = ("prompt", "prompt_2", "negative_prompt", "num_inference_steps")
        names += ("guidance_scale", "true_cfg_scale")
        attrs = self.call_attrs(arguments, names) | {
            "height": int(arguments.get("height") or scale),
            "width": int(arguments.get("width") or scale),
            "max_sequence_length": max_len,
        }
        if t5_prompt is None:
            text = TextTokens(segments=(), length=max_len)
        else:
            segment = padded_segment(t5_tokenizer, "prompt", t5_prompt, 0, max_len)
            if self.masks_padding and any(segment.padding):
                # Chroma's mask hides T5's padding but its first token, which is attended as
                # any other: it gets a row of its own, apart from the (all-zero) rest.
                padding = list(segment.padding)
                padding[padding.index(True)] = False
                segment = replace(segment, padding=tuple(padding))
            text = TextTokens(segments=(segment,), length=len(segment.tokens))
        return Generation(text=text, attrs=attrs)

    def denoiser_call(self, bound: Mapping[str, Any]) -> DenoiserCall:
        img_ids = bound["img_ids"]
        key = tuple(img_ids.shape)
        if key not in self._grids:
            self._grids[key] = token_grid(img_ids)
        return DenoiserCall(
            timestep=self.timestep_of(bound["timestep"]),
            text_len=int(bound["encoder_hidden_states"].shape[1]),
            grid=self._grids[key],
        )
