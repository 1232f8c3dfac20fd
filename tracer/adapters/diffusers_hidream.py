"""diffusers HiDream-I1: `HiDreamImagePipeline` around `HiDreamImageTransformer2DModel`.

Every block's attention puts the image tokens first, then three runs of text: T5's tokens, the
tokens of the last Llama layer the model lists (carried from block to block), and the same Llama
tokens read from the Llama layer of this block's own (the config's `llama_layers`). A word of the
prompt has tokens in all three segments (`t5`, `llama`, `llama_layer`). Nothing is masked: the
image attends T5's and Llama's padding too. A non-square image's tokens are padded to the
model's `max_seq`, and the text follows that padding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from analysis.errors import UnsupportedModelError
from tracer.adapters.base import DenoiserCall, Generation, Layer, first_of
from tracer.adapters.diffusers_common import DiffusersAdapter
from tracer.adapters.text import padded_segment
from tracer.spans import TextTokens

T5_SEGMENT, LLAMA_SEGMENT, LLAMA_LAYER_SEGMENT = "t5", "llama", "llama_layer"


class DiffusersHiDream(DiffusersAdapter):
    """Traces diffusers HiDream-I1: image tokens first, then T5's, and Llama's twice."""

    families = "HiDream-I1"
    sdpa_processor = (
        "diffusers.models.transformers.transformer_hidream_image",
        "HiDreamAttnProcessor",
    )
    transformer_classes = ("HiDreamImageTransformer2DModel",)

    def layers(self) -> list[Layer]:
        layers = []
        kinds = (("double_stream_blocks", "double"), ("single_stream_blocks", "single"))
        for prefix, kind in kinds:
            for index, wrapper in enumerate(getattr(self.transformer, prefix)):
                attention = wrapper.block.attn1
                layers.append(Layer(f"{prefix}.{index}", kind, attention, int(attention.heads)))
        return layers

    def size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """The (height, width) the pipeline generates when asked for these: it keeps their aspect
        ratio at the area of its default size, on a grid of 16 pixels (its VAE's 8, 2x2 patches)."""
        pipe = self.pipe
        default = int(pipe.default_sample_size) * int(pipe.vae_scale_factor)
        height, width = height or default, width or default
        scale = math.sqrt(default**2 / (width * height))
        division = int(pipe.vae_scale_factor) * 2
        return int(height * scale // division * division), int(width * scale // division * division)

    def latent_grid(self, attrs: Mapping[str, Any]) -> tuple[int, ...]:
        # The run's height and width are those generated (`size`).
        return int(attrs["height"]) // 16, int(attrs["width"]) // 16

    def generation(self, arguments: Mapping[str, Any]) -> Generation:
        pipe = self.pipe
        prompt = first_of(arguments.get("prompt"))
        t5_prompt = first_of(arguments.get("prompt_3")) or prompt
        llama_prompt = first_of(arguments.get("prompt_4")) or prompt
        max_len = int(arguments.get("max_sequence_length") or 128)
        t5_len = min(max_len, int(pipe.tokenizer_3.model_max_length))
        llama_len = min(max_len, int(pipe.tokenizer_4.model_max_length))
        height, width = self.size(arguments.get("height"), arguments.get("width"))
        names = ("prompt", "prompt_2", "prompt_3", "prompt_4", "negative_prompt")
        names += ("num_inference_steps", "guidance_scale")
        attrs = self.call_attrs(arguments, names) | {
            "height": height,
            "width": width,
            "max_sequence_length": max_len,
        }
        segments = []
        if t5_prompt is not None:
            segments.append(padded_segment(pipe.tokenizer_3, T5_SEGMENT, t5_prompt, 0, t5_len))
        if llama_prompt is not None:
            for name, first in ((LLAMA_SEGMENT, t5_len), (LLAMA_LAYER_SEGMENT, t5_len + llama_len)):
                segment = padded_segment(pipe.tokenizer_4, name, llama_prompt, first, llama_len)
                segments.append(segment)
        text = TextTokens(
            segments=tuple(segments),
            length=t5_len + 2 * llama_len,
            prompt_segments=(T5_SEGMENT, LLAMA_SEGMENT, LLAMA_LAYER_SEGMENT),
        )
        return Generation(text=text, attrs=attrs)

    def denoiser_call(self, bound: Mapping[str, Any]) -> DenoiserCall:
        latents = bound["hidden_states"]
        batch = int(latents.shape[0])
        index = self.negative_first_index(batch)
        if latents.dim() != 4 or bound.get("hidden_states_masks") is not None:
            raise UnsupportedModelError(
                f"HiDream's transformer was called with hidden_states of shape "
                f"{list(latents.shape)}, patched by the caller; attnscope places the image "
                f"tokens of [B, C, H, W] latents, as HiDreamImagePipeline passes them"
            )
        grid = self.patched_grid(latents)
        square = latents.shape[-2] == latents.shape[-1]
        image_len = grid[0] * grid[1] if square else int(self.transformer.max_seq)
        # Llama's hidden states, per layer: [B, tokens, channels] each.
        llama_len = int(bound["encoder_hidden_states_llama3"][0].shape[1])
        return DenoiserCall(
            timestep=self.timestep_of(bound["timesteps"]),
            text_len=int(bound["encoder_hidden_states_t5"].shape[1]) + 2 * llama_len,
            grid=grid,
            text_start=image_len,
            image_start=0,
            # A guided batch is [negative, positive].
            batch_index=index,
        )
