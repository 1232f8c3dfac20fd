"""Seeing q, k and the mask of an attention without editing the model.

Each traced attention module gets its `forward` wrapped (per instance, restored on detach). While a
wrapped forward runs and the recorder wants that call, a TorchFunctionMode watches for the
module's `scaled_dot_product_attention` call: it runs the call exactly as the model made it, then
hands the same q, k, mask and scale to the recorder. The model's own kernels, inputs and order are
untouched, so its output is bit-for-bit what it was.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_SDPA = F.scaled_dot_product_attention
_SDPA_PARAMS = (
    "query",
    "key",
    "value",
    "attn_mask",
    "dropout_p",
    "is_causal",
    "scale",
    "enable_gqa",
)


class TapError(RuntimeError):
    """An attention could not be traced (no SDPA call seen, or one attnscope can't read)."""


@dataclass(frozen=True)
class AttentionCall:
    """The inputs of one SDPA call: q, k as [B, H, N, D], the mask as the model passed it."""

    query: torch.Tensor
    key: torch.Tensor
    mask: torch.Tensor | None
    scale: float


def _read_call(args: Sequence[Any], kwargs: dict[str, Any]) -> AttentionCall:
    bound = dict(zip(_SDPA_PARAMS, args, strict=False)) | kwargs
    if bound.get("is_causal"):
        raise TapError("causal attention is not a joint text/image attention; attnscope skips it")
    query, key = bound["query"], bound["key"]
    if query.ndim != 4 or key.ndim != 4 or query.shape[1] != key.shape[1]:
        raise TapError(
            f"expected q, k of shape [B, H, N, D] with the same heads, got {tuple(query.shape)} "
            f"and {tuple(key.shape)}"
        )
    scale = bound.get("scale")
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    return AttentionCall(query=query, key=key, mask=bound.get("attn_mask"), scale=scale)


class _FirstSdpa(TorchFunctionMode):
    """Runs every torch call unchanged and reports the first SDPA call's inputs."""

    def __init__(self, on_call: Callable[[AttentionCall], None]) -> None:
        super().__init__()
        self.on_call = on_call
        self.seen = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # Only the first call is the joint attention; later ones (IP-adapter tokens) are not.
        if func is _SDPA and not self.seen:
            self.seen = True
            self.on_call(_read_call(args, kwargs))
        return out


class AttentionTap:
    """Wraps the forward of the named attention modules so their SDPA inputs can be read."""

    def __init__(
        self,
        modules: dict[str, torch.nn.Module],
        wants: Callable[[str], bool],
        on_call: Callable[[str, AttentionCall], None],
    ) -> None:
        self.modules = modules
        self.wants = wants
        self.on_call = on_call
        self._restore: list[tuple[torch.nn.Module, Any]] = []

    def attach(self) -> None:
        """Wrap every module's forward (idempotent)."""
        if self._restore:
            return
        for name, module in self.modules.items():
            previous = module.__dict__.get("forward")
            module.forward = self._wrap(name, module.forward)
            self._restore.append((module, previous))

    def detach(self) -> None:
        """Restore every module's forward exactly as it was."""
        while self._restore:
            module, previous = self._restore.pop()
            if previous is None:
                del module.forward
            else:
                module.forward = previous

    def _wrap(self, name: str, forward: Callable[..., Any]) -> Callable[..., Any]:
        def traced_forward(*args: Any, **kwargs: Any) -> Any:
            if not self.wants(name):
                return forward(*args, **kwargs)
            mode = _FirstSdpa(lambda call: self.on_call(name, call))
            with mode:
                out = forward(*args, **kwargs)
            if not mode.seen:
                raise TapError(
                    f"{name}: saw no torch scaled_dot_product_attention call in this attention. "
                    f"attnscope reads q and k there; set the model's attention backend to "
                    f"PyTorch's native SDPA (diffusers: set_attention_backend('native'))"
                )
            return out

        return traced_forward
