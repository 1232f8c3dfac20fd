"""diffusers Z-Image: `ZImagePipeline` around `ZImageTransformer2DModel`.

Qwen3 reads the prompt inside its chat template (thinking on), and its tokens are kept unpadded.
The transformer refines the image tokens and the text tokens apart (image-only and text-only
attention: no map), then its main single-stream layers attend one sequence per sample: the image
tokens, row-major, padded with a learned token to a multiple of 32, then the text tokens, padded
the same way. The padding is attended; a guided batch is `[positive, negative]`, and samples of
different lengths are padded and masked.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tracer.adapters.base import (
    DenoiserCall,
    Generation,
    Layer,
    UnsupportedModelError,
    first_of,
)
from tracer.adapters.diffusers_common import DiffusersAdapter
from tracer.adapters.text import chat_template, templated_segment, user_turn, with_padding
from tracer.spans import TextTokens

# Z-Image pads the image tokens and the text tokens each to a multiple of this, with a learned
# token, named here by its parameter.
SEQ_MULTIPLE = 32
PAD_TOKEN = "<cap_pad_token>"


def padded_length(n: int) -> int:
    """`n` tokens padded to Z-Image's multiple."""
    return n + (-n) % SEQ_MULTIPLE


class DiffusersZImage(DiffusersAdapter):
    """Traces diffusers Z-Image's main layers: image tokens first, then Qwen3 text tokens."""

    families = "Z-Image"
    transformer_classes = ("ZImageTransformer2DModel",)

    def layers(self) -> list[Layer]:
        # The noise and context refiners attend image or text alone: no map to trace.
        return [
            Layer(f"layers.{index}", "single", block.attention, int(block.attention.heads))
            for index, block in enumerate(self.transformer.layers)
        ]

    def timestep_of(self, timestep: Any) -> float:
        # The pipeline hands the transformer (1000 - t) / 1000.
        return 1000.0 * (1.0 - super().timestep_of(timestep))

    def generation(self, arguments: Mapping[str, Any]) -> Generation:
        pipe = self.pipe
        prompt = first_of(arguments.get("prompt"))
        max_len = int(arguments.get("max_sequence_length") or 512)
        scale = pipe.vae_scale_factor * 2 * 64
        names = ("prompt", "negative_prompt", "num_inference_steps", "guidance_scale")
        names += ("cfg_truncation",)
        attrs = self.call_attrs(arguments, names) | {
            "height": int(arguments.get("height") or scale),
            "width": int(arguments.get("width") or scale),
            "max_sequence_length": max_len,
        }
        if prompt is None:
            return Generation(text=TextTokens(segments=(), length=0), attrs=attrs)
        template = chat_template(user_turn(pipe.tokenizer, enable_thinking=True))
        segment = templated_segment(pipe.tokenizer, "prompt", prompt, template, max_len)
        # The transformer pads the text with its learned token (`cap_pad_token`), attended.
        pad = padded_length(len(segment.tokens)) - len(segment.tokens)
        segment = with_padding(segment, pad, PAD_TOKEN)
        attrs["prompt_template"] = template
        return Generation(
            text=TextTokens(segments=(segment,), length=len(segment.tokens)), attrs=attrs
        )

    def denoiser_call(self, bound: Mapping[str, Any]) -> DenoiserCall:
        images, captions = bound["x"], bound["cap_feats"]
        if isinstance(images[0], list):
            raise UnsupportedModelError(
                "Z-Image's omni mode (several images per sample) is not traced; attnscope "
                "traces ZImagePipeline's text-to-image calls"
            )
        patch = int(bound.get("patch_size", 2))
        _, _, height, width = images[0].shape  # [C, frames, H, W]
        grid = (int(height) // patch, int(width) // patch)
        return DenoiserCall(
            timestep=self.timestep_of(bound["t"]),
            text_len=padded_length(len(captions[0])),
            grid=grid,
            text_start=padded_length(grid[0] * grid[1]),
            image_start=0,
        )
