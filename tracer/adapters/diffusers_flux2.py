"""diffusers FLUX.2 [klein]: `Flux2KleinPipeline` around `Flux2Transformer2DModel`.

FLUX.1's layout with a chat model for text: Qwen3 reads the prompt inside its chat template,
padded to `max_sequence_length`; the joint attention puts those tokens first, then the generated
image's tokens, then any reference images' (editing), which take part in the softmax but get no
map. Guidance runs the empty negative prompt as a second call.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tracer.adapters.base import Generation, Layer, UnsupportedModelError, first_of
from tracer.adapters.diffusers_flux import DiffusersFlux
from tracer.adapters.text import chat_template, templated_segment
from tracer.spans import TextTokens


class DiffusersFlux2(DiffusersFlux):
    """Traces diffusers FLUX.2 [klein]: chat-templated Qwen3 text tokens, then image tokens."""

    families = "FLUX.2 [klein]"
    transformer_classes = ("Flux2Transformer2DModel",)

    def check_attention(self, layers: list[Layer]) -> None:
        super().check_attention(layers)
        pipe = self.pipe
        # FLUX.2 [dev]'s Mistral processor is not read yet; the KV pipeline attends the reference
        # tokens in separate calls, so no call holds the whole softmax.
        if not hasattr(pipe, "_get_qwen3_prompt_embeds") or type(pipe).__name__.endswith(
            "KVPipeline"
        ):
            raise UnsupportedModelError(
                f"attnscope traces FLUX.2 through Flux2KleinPipeline (Qwen3 text), not "
                f"{type(pipe).__name__}: FLUX.2 [dev]'s Mistral processor and the KV-cached "
                f"reference attention are not supported yet"
            )

    def generation(self, arguments: Mapping[str, Any]) -> Generation:
        pipe = self.pipe
        prompt = first_of(arguments.get("prompt"))
        max_len = int(arguments.get("max_sequence_length") or 512)
        scale = pipe.vae_scale_factor * pipe.default_sample_size
        names = ("prompt", "num_inference_steps", "guidance_scale")
        attrs = self.call_attrs(arguments, names) | {
            "height": int(arguments.get("height") or scale),
            "width": int(arguments.get("width") or scale),
            "max_sequence_length": max_len,
            "reference_images": _count(arguments.get("image")),
        }
        if prompt is None:
            return Generation(text=TextTokens(segments=(), length=max_len), attrs=attrs)
        template = chat_template(pipe.tokenizer, enable_thinking=False)
        segment = templated_segment(
            pipe.tokenizer, "prompt", prompt, template, max_len, padded=True
        )
        attrs["prompt_template"] = template
        return Generation(text=TextTokens(segments=(segment,), length=max_len), attrs=attrs)


def _count(images: Any) -> int:
    """How many reference images an `image` argument holds."""
    if images is None:
        return 0
    return len(images) if isinstance(images, list | tuple) else 1
