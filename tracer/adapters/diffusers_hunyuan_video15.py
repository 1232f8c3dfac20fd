"""diffusers HunyuanVideo 1.5 text-to-video: `HunyuanVideo15Pipeline` around
`HunyuanVideo15Transformer3DModel`.

Each block's attention is joint: the video tokens first (frame by frame, each frame row-major),
then the context, in one softmax. The model lays the context out per sample as its valid tokens
first, then the masked ones: the image-conditioning tokens (none valid in text-to-video), the
ByT5 tokens of the prompt's quoted text (`glyph`, where the prompt quotes any), the Qwen2.5-VL
tokens of the prompt in the pipeline's chat template with its system part dropped (`prompt`);
then every masked position (the image tokens, each encoder's padding), which no query attends
and whose own rows the mask forbids: one padding row, exactly zero. Conditional and
unconditional are separate calls, the conditional first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from analysis.errors import UnsupportedModelError
from tracer.adapters.base import DenoiserCall, Generation, Layer, first_of
from tracer.adapters.diffusers_video import DiffusersVideo
from tracer.adapters.text import chat_template, padding_segment, templated_segment
from tracer.spans import Segment, TextTokens


def hunyuan_video15_turn(pipe: Any) -> Callable[[str], str]:
    """`render` for `chat_template`: the pipeline's system message and one user turn, with the
    generation prompt, as its `format_text_input` and chat template make them."""
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import format_text_input

    def render(text: str) -> str:
        (conversation,) = format_text_input([text], pipe.system_message)
        return pipe.tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True
        )

    return render


class DiffusersHunyuanVideo15(DiffusersVideo):
    """Traces diffusers HunyuanVideo 1.5's joint attention: video tokens, then the context."""

    families = "HunyuanVideo 1.5 text-to-video"
    transformer_classes = ("HunyuanVideo15Transformer3DModel",)

    def __init__(self, pipe: Any) -> None:
        super().__init__(pipe)
        if type(pipe).__name__ != "HunyuanVideo15Pipeline":
            raise UnsupportedModelError(
                f"{type(pipe).__name__}: attnscope traces HunyuanVideo 1.5's text-to-video "
                f"pipeline (HunyuanVideo15Pipeline); image-to-video conditions on image tokens "
                f"it does not lay out yet"
            )

    def layers(self) -> list[Layer]:
        return [
            Layer(f"transformer_blocks.{index}", "double", block.attn, int(block.attn.heads))
            for index, block in enumerate(self.transformer.transformer_blocks)
        ]

    @property
    def patch(self) -> tuple[int, int, int]:
        config = self.transformer.config
        return int(config.patch_size_t), int(config.patch_size), int(config.patch_size)

    def generation(self, arguments: Mapping[str, Any]) -> Generation:
        from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import (
            extract_glyph_texts,
        )

        pipe = self.pipe
        prompt = first_of(arguments.get("prompt"))
        names = ("prompt", "negative_prompt", "num_inference_steps")
        height = arguments.get("height") or pipe.target_size
        width = arguments.get("width") or pipe.target_size
        attrs = (
            self.call_attrs(arguments, names)
            | {"height": int(height), "width": int(width)}
            | {"guidance_scale": float(getattr(pipe.guider, "guidance_scale", 1.0))}
            | self.video_attrs(arguments, num_frames=121)
        )
        max_len, crop = int(pipe.tokenizer_max_length), int(pipe.prompt_template_encode_start_idx)
        length = int(pipe.vision_num_semantic_tokens) + int(pipe.tokenizer_2_max_length) + max_len
        if prompt is None:
            return Generation(text=TextTokens(segments=(), length=length), attrs=attrs)
        kept = templated_segment(
            pipe.tokenizer,
            "prompt",
            prompt or " ",
            chat_template(hunyuan_video15_turn(pipe)),
            max_len + crop,
            keep=slice(crop, None),
            padded=True,
            add_special_tokens=False,
        )
        segments = []
        glyph = extract_glyph_texts(prompt)
        if glyph is not None:
            segments.append(
                _byte_segment(pipe.tokenizer_2, glyph, int(pipe.tokenizer_2_max_length))
            )
        segments.append(_valid(kept, first=sum(len(s.tokens) for s in segments)))
        first = sum(len(s.tokens) for s in segments)
        # Every masked position: padding no query attends.
        segments.append(padding_segment("masked", first, length - first))
        return Generation(text=TextTokens(segments=tuple(segments), length=length), attrs=attrs)

    def denoiser_call(self, bound: Mapping[str, Any]) -> DenoiserCall:
        frames, height, width = bound["hidden_states"].shape[-3:]  # [B, C, F, H, W]
        grid = self.video_grid(frames, height, width)
        context = sum(
            int(bound[name].shape[1])
            for name in ("encoder_hidden_states", "encoder_hidden_states_2", "image_embeds")
        )
        return DenoiserCall(
            timestep=self.timestep_of(bound["timestep"]),
            text_len=context,
            grid=grid,
            text_start=grid[0] * grid[1] * grid[2],
            image_start=0,
        )


def _valid(segment: Segment, first: int) -> Segment:
    """`segment`'s unmasked tokens only, from `first`: the model moves the rest to the end."""
    keep = [i for i, pad in enumerate(segment.padding) if not pad]
    return Segment(
        name=segment.name,
        text=segment.text,
        first=first,
        tokens=tuple(segment.tokens[i] for i in keep),
        offsets=tuple(segment.offsets[i] for i in keep),
        content=tuple(segment.content[i] for i in keep),
    )


def _byte_segment(tokenizer: Any, text: str, length: int) -> Segment:
    """ByT5's tokens of `text` (one per UTF-8 byte, then `</s>`), up to `length`, at 0: each
    byte's offsets are its character's."""
    ids = tokenizer(text, max_length=length, truncation=True, add_special_tokens=True)["input_ids"]
    offsets = [(i, i + 1) for i, char in enumerate(text) for _ in char.encode("utf-8")]
    offsets = (offsets + [(len(text), len(text))] * len(ids))[: len(ids)]
    return Segment(
        name="glyph",
        text=text,
        first=0,
        tokens=tuple(tokenizer.convert_ids_to_tokens(ids)),
        offsets=tuple(offsets),
        content=tuple(start < end for start, end in offsets),
    )
