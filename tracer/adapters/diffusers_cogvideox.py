"""diffusers CogVideoX (1.0 and 1.5) text-to-video: `CogVideoXPipeline` around
`CogVideoXTransformer3DModel`.

Each block's attention is joint: the T5 text tokens, then the video tokens (frame by frame, each
frame row-major), in one softmax, with one set of projections for both (the two modalities have
their own norms only), so every layer is `single`. The text is the prompt padded to
`max_sequence_length` (226), unmasked. Guided batches are `[negative, positive]`. The processor
calls torch's SDPA itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tracer.adapters.base import DenoiserCall, Generation, Layer, first_of
from tracer.adapters.diffusers_video import DiffusersVideo
from tracer.adapters.text import padded_segment
from tracer.spans import TextTokens


class DiffusersCogVideoX(DiffusersVideo):
    """Traces diffusers CogVideoX's joint attention: T5 text first, then the video tokens."""

    families = "CogVideoX"
    transformer_classes = ("CogVideoXTransformer3DModel",)
    sdpa_processor = ("diffusers.models.attention_processor", "CogVideoXAttnProcessor2_0")

    def layers(self) -> list[Layer]:
        return [
            Layer(f"transformer_blocks.{index}", "single", block.attn1, int(block.attn1.heads))
            for index, block in enumerate(self.transformer.transformer_blocks)
        ]

    @property
    def patch(self) -> tuple[int, int, int]:
        config = self.transformer.config
        return int(config.patch_size_t or 1), int(config.patch_size), int(config.patch_size)

    def generation(self, arguments: Mapping[str, Any]) -> Generation:
        pipe = self.pipe
        config = self.transformer.config
        prompt = first_of(arguments.get("prompt"))
        max_len = int(arguments.get("max_sequence_length") or 226)
        names = ("prompt", "negative_prompt", "num_inference_steps", "guidance_scale")
        spatial = int(pipe.vae_scale_factor_spatial)
        attrs = (
            self.call_attrs(arguments, names)
            | {
                "height": int(arguments.get("height") or config.sample_height * spatial),
                "width": int(arguments.get("width") or config.sample_width * spatial),
                "max_sequence_length": max_len,
            }
            | self.video_attrs(arguments, num_frames=int(config.sample_frames))
        )
        if prompt is None:
            return Generation(text=TextTokens(segments=(), length=max_len), attrs=attrs)
        segment = padded_segment(pipe.tokenizer, "prompt", prompt, 0, max_len)
        return Generation(text=TextTokens(segments=(segment,), length=max_len), attrs=attrs)

    def denoiser_call(self, bound: Mapping[str, Any]) -> DenoiserCall:
        latents = bound["hidden_states"]  # [B, F, C, H, W]
        frames, _, height, width = latents.shape[1:]
        return DenoiserCall(
            timestep=self.timestep_of(bound["timestep"]),
            text_len=int(bound["encoder_hidden_states"].shape[1]),
            grid=self.video_grid(frames, height, width),
            # The pipeline guides (in a batch) above a scale of 1, and keeps no flag saying so.
            batch_index=self.negative_first_index(
                int(latents.shape[0]), guided=float(self.pipe.guidance_scale) > 1.0
            ),
        )
