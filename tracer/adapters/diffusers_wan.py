"""diffusers Wan 2.1 / 2.2: `WanPipeline` (and `WanImageToVideoPipeline`) around
`WanTransformer3DModel`.

Each block's self-attention (`attn1`) is over the video tokens alone. The text enters through
its cross-attention (`attn2`): a softmax of the video tokens' queries over the text tokens' keys.
That is `img2txt`, per latent frame; no text query ever attends the video, so Wan has no
`txt2img`.

The text: UMT5 reads the cleaned prompt padded to `max_sequence_length` (512). The pipeline keeps
the encoder's states of the real tokens and sets the padding's to zero, then the model attends all
`max_sequence_length` keys, the padding's included, unmasked. The conditional and unconditional
branches are separate transformer calls, the conditional first.

Image-to-video (Wan 2.1 I2V, `WanImageToVideoPipeline`): the context starts with the CLIP image
encoder's tokens of the conditioning image, and `attn2` attends them in a softmax of their own
(a second SDPA call, before the text's). They are their own segment, `image`, stored as one summed
row: its `img2txt` is how much of each video query's image-context attention there is (1 where
nothing is masked), apart from the text rows, whose softmax is the text's alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from analysis.errors import UnsupportedModelError
from tracer.adapters.base import DenoiserCall, Generation, Layer, first_of
from tracer.adapters.diffusers_video import DiffusersVideo
from tracer.adapters.text import padded_segment, padding_segment
from tracer.spans import TextTokens


class DiffusersWan(DiffusersVideo):
    """Traces diffusers Wan's cross-attention: video queries against UMT5 text keys."""

    families = "Wan 2.1/2.2 (text-to-video, Wan 2.1 image-to-video)"
    transformer_classes = ("WanTransformer3DModel",)
    absent_directions: ClassVar[Mapping[str, str]] = {
        "txt2img": "Wan's text enters through cross-attention, where video queries attend the "
        "text keys and no text query attends the video"
    }

    def __init__(self, pipe: Any) -> None:
        super().__init__(pipe)
        if getattr(pipe, "transformer_2", None) is not None:
            # Two experts share the steps (Wan 2.2 A14B): each step's maps would come from one
            # of two different sets of layers.
            raise UnsupportedModelError(
                f"{type(pipe).__name__} has a second transformer (transformer_2, the low-noise "
                f"expert of Wan 2.2 A14B); attnscope traces pipelines with one transformer "
                f"(Wan 2.1, Wan 2.2 TI2V-5B)"
            )
        self.image_tokens = self._image_tokens()

    def _image_tokens(self) -> int:
        """The image-conditioning tokens before the text in `attn2`'s context (0: text only)."""
        if getattr(self.transformer.config, "added_kv_proj_dim", None) is None:
            return 0
        encoder = getattr(self.pipe, "image_encoder", None)
        if encoder is None:
            raise UnsupportedModelError(
                f"{type(self.pipe).__name__}: this Wan transformer attends image-conditioning "
                f"tokens (added_kv_proj_dim), but the pipeline has no image encoder to say how "
                f"many; attnscope traces Wan 2.1 image-to-video with its CLIP encoder"
            )
        config = encoder.config
        return (int(config.image_size) // int(config.patch_size)) ** 2 + 1  # and CLIP's class

    def layers(self) -> list[Layer]:
        calls = 2 if self.image_tokens else 1  # the image context's softmax, then the text's
        return [
            Layer(f"blocks.{index}", "cross", block.attn2, int(block.attn2.heads), calls=calls)
            for index, block in enumerate(self.transformer.blocks)
        ]

    def generation(self, arguments: Mapping[str, Any]) -> Generation:
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        pipe = self.pipe
        prompt = first_of(arguments.get("prompt"))
        max_len = int(arguments.get("max_sequence_length") or 512)
        names = ("prompt", "negative_prompt", "num_inference_steps", "guidance_scale")
        attrs = (
            self.call_attrs(arguments, names)
            | {
                "height": int(arguments.get("height") or 480),
                "width": int(arguments.get("width") or 832),
                "max_sequence_length": max_len,
            }
            | self.video_attrs(arguments, num_frames=81)
        )
        length = self.image_tokens + max_len
        if prompt is None:
            return Generation(text=TextTokens(segments=(), length=length), attrs=attrs)
        segments = []
        if self.image_tokens:  # CLIP's tokens of the conditioning image, before the text
            segments.append(padding_segment("image", 0, self.image_tokens, "<image>"))
        text = prompt_clean(prompt)
        segments.append(padded_segment(pipe.tokenizer, "prompt", text, self.image_tokens, max_len))
        return Generation(text=TextTokens(segments=tuple(segments), length=length), attrs=attrs)

    def denoiser_call(self, bound: Mapping[str, Any]) -> DenoiserCall:
        frames, height, width = bound["hidden_states"].shape[-3:]  # [B, C, F, H, W]
        image = bound.get("encoder_hidden_states_image")
        return DenoiserCall(
            timestep=self.timestep_of(bound["timestep"]),
            text_len=int(bound["encoder_hidden_states"].shape[1])
            + (0 if image is None else int(image.shape[1])),
            grid=self.video_grid(frames, height, width),
        )

    @property
    def patch(self) -> tuple[int, int, int]:
        frames, rows, columns = (int(p) for p in self.transformer.config.patch_size)
        return frames, rows, columns
