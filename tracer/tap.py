"""Seeing q, k and the mask of an attention without editing the model.

Each traced attention module gets a `diffusers.hooks.ModelHook` in its `HookRegistry`, the
mechanism diffusers' own hooks (group offloading, caches, layer skipping) use, so they compose:
hooks added before or during a trace keep running, and detaching removes only attnscope's. While
the hooked forward runs and the recorder wants that call, a TorchFunctionMode watches for the
module's `scaled_dot_product_attention` call: it runs the call exactly as the model made it, then
hands the same q, k, mask and scale to the recorder. The model's own kernels, inputs and order are
untouched, so its output is bit-for-bit what it was.

Where the kernel torch picks for that call also computes each query's log-sum-exp over all keys
(CPU flash attention; CUDA flash and memory-efficient attention), the call is made through that
same kernel's aten op, which returns the log-sum-exp beside the output: the output is the same
tensor SDPA would have returned, and the recorder gets the normaliser of every softmax row for
free instead of recomputing it (`fetch_lse=False` always recomputes). Any other call (math or
cuDNN kernel, dropout, causal, GQA, autograd) runs exactly as the model made it, with no
log-sum-exp.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook
from torch.overrides import TorchFunctionMode

from analysis.errors import TapError

# Names of this module's own, so that a benchmark times the model's attention calls (these) apart
# from the capture's fused calls (bench/overhead.py).
from tracer.kernels import lse_kernel as _lse_kernel
from tracer.kernels import run_with_lse as _run_with_lse

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


@dataclass(frozen=True)
class AttentionCall:
    """The inputs of one SDPA call: q, k as [B, H, N, D], the mask as the model passed it.

    `lse`, when the kernel gave it, is float32 [B, H, N]: for each query row, the natural
    log-sum-exp over all keys of q·kᵀ·scale + mask, as the kernel computed it (0 for a row the
    mask forbids entirely).
    """

    query: torch.Tensor
    key: torch.Tensor
    mask: torch.Tensor | None
    scale: float
    lse: torch.Tensor | None = None


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


class _SdpaCalls(TorchFunctionMode):
    """Runs every torch call unchanged and reports the first `count` SDPA calls' inputs (and
    lse), in order."""

    def __init__(
        self,
        on_call: Callable[[AttentionCall], None],
        checked: dict[tuple, bool],
        fetch_lse: bool,
        count: int = 1,
    ) -> None:
        super().__init__()
        self.on_call = on_call
        self.checked = checked
        self.fetch_lse = fetch_lse
        self.count = count
        self.seen = 0
        self.lse_from_kernel = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # Only the first calls are the traced attention's (one joint attention, or Wan
        # image-to-video's image and text cross-attentions); later ones (IP-adapter tokens) not.
        if func is not _SDPA or self.seen == self.count:
            return func(*args, **kwargs)
        self.seen += 1
        call = _read_call(args, kwargs)
        bound = dict(zip(_SDPA_PARAMS, args, strict=False)) | kwargs
        kernel = _lse_kernel(bound) if self.fetch_lse else None
        signature = None
        if kernel is not None and kernel != "cpu_flash":
            # Accelerator kernels are checked once per call signature against SDPA itself (one
            # extra attention per run); a mismatch turns the lse path off for that signature.
            q = bound["query"]
            signature = (kernel, q.device, q.dtype, tuple(q.shape), tuple(bound["key"].shape))
            if self.checked.get(signature) is False:
                kernel = None
        if kernel is None:
            out, lse = func(*args, **kwargs), None
        else:
            out, lse = _run_with_lse(kernel, bound)
            if signature is not None and signature not in self.checked:
                reference = func(*args, **kwargs)
                self.checked[signature] = torch.equal(out, reference)
                if not self.checked[signature]:
                    out, lse = reference, None
        self.lse_from_kernel = lse is not None
        self.on_call(replace(call, lse=lse))
        return out


HOOK_NAME = "attnscope.tap"


class _TapHook(ModelHook):
    """The tap on one attention module, as a hook of the module's diffusers HookRegistry."""

    def __init__(self, tap: AttentionTap, name: str) -> None:
        super().__init__()
        self.tap = tap
        self.name = name

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        forward = self.fn_ref.original_forward
        tap = self.tap
        if not tap.wants(self.name):
            return forward(*args, **kwargs)
        fetch_lse = tap.fetch_lse and self.name not in tap.no_lse
        count = tap.calls.get(self.name, 1)
        mode = _SdpaCalls(lambda call: tap.on_call(self.name, call), tap._checked, fetch_lse, count)
        with mode:
            out = forward(*args, **kwargs)
        if not mode.seen:
            raise TapError(
                f"{self.name}: saw no torch scaled_dot_product_attention call in this attention. "
                f"attnscope reads q and k there; set the model's attention backend to "
                f"PyTorch's native SDPA (diffusers: set_attention_backend('native'))"
            )
        if mode.seen < count:
            raise TapError(
                f"{self.name}: saw {mode.seen} scaled_dot_product_attention calls, expected "
                f"{count} (one per group of keys this attention has)"
            )
        if mode.lse_from_kernel:
            tap.lse_calls["kernel"] += 1
        else:
            tap.lse_calls["recompute"] += 1
        return out


class AttentionTap:
    """Hooks the named attention modules so their SDPA inputs can be read.

    `fetch_lse` takes each row's log-sum-exp from the model's own kernel where it can, except for
    the modules in `no_lse`, whose maps need none (a cross-attention's normalisers are over its
    few text keys): their kernel runs as the model calls it. `lse_calls` counts the calls whose
    normalisers came from the kernel and those left to recompute. `calls`: how many SDPA calls
    of a module's forward are reported (default 1), where it attends groups of keys in softmaxes
    of their own.
    """

    def __init__(
        self,
        modules: dict[str, torch.nn.Module],
        wants: Callable[[str], bool],
        on_call: Callable[[str, AttentionCall], None],
        *,
        fetch_lse: bool = True,
        no_lse: Collection[str] = (),
        calls: Mapping[str, int] | None = None,
    ) -> None:
        self.modules = modules
        self.calls = dict(calls or {})
        self.wants = wants
        self.on_call = on_call
        self.fetch_lse = fetch_lse
        self.no_lse = frozenset(no_lse)
        self.lse_calls = {"kernel": 0, "recompute": 0}
        self._attached: list[tuple[torch.nn.Module, bool]] = []  # (module, registry was ours)
        self._checked: dict[tuple, bool] = {}  # lse kernels checked against SDPA (accelerators)

    def attach(self) -> None:
        """Register the tap's hook on every module (idempotent)."""
        if self._attached:
            return
        for name, module in self.modules.items():
            ours = not hasattr(module, "_diffusers_hook")
            registry = HookRegistry.check_if_exists_or_initialize(module)
            registry.register_hook(_TapHook(self, name), HOOK_NAME)
            self._attached.append((module, ours))

    def detach(self) -> None:
        """Remove the tap's hooks; the modules' other hooks stay as they are."""
        while self._attached:
            module, ours = self._attached.pop()
            registry = module._diffusers_hook
            registry.remove_hook(HOOK_NAME, recurse=False)
            if ours and not registry.hooks:
                # Nothing else was hooked here meanwhile: leave the module as it was found.
                del module._diffusers_hook
                if (
                    getattr(module.__dict__.get("forward"), "__func__", None)
                    is type(module).forward
                ):
                    del module.forward
