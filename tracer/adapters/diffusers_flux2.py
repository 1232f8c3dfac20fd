"""diffusers FLUX.2: `Flux2Pipeline` ([dev]), `Flux2KleinPipeline` and `Flux2Transformer2DModel`.

FLUX.1's layout with a chat model for text, padded to `max_sequence_length`: [dev]'s Mistral 3
reads the pipeline's system message and the prompt through its processor's chat template,
[klein]'s Qwen3 the prompt in its chat template. The joint attention puts those tokens first,
then the generated image's tokens, then any reference images' (editing), which take part in the
softmax but get no map. Guidance runs the negative prompt as a second call ([klein]) or is
embedded ([dev]).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tracer.adapters.base import Generation, Layer, UnsupportedModelError, first_of
from tracer.adapters.diffusers_flux import DiffusersFlux
from tracer.adapters.text import chat_template, templated_segment, user_turn
from tracer.spans import TextTokens


class DiffusersFlux2(DiffusersFlux):
    """Traces diffusers FLUX.2 [dev] and [klein]: chat-templated text tokens, then image tokens."""

    families = "FLUX.2 [dev], FLUX.2 [klein]"
    transformer_classes = ("Flux2Transformer2DModel",)

    @property
    def is_dev(self) -> bool:
        """Whether the pipeline is FLUX.2 [dev]'s (Mistral 3 through a processor)."""
        return hasattr(self.pipe, "_get_mistral_3_small_prompt_embeds")

    def check_attention(self, layers: list[Layer]) -> None:
        super().check_attention(layers)
        pipe = self.pipe
        # The KV pipeline attends the reference tokens in separate calls, so no call holds the
        # whole softmax; other FLUX.2 pipelines may read their text another way.
        known = self.is_dev or hasattr(pipe, "_get_qwen3_prompt_embeds")
        if not known or type(pipe).__name__.endswith("KVPipeline"):
            raise UnsupportedModelError(
                f"attnscope traces FLUX.2 through Flux2Pipeline and Flux2KleinPipeline, not "
                f"{type(pipe).__name__}: its KV-cached reference attention or its text encoding "
                f"is not supported yet"
            )

    def _template(self) -> tuple[Any, str, bool]:
        """The tokenizer, the prompt template and whether the tokenizer adds special tokens."""
        pipe = self.pipe
        if not self.is_dev:
            return (
                pipe.tokenizer,
                chat_template(user_turn(pipe.tokenizer, enable_thinking=False)),
                True,
            )
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input

        processor = pipe.tokenizer

        def render(text: str) -> str:
            messages = format_input(prompts=[text], system_message=pipe.system_message)
            rendered = processor.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=False
            )
            return rendered[0] if isinstance(rendered, list) else rendered

        template = chat_template(render)
        # The processor tokenizes without special tokens when the template begins with BOS.
        bos = processor.tokenizer.bos_token
        return processor.tokenizer, template, not (bos and template.startswith(bos))

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
        tokenizer, template, special = self._template()
        segment = templated_segment(
            tokenizer, "prompt", prompt, template, max_len, padded=True, add_special_tokens=special
        )
        attrs["prompt_template"] = template
        return Generation(text=TextTokens(segments=(segment,), length=max_len), attrs=attrs)


def _count(images: Any) -> int:
    """How many reference images an `image` argument holds."""
    if images is None:
        return 0
    return len(images) if isinstance(images, list | tuple) else 1
