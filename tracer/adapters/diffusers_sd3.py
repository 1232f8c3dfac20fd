"""diffusers Stable Diffusion 3 and 3.5: `StableDiffusion3Pipeline` around `SD3Transformer2DModel`.

The joint attention puts the image tokens first, then the text: 77 CLIP positions (CLIP-L's and
CLIP-G's hidden states side by side on the channel axis, so both prompts share each position),
then T5's tokens. A word of the prompt has tokens in both segments (`clip` and `t5`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tracer.adapters.base import (
    DenoiserCall,
    Generation,
    Layer,
    first_of,
)
from tracer.adapters.diffusers_common import DiffusersAdapter
from tracer.adapters.text import padded_segment
from tracer.spans import TextTokens

CLIP_SEGMENT, T5_SEGMENT = "clip", "t5"


class DiffusersSD3(DiffusersAdapter):
    """Traces diffusers SD3/SD3.5: image tokens first, then CLIP (77) and T5 text tokens."""

    families = "SD3, SD3.5"
    sdpa_processor = ("diffusers.models.attention_processor", "JointAttnProcessor2_0")
    transformer_classes = ("SD3Transformer2DModel",)

    def layers(self) -> list[Layer]:
        # SD3.5's second attention (`attn2`) is image-only self-attention: no text to trace.
        return [
            Layer(f"transformer_blocks.{index}", "double", block.attn, int(block.attn.heads))
            for index, block in enumerate(self.transformer.transformer_blocks)
        ]

    def generation(self, arguments: Mapping[str, Any]) -> Generation:
        pipe = self.pipe
        prompt = first_of(arguments.get("prompt"))
        t5_prompt = first_of(arguments.get("prompt_3")) or prompt
        max_len = int(arguments.get("max_sequence_length") or 256)
        clip_len = int(pipe.tokenizer_max_length)
        scale = pipe.vae_scale_factor * pipe.default_sample_size
        names = ("prompt", "prompt_2", "prompt_3", "negative_prompt", "num_inference_steps")
        names += ("guidance_scale",)
        attrs = self.call_attrs(arguments, names) | {
            "height": int(arguments.get("height") or scale),
            "width": int(arguments.get("width") or scale),
            "max_sequence_length": max_len,
        }
        segments = []
        if prompt is not None:
            # CLIP-G reads prompt_2 at the same positions; its tokens are CLIP-L's when the two
            # prompts agree, as they do unless prompt_2 is given.
            segments.append(padded_segment(pipe.tokenizer, CLIP_SEGMENT, prompt, 0, clip_len))
        if t5_prompt is not None and pipe.tokenizer_3 is not None:
            segments.append(
                padded_segment(pipe.tokenizer_3, T5_SEGMENT, t5_prompt, clip_len, max_len)
            )
        text = TextTokens(
            segments=tuple(segments),
            length=clip_len + max_len,
            prompt_segments=(CLIP_SEGMENT, T5_SEGMENT),
        )
        return Generation(text=text, attrs=attrs)

    def denoiser_call(self, bound: Mapping[str, Any]) -> DenoiserCall:
        latents = bound["hidden_states"]  # [B, C, H, W], patchified row-major
        grid = self.patched_grid(latents)
        return DenoiserCall(
            timestep=self.timestep_of(bound["timestep"]),
            text_len=int(bound["encoder_hidden_states"].shape[1]),
            grid=grid,
            text_start=grid[0] * grid[1],
            image_start=0,
            # A guided batch is [negative, positive].
            batch_index=self.negative_first_index(int(latents.shape[0])),
        )
