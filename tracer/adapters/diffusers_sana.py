"""diffusers Sana: `SanaPipeline` around `SanaTransformer2DModel`.

Each block's self-attention over the image is linear: it has no softmax, so no map. Its
cross-attention (`attn2`) is a softmax of the image tokens' queries over the text tokens' keys:
that is `img2txt`, and no text query ever attends the image, so Sana has no `txt2img`.

The text: Gemma2 reads the lower-cased prompt after the pipeline's long instruction, padded; the
first token and the last `max_sequence_length - 1` stay, with the padding masked. Guided batches
are `[negative, positive]`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from tracer.adapters.base import (
    DenoiserCall,
    Generation,
    Layer,
    first_of,
)
from tracer.adapters.diffusers_common import DiffusersAdapter
from tracer.adapters.text import prompt_template, templated_segment
from tracer.spans import TextTokens


class DiffusersSana(DiffusersAdapter):
    """Traces diffusers Sana's cross-attention: image queries against Gemma2 text keys."""

    families = "Sana"
    sdpa_processor = ("diffusers.models.transformers.sana_transformer", "SanaAttnProcessor2_0")
    transformer_classes = ("SanaTransformer2DModel",)
    absent_directions: ClassVar[Mapping[str, str]] = {
        "txt2img": "Sana's text enters through cross-attention, where image queries attend the "
        "text keys and no text query attends the image (its self-attention is linear, with no "
        "softmax map)"
    }

    def layers(self) -> list[Layer]:
        return [
            Layer(f"transformer_blocks.{index}", "cross", block.attn2, int(block.attn2.heads))
            for index, block in enumerate(self.transformer.transformer_blocks)
            if getattr(block, "attn2", None) is not None
        ]

    def latent_grid(self, attrs: Mapping[str, Any]) -> tuple[int, ...]:
        # A deep-compression autoencoder (32× in diffusers' Sana) and 1×1 patches.
        pixels = int(self.pipe.vae_scale_factor) * int(self.transformer.config.patch_size)
        return int(attrs["height"]) // pixels, int(attrs["width"]) // pixels

    def timestep_of(self, timestep: Any) -> float:
        # The pipeline hands the transformer the scheduler's timestep times this config value.
        return super().timestep_of(timestep) / float(self.transformer.config.timestep_scale)

    def generation(self, arguments: Mapping[str, Any]) -> Generation:
        pipe = self.pipe
        prompt = first_of(arguments.get("prompt"))
        max_len = int(arguments.get("max_sequence_length") or 300)
        instruction = arguments.get("complex_human_instruction") or []
        scale = pipe.vae_scale_factor * int(pipe.transformer.config.sample_size)
        names = ("prompt", "negative_prompt", "num_inference_steps", "guidance_scale")
        attrs = self.call_attrs(arguments, names) | {
            "height": int(arguments.get("height") or scale),
            "width": int(arguments.get("width") or scale),
            "max_sequence_length": max_len,
            "complex_human_instruction": list(instruction),
        }
        if prompt is None:
            return Generation(text=TextTokens(segments=(), length=max_len), attrs=attrs)
        # What the tokenizer reads: the prompt as the pipeline cleans it (lower-cased, stripped).
        text = pipe._text_preprocessing(prompt, clean_caption=bool(arguments.get("clean_caption")))
        prefix = "\n".join(instruction)
        length = max_len
        if prefix:
            length = len(pipe.tokenizer.encode(prefix)) + max_len - 2
        segment = templated_segment(
            pipe.tokenizer,
            "prompt",
            text[0],
            prompt_template(prefix),
            length,
            keep=[0, *range(-max_len + 1, 0)],
            padded=True,
            padding_side="right",  # as the pipeline sets it
        )
        return Generation(text=TextTokens(segments=(segment,), length=max_len), attrs=attrs)

    def denoiser_call(self, bound: Mapping[str, Any]) -> DenoiserCall:
        latents = bound["hidden_states"]  # [B, C, H, W]
        grid = self.patched_grid(latents)
        return DenoiserCall(
            timestep=self.timestep_of(bound["timestep"]),
            text_len=int(bound["encoder_hidden_states"].shape[1]),
            grid=grid,
            # A guided batch is [negative, positive].
            batch_index=self.negative_first_index(int(latents.shape[0])),
        )
