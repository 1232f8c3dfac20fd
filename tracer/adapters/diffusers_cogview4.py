"""diffusers CogView4: `CogView4Pipeline` around `CogView4Transformer2DModel`.

GLM reads the prompt unpadded, left-padded with the pad token to a multiple of 16 (attended: no
mask). The joint attention puts those text tokens first, then the 2x2-patched image tokens.
Guidance runs the negative prompt as a second call.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tracer.adapters.base import DenoiserCall, Generation, Layer, first_of
from tracer.adapters.diffusers_common import DiffusersAdapter
from tracer.adapters.text import templated_segment, with_padding
from tracer.spans import TextTokens

TEXT_MULTIPLE = 16  # the pipeline left-pads the text to a multiple of this


class DiffusersCogView4(DiffusersAdapter):
    """Traces diffusers CogView4: GLM text tokens first, then the image tokens."""

    families = "CogView4"
    sdpa_processor = ("diffusers.models.transformers.transformer_cogview4", "CogView4AttnProcessor")
    transformer_classes = ("CogView4Transformer2DModel",)

    def layers(self) -> list[Layer]:
        return [
            Layer(f"transformer_blocks.{index}", "double", block.attn1, int(block.attn1.heads))
            for index, block in enumerate(self.transformer.transformer_blocks)
        ]

    def generation(self, arguments: Mapping[str, Any]) -> Generation:
        pipe = self.pipe
        prompt = first_of(arguments.get("prompt"))
        max_len = int(arguments.get("max_sequence_length") or 1024)
        scale = pipe.vae_scale_factor * int(self.transformer.config.sample_size)
        names = ("prompt", "negative_prompt", "num_inference_steps", "guidance_scale")
        attrs = self.call_attrs(arguments, names) | {
            "height": int(arguments.get("height") or scale),
            "width": int(arguments.get("width") or scale),
            "max_sequence_length": max_len,
        }
        if prompt is None:
            return Generation(text=TextTokens(segments=(), length=0), attrs=attrs)
        segment = templated_segment(pipe.tokenizer, "prompt", prompt, "{}", max_len)
        pad = (-len(segment.tokens)) % TEXT_MULTIPLE
        segment = with_padding(segment, pad, pipe.tokenizer.pad_token, before=True)
        return Generation(
            text=TextTokens(segments=(segment,), length=len(segment.tokens)), attrs=attrs
        )

    def denoiser_call(self, bound: Mapping[str, Any]) -> DenoiserCall:
        latents = bound["hidden_states"]  # [B, C, H, W]
        return DenoiserCall(
            timestep=self.timestep_of(bound["timestep"]),
            text_len=int(bound["encoder_hidden_states"].shape[1]),
            grid=self.patched_grid(latents),
        )
