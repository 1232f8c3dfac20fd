"""One adapter per model family; `adapter_for(pipe)` picks the one that fits."""

from __future__ import annotations

from typing import Any

from tracer.adapters.base import Adapter, UnsupportedModelError
from tracer.adapters.diffsynth_flux import DiffSynthFlux
from tracer.adapters.diffusers_flux import DiffusersFlux

ADAPTERS: list[type[Adapter]] = [DiffusersFlux, DiffSynthFlux]


def adapter_for(pipe: Any) -> Adapter:
    """The adapter for `pipe`, or UnsupportedModelError naming the supported families."""
    for adapter in ADAPTERS:
        if adapter.matches(pipe):
            return adapter(pipe)
    supported = ", ".join(f"{a.backend} ({a.__doc__.splitlines()[0]})" for a in ADAPTERS)
    raise UnsupportedModelError(
        f"attnscope can't trace a {type(pipe).__module__}.{type(pipe).__name__}; "
        f"supported: {supported}"
    )


__all__ = ["ADAPTERS", "Adapter", "UnsupportedModelError", "adapter_for"]
