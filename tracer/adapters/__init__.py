"""One adapter per model family; `adapter_for(pipe)` picks the one that fits."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tracer.adapters.base import Adapter, UnsupportedModelError
from tracer.adapters.diffsynth_flux import DiffSynthFlux
from tracer.adapters.diffusers_cogvideox import DiffusersCogVideoX
from tracer.adapters.diffusers_cogview4 import DiffusersCogView4
from tracer.adapters.diffusers_flux import DiffusersFlux
from tracer.adapters.diffusers_flux2 import DiffusersFlux2
from tracer.adapters.diffusers_hidream import DiffusersHiDream
from tracer.adapters.diffusers_hunyuan_video15 import DiffusersHunyuanVideo15
from tracer.adapters.diffusers_lumina2 import DiffusersLumina2
from tracer.adapters.diffusers_qwen_image import DiffusersQwenImage
from tracer.adapters.diffusers_sana import DiffusersSana
from tracer.adapters.diffusers_sd3 import DiffusersSD3
from tracer.adapters.diffusers_wan import DiffusersWan
from tracer.adapters.diffusers_z_image import DiffusersZImage

ADAPTERS: list[type[Adapter]] = [
    DiffusersFlux,
    DiffusersFlux2,
    DiffusersSD3,
    DiffusersQwenImage,
    DiffusersSana,
    DiffusersZImage,
    DiffusersLumina2,
    DiffusersCogView4,
    DiffusersHiDream,
    DiffusersWan,
    DiffusersCogVideoX,
    DiffusersHunyuanVideo15,
    DiffSynthFlux,
]


def adapter_for(pipe: Any, entity_names: Sequence[str] | None = None) -> Adapter:
    """The adapter for `pipe`, or UnsupportedModelError naming the supported families.

    `entity_names` names EliGen entity spans, for the families that have entities.
    """
    for adapter in ADAPTERS:
        if adapter.matches(pipe):
            if entity_names is None:
                return adapter(pipe)
            if adapter is not DiffSynthFlux:
                raise ValueError(
                    f"entity_names {list(entity_names)} given, but a {adapter.backend} pipeline "
                    f"has no EliGen entities; only diffsynth FluxImagePipeline runs have them"
                )
            return adapter(pipe, entity_names=entity_names)
    supported = ", ".join(f"{a.backend} ({a.families})" for a in ADAPTERS)
    raise UnsupportedModelError(
        f"attnscope can't trace a {type(pipe).__module__}.{type(pipe).__name__}; "
        f"supported: {supported}"
    )


__all__ = ["ADAPTERS", "Adapter", "UnsupportedModelError", "adapter_for"]
