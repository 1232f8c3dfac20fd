"""What every diffusers pipeline adapter shares: the transformer, scheduler, output and versions.

A family adapter says which transformer classes it traces, how its denoiser call lays out the
joint sequence (`denoiser_call`), and how its prompts become text tokens (`generation`).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from abc import abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np
import torch

from tracer.adapters.base import (
    Adapter,
    DenoiserCall,
    Layer,
    UnsupportedModelError,
    first_of,
    image_to_uint8,
    jsonable,
    library_versions,
    seed_of,
)

# diffusers attention backends that end in torch's scaled_dot_product_attention.
SDPA_BACKENDS = ("native", "_native_math", "_native_flash", "_native_efficient", "_native_cudnn")


class DiffusersAdapter(Adapter):
    """A diffusers pipeline whose `transformer` is one of `transformer_classes`."""

    backend = "diffusers"
    transformer_classes: ClassVar[tuple[str, ...]]  # class names in the `diffusers` namespace
    # What the pipeline divides scheduler timesteps by before handing them to the transformer.
    timestep_scale: ClassVar[float] = 1.0
    # (module, class) of the processor a family's attention must run when it calls torch's SDPA
    # itself instead of going through `dispatch_attention_fn`.
    sdpa_processor: ClassVar[tuple[str, str] | None] = None

    @classmethod
    def matches(cls, pipe: Any) -> bool:
        import diffusers

        classes = tuple(
            getattr(diffusers, name) for name in cls.transformer_classes if hasattr(diffusers, name)
        )
        return bool(classes) and isinstance(getattr(pipe, "transformer", None), classes)

    @property
    def transformer(self) -> torch.nn.Module:
        """The denoiser."""
        return self.pipe.transformer

    @abstractmethod
    def denoiser_call(self, bound: Mapping[str, Any]) -> DenoiserCall:
        """The step and token layout of one transformer call, from its bound arguments."""

    def watch_denoiser(self, on_call: Callable[[DenoiserCall], None]) -> Callable[[], None]:
        signature = inspect.signature(self.transformer.forward)
        latents = next(iter(signature.parameters))  # every family's first: hidden_states, x

        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            arguments = signature.bind_partial(*args, **kwargs).arguments
            given = arguments.get(latents)
            if isinstance(given, (list, tuple)) and given:  # Z-Image: one tensor per image
                given = given[0]
            dtype = getattr(given, "dtype", None)
            on_call(dataclasses.replace(self.denoiser_call(arguments), dtype=dtype))

        handle = self.transformer.register_forward_pre_hook(hook, with_kwargs=True)
        return handle.remove

    def check_attention(self, layers: list[Layer]) -> None:
        """Processors that go through `dispatch_attention_fn` (most, in diffusers 0.42) need a
        backend that ends in torch's SDPA, on one device; a family whose processor calls SDPA
        itself names that processor (`sdpa_processor`), and every layer must run it."""
        if self.sdpa_processor is not None:
            self._require_processor(layers)
            return
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

    def _require_processor(self, layers: list[Layer]) -> None:
        module, name = self.sdpa_processor
        wanted = getattr(importlib.import_module(module), name)
        for layer in layers:
            processor = getattr(layer.attention, "processor", None)
            if not isinstance(processor, wanted):
                raise UnsupportedModelError(
                    f"{layer.name} runs its attention through {type(processor).__name__}; "
                    f"attnscope reads q and k at torch's scaled_dot_product_attention, which "
                    f"{name} calls: pipe.transformer.set_attn_processor({name}())"
                )

    def patched_grid(self, latents: torch.Tensor) -> tuple[int, int]:
        """The token grid of `[B, C, H, W]` latents cut into the transformer's square patches."""
        patch = int(self.transformer.config.patch_size)
        return int(latents.shape[-2]) // patch, int(latents.shape[-1]) // patch

    def negative_first_index(self, batch: int, guided: bool | None = None) -> int:
        """The conditional generation's index in a `[negative, positive]` guided batch of size
        `batch` (the first of its second half), or 0 unguided. `guided`: whether this call is
        guided, where the pipeline has no `do_classifier_free_guidance` to say so."""
        if guided is None:
            guided = bool(getattr(self.pipe, "do_classifier_free_guidance", False))
        return batch // 2 if guided and batch % 2 == 0 else 0

    def timestep_of(self, timestep: Any) -> float:
        """The scheduler timestep of a transformer's `timestep` argument."""
        return float(torch.as_tensor(timestep).reshape(-1)[0]) * self.timestep_scale

    def call_attrs(self, arguments: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
        """The run attributes these call arguments give (the first of a batch, None dropped)."""
        attrs = {name: first_of(arguments.get(name)) for name in names}
        attrs["seed"] = seed_of(arguments.get("generator"))
        return {key: value for key, value in attrs.items() if value is not None}

    def schedule(self, first_timestep: float) -> tuple[np.ndarray, np.ndarray]:
        scheduler = self.pipe.scheduler
        timesteps = scheduler.timesteps.detach().float().cpu().numpy()
        sigmas = getattr(scheduler, "sigmas", None)
        sigmas = (
            sigmas.detach().float().cpu().numpy()[: len(timesteps)]
            if sigmas is not None
            else timesteps / 1000.0
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
