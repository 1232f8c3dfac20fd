"""diffusers FLUX: `FluxPipeline` and its relatives around a `FluxTransformer2DModel`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from tracer.adapters.base import (
    Adapter,
    DenoiserCall,
    Generation,
    Layer,
    UnsupportedModelError,
    first_of,
    image_to_uint8,
    jsonable,
    library_versions,
    seed_of,
    token_grid,
)
from tracer.adapters.text import t5_segment
from tracer.spans import TextTokens

# FluxPipeline hands the transformer `timestep / 1000`.
_TIMESTEP_SCALE = 1000.0

# diffusers attention backends that end in torch's scaled_dot_product_attention.
SDPA_BACKENDS = ("native", "_native_math", "_native_flash", "_native_efficient", "_native_cudnn")


class DiffusersFlux(Adapter):
    """Traces diffusers FLUX pipelines: text (T5) tokens first, then the packed image tokens."""

    backend = "diffusers"

    @classmethod
    def matches(cls, pipe: Any) -> bool:
        try:
            from diffusers import FluxTransformer2DModel
        except ImportError:
            return False
        return isinstance(getattr(pipe, "transformer", None), FluxTransformer2DModel)

    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipe.transformer

    def layers(self) -> list[Layer]:
        layers = []
        for prefix, kind in (
            ("transformer_blocks", "double"),
            ("single_transformer_blocks", "single"),
        ):
            for index, block in enumerate(getattr(self.transformer, prefix)):
                name = f"{prefix}.{index}"
                layers.append(Layer(name, kind, block.attn, int(block.attn.heads)))
        return layers

    def check_attention(self, layers: list[Layer]) -> None:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry

        active = _AttentionBackendRegistry.get_active_backend()[0]
        for layer in layers:
            processor = getattr(layer.attention, "processor", None)
            backend = getattr(processor, "_attention_backend", None) or active
            name = getattr(backend, "value", backend)
            if name not in SDPA_BACKENDS:
                raise UnsupportedModelError(
                    f"{layer.name} runs its attention through diffusers' {name!r} backend; "
                    f"attnscope reads q and k at torch's scaled_dot_product_attention, so use "
                    f"one of {list(SDPA_BACKENDS)}: pipe.transformer.set_attention_backend("
                    f"'native'), or unset DIFFUSERS_ATTN_BACKEND"
                )
            if getattr(processor, "_parallel_config", None) is not None:
                raise UnsupportedModelError(
                    f"{layer.name} runs context-parallel attention; attnscope traces attention "
                    f"computed whole on one device"
                )

    def generation(self, arguments: Mapping[str, Any]) -> Generation:
        pipe = self.pipe
        prompt = first_of(arguments.get("prompt"))
        # FluxPipeline sends prompt_2 (or else prompt) to T5, whose tokens are the joint text.
        t5_prompt = first_of(arguments.get("prompt_2")) or prompt
        max_len = int(arguments.get("max_sequence_length") or 512)
        scale = getattr(pipe, "vae_scale_factor", 8) * getattr(pipe, "default_sample_size", 128)
        attrs = {
            "prompt": prompt,
            "prompt_2": first_of(arguments.get("prompt_2")),
            "negative_prompt": first_of(arguments.get("negative_prompt")),
            "seed": seed_of(arguments.get("generator")),
            "height": int(arguments.get("height") or scale),
            "width": int(arguments.get("width") or scale),
            "num_inference_steps": arguments.get("num_inference_steps"),
            "guidance_scale": arguments.get("guidance_scale"),
            "true_cfg_scale": arguments.get("true_cfg_scale"),
            "max_sequence_length": max_len,
        }
        attrs = {key: value for key, value in attrs.items() if value is not None}
        if t5_prompt is None:
            text = TextTokens(segments=(), length=max_len)
        else:
            segment = t5_segment(pipe.tokenizer_2, "prompt", t5_prompt, 0, max_len)
            text = TextTokens(segments=(segment,), length=len(segment.tokens))
        return Generation(text=text, attrs=attrs)

    def watch_denoiser(self, on_call: Callable[[DenoiserCall], None]) -> Callable[[], None]:
        grids: dict[tuple[int, ...], tuple[int, int]] = {}

        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            names = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")
            bound = dict(zip(names, args, strict=False)) | kwargs
            img_ids = bound["img_ids"]
            key = tuple(img_ids.shape)
            if key not in grids:
                grids[key] = token_grid(img_ids)
            timestep = float(bound["timestep"].reshape(-1)[0]) * _TIMESTEP_SCALE
            text_len = int(bound["encoder_hidden_states"].shape[1])
            on_call(DenoiserCall(timestep=timestep, text_len=text_len, grid=grids[key]))

        handle = self.transformer.register_forward_pre_hook(hook, with_kwargs=True)
        return handle.remove

    def schedule(self, first_timestep: float) -> tuple[np.ndarray, np.ndarray]:
        scheduler = self.pipe.scheduler
        timesteps = scheduler.timesteps.detach().float().cpu().numpy()
        sigmas = getattr(scheduler, "sigmas", None)
        sigmas = (
            sigmas.detach().float().cpu().numpy()[: len(timesteps)]
            if sigmas is not None
            else timesteps / _TIMESTEP_SCALE
        )
        start = int(np.argmin(np.abs(timesteps - first_timestep)))
        return timesteps[start:].astype(np.float64), sigmas[start:].astype(np.float64)

    def image(self, output: Any) -> np.ndarray | None:
        images = getattr(output, "images", None)
        if images is None and isinstance(output, tuple) and output:
            images = output[0]
        if images is None or isinstance(images, str) or len(images) == 0:
            return None
        return image_to_uint8(images[0])

    def run_attrs(self) -> dict[str, Any]:
        pipe, transformer = self.pipe, self.transformer
        config = getattr(transformer, "config", {})
        return super().run_attrs() | {
            "model": str(
                getattr(pipe, "name_or_path", None)
                or config.get("_name_or_path")
                or f"{type(transformer).__name__} built in code"
            ),
            "model_revision": str(config.get("_diffusers_version", "")),
            "scheduler": type(pipe.scheduler).__name__,
            "scheduler_config": jsonable(dict(pipe.scheduler.config)),
            "transformer_config": jsonable(dict(config)),
            "dtype": str(transformer.dtype).removeprefix("torch."),
            "versions": library_versions("torch", "diffusers", "transformers", "attnscope"),
        }
