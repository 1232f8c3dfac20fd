"""diffusers Qwen-Image: `QwenImagePipeline` around `QwenImageTransformer2DModel`.

Qwen2.5-VL reads the prompt inside a chat template; the pipeline drops the template's first
tokens (34 with Qwen's tokenizer) and keeps the rest, unpadded: the prompt's tokens, then the
template's closing tokens. The joint attention puts those text tokens first, then the 2x2-packed
image tokens. In a batch of prompts the shorter ones are padded and the padding masked out of
the attention per sample; true CFG runs the negative prompt as a second call.
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
from tracer.adapters.text import templated_segment
from tracer.spans import TextTokens


class DiffusersQwenImage(DiffusersAdapter):
    """Traces diffusers Qwen-Image: templated Qwen2.5-VL text tokens first, then image tokens."""

    families = "Qwen-Image"
    transformer_classes = ("QwenImageTransformer2DModel",)
    timestep_scale = 1000.0  # the pipeline hands the transformer `timestep / 1000`

    def layers(self) -> list[Layer]:
        return [
            Layer(f"transformer_blocks.{index}", "double", block.attn, int(block.attn.heads))
            for index, block in enumerate(self.transformer.transformer_blocks)
        ]

    def generation(self, arguments: Mapping[str, Any]) -> Generation:
        pipe = self.pipe
        if getattr(pipe, "processor", None) is not None:
            # The edit pipelines put the reference image's vision tokens into the text.
            raise UnsupportedModelError(
                f"{type(pipe).__name__} puts image tokens into its text; attnscope traces "
                f"text-only Qwen-Image prompts (QwenImagePipeline and its img2img, inpaint)"
            )
        prompt = first_of(arguments.get("prompt"))
        max_len = int(arguments.get("max_sequence_length") or 512)
        scale = pipe.vae_scale_factor * pipe.default_sample_size
        names = ("prompt", "negative_prompt", "num_inference_steps", "true_cfg_scale")
        names += ("guidance_scale",)
        attrs = self.call_attrs(arguments, names) | {
            "height": int(arguments.get("height") or scale),
            "width": int(arguments.get("width") or scale),
            "max_sequence_length": max_len,
            "prompt_template": pipe.prompt_template_encode,
            "prompt_template_dropped_tokens": int(pipe.prompt_template_encode_start_idx),
        }
        if prompt is None:
            return Generation(text=TextTokens(segments=(), length=0), attrs=attrs)
        drop = int(pipe.prompt_template_encode_start_idx)
        segment = templated_segment(
            pipe.tokenizer,
            "prompt",
            prompt,
            pipe.prompt_template_encode,
            min(int(pipe.tokenizer_max_length), max_len) + drop,
            keep=slice(drop, None),
        )
        return Generation(
            text=TextTokens(segments=(segment,), length=len(segment.tokens)), attrs=attrs
        )

    def denoiser_call(self, bound: Mapping[str, Any]) -> DenoiserCall:
        # img_shapes: per sample, the (frames, rows, cols) of the generated image, then of any
        # reference images, whose tokens follow it.
        _, rows, cols = bound["img_shapes"][0][0]
        return DenoiserCall(
            timestep=self.timestep_of(bound["timestep"]),
            text_len=int(bound["encoder_hidden_states"].shape[1]),
            grid=(int(rows), int(cols)),
        )
