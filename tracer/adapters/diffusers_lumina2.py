"""diffusers Lumina-Image 2.0: `Lumina2Pipeline` around `Lumina2Transformer2DModel`.

Gemma2 reads the pipeline's system prompt, ` <Prompt Start> ` and the prompt, padded on the
right. The transformer refines the text and the image tokens apart (text-only and image-only
attention: no map), then its joint layers attend one sequence per sample: the text's real tokens
(its padding dropped), then the image tokens. Guidance runs the negative prompt as a second call.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tracer.adapters.base import DenoiserCall, Generation, Layer, first_of
from tracer.adapters.diffusers_common import DiffusersAdapter
from tracer.adapters.text import prompt_template, templated_segment
from tracer.spans import TextTokens

PROMPT_START = " <Prompt Start> "  # what the pipeline puts between the system prompt and prompt


class DiffusersLumina2(DiffusersAdapter):
    """Traces diffusers Lumina2's joint layers: Gemma2 text tokens first, then image tokens."""

    families = "Lumina-Image 2.0"
    sdpa_processor = (
        "diffusers.models.transformers.transformer_lumina2",
        "Lumina2AttnProcessor2_0",
    )
    transformer_classes = ("Lumina2Transformer2DModel",)

    def layers(self) -> list[Layer]:
        # The context and noise refiners attend text or image alone: no map to trace.
        return [
            Layer(f"layers.{index}", "single", block.attn, int(block.attn.heads))
            for index, block in enumerate(self.transformer.layers)
        ]

    def timestep_of(self, timestep: Any) -> float:
        # The pipeline hands the transformer 1 - t / num_train_timesteps.
        steps = float(self.pipe.scheduler.config.num_train_timesteps)
        return steps * (1.0 - super().timestep_of(timestep))

    def generation(self, arguments: Mapping[str, Any]) -> Generation:
        pipe = self.pipe
        prompt = first_of(arguments.get("prompt"))
        max_len = int(arguments.get("max_sequence_length") or 256)
        system = arguments.get("system_prompt") or pipe.system_prompt
        names = ("prompt", "negative_prompt", "num_inference_steps", "guidance_scale")
        names += ("cfg_trunc_ratio",)
        attrs = self.call_attrs(arguments, names) | {
            "height": int(arguments.get("height") or pipe.default_image_size),
            "width": int(arguments.get("width") or pipe.default_image_size),
            "max_sequence_length": max_len,
            "system_prompt": system,
        }
        if prompt is None:
            return Generation(text=TextTokens(segments=(), length=0), attrs=attrs)
        template = prompt_template(system + PROMPT_START)
        # The transformer keeps the real tokens only: the padded tokenization less its padding.
        segment = templated_segment(pipe.tokenizer, "prompt", prompt, template, max_len)
        return Generation(
            text=TextTokens(segments=(segment,), length=len(segment.tokens)), attrs=attrs
        )

    def denoiser_call(self, bound: Mapping[str, Any]) -> DenoiserCall:
        latents = bound["hidden_states"]  # [B, C, H, W]
        return DenoiserCall(
            timestep=self.timestep_of(bound["timestep"]),
            text_len=int(bound["encoder_attention_mask"][0].sum()),
            grid=self.patched_grid(latents),
        )
