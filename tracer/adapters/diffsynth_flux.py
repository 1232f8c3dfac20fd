"""DiffSynth-Studio FLUX.1: `FluxImagePipeline` around a `FluxDiT`, EliGen regional prompts too.

How DiffSynth lays out the joint attention (``model_fn_flux_image`` and
``FluxDiT.process_entity_masks``): the T5 tokens of each EliGen entity prompt (each
``t5_sequence_length`` long), then those of the global prompt, then the image tokens in row-major
latent-grid order, in the double blocks (``blocks.i``, ``FluxJointAttention``) and the single blocks
(``single_blocks.i``, whose attention is a method of the block) alike. EliGen's regional mask
(``FluxDiT.construct_mask``: 0 where allowed, -inf elsewhere) reaches the same
``scaled_dot_product_attention`` call the tracer reads, so the stored maps honour it.

The denoiser is known through ``pipe.model_fn``, the function the pipeline's step loop calls once
per model evaluation (posi first, then nega under CFG) with every input by keyword: the adapter
wraps that instance attribute for the duration of the trace and reads the token layout and the
step index (``progress_id``) from the call.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from analysis.errors import UsageError
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
    token_grid,
)
from tracer.adapters.text import padded_segment
from tracer.spans import TextTokens

# Call arguments whose feature changes the token layout in a way attnscope can't map yet.
_UNSUPPORTED_ARGUMENTS = {
    "kontext_images": "FLUX Kontext appends reference-image tokens after the generated image's",
    "step1x_reference_image": (
        "Step1X-Edit replaces the T5 text with an LLM embedding and appends reference-image tokens"
    ),
    "flux_redux_image": "FLUX Redux replaces the prompt's T5 tokens with image tokens",
    "insert_anything_source_image": "Insert Anything runs FLUX Redux on a diptych",
    "tea_cache_l1_thresh": "TeaCache skips the transformer blocks on some steps",
}
# Inputs of `model_fn` that would break the layout even if a caller bypassed the checks above.
_UNSUPPORTED_MODEL_INPUTS = ("kontext_latents", "step1x_llm_embedding", "step1x_reference_latents")
_SUPPORTED = (
    "text-to-image with EliGen entity prompts and masks, CFG (the conditional branch is "
    "recorded), DiffSynth's VRAM management, and the features that keep FLUX's text-then-image "
    "token layout (image-to-image, IP-Adapter, ControlNet, LoRA)"
)
_MISSING = object()


def _round_up(value: int, factor: int) -> int:
    return math.ceil(value / factor) * factor


def box_mask(height: int, width: int, box: tuple[int, int, int, int]) -> Any:
    """An EliGen entity mask as DiffSynth takes it: an RGB image, white inside ``box``.

    ``box`` is ``(left, top, right, bottom)`` in pixels, right and bottom excluded.
    """
    from PIL import Image

    left, top, right, bottom = box
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[top:bottom, left:right] = 255
    return Image.fromarray(pixels)


def applied_entity_mask(mask: Any, height: int, width: int) -> np.ndarray:
    """An EliGen mask image as DiffSynth applies it: a (height/16, width/16) bool token grid.

    DiffSynth resizes the mask (nearest) to the latent grid, `height/8 x width/8`, and keeps the
    pixels whose mean RGB is above mid-grey (`preprocess_image(...).mean(dim=1) > 0`); a token is
    inside when any latent pixel of its 2x2 patch is. So a store's mask is exactly the region the
    model's attention mask allowed.
    """
    from PIL import Image

    if not hasattr(mask, "resize"):
        raise UsageError(
            f"EliGen entity masks are PIL images (DiffSynth resizes them), got "
            f"{type(mask).__name__}"
        )
    small = mask.convert("RGB").resize((width // 8, height // 8), resample=Image.NEAREST)
    inside = np.asarray(small, dtype=np.float64).mean(axis=-1) > 127.5
    rows, cols = inside.shape[0] // 2, inside.shape[1] // 2
    return inside[: 2 * rows, : 2 * cols].reshape(rows, 2, cols, 2).any(axis=(1, 3))


class DiffSynthFlux(Adapter):
    """DiffSynth-Studio FLUX.1 (`FluxImagePipeline` with a `FluxDiT`), EliGen entities included."""

    backend = "diffsynth"
    families = "DiffSynth-Studio FLUX.1 (`FluxImagePipeline` with a `FluxDiT`), EliGen included"

    def __init__(self, pipe: Any, entity_names: Sequence[str] | None = None) -> None:
        """Trace `pipe`; `entity_names` names the EliGen entities' spans (default entity0, ...)."""
        super().__init__(pipe)
        if isinstance(entity_names, str):
            entity_names = [entity_names]
        self.entity_names = None if entity_names is None else list(entity_names)
        if self.entity_names is not None:
            bad = [n for n in self.entity_names if not isinstance(n, str) or not n.strip()]
            duplicates = sorted({n for n in self.entity_names if self.entity_names.count(n) > 1})
            if bad or duplicates or "prompt" in self.entity_names:
                raise ValueError(
                    f"entity_names must be distinct non-empty strings other than 'prompt' (the "
                    f"global prompt's span), got {self.entity_names}"
                )
        self._check_blocks()

    @classmethod
    def matches(cls, pipe: Any) -> bool:
        try:
            from diffsynth.models.flux_dit import FluxDiT
            from diffsynth.pipelines.flux_image import FluxImagePipeline
        except ImportError:
            return False
        return isinstance(pipe, FluxImagePipeline) and isinstance(
            getattr(pipe, "dit", None), FluxDiT
        )

    @property
    def dit(self) -> torch.nn.Module:
        """The pipeline's FluxDiT."""
        return self.pipe.dit

    def _check_blocks(self) -> None:
        from diffsynth.models.flux_dit import FluxJointTransformerBlock, FluxSingleTransformerBlock

        for prefix, kind in (
            ("blocks", FluxJointTransformerBlock),
            ("single_blocks", FluxSingleTransformerBlock),
        ):
            for index, block in enumerate(getattr(self.dit, prefix)):
                if not isinstance(block, kind):
                    raise UnsupportedModelError(
                        f"dit.{prefix}.{index} is a {type(block).__name__}, not DiffSynth's "
                        f"{kind.__name__}; attnscope knows where FluxDiT's own blocks attend"
                    )

    def layers(self) -> list[Layer]:
        layers = [
            Layer(f"blocks.{i}", "double", block.attn, int(block.attn.num_heads))
            for i, block in enumerate(self.dit.blocks)
        ]
        # A single block's attention is its `process_attention` method, not a submodule: the
        # block is the module whose SDPA call is read (its first one; IP-Adapter's comes after).
        layers += [
            Layer(f"single_blocks.{i}", "single", block, int(block.num_heads))
            for i, block in enumerate(self.dit.single_blocks)
        ]
        return layers

    def check_attention(self, layers: list[Layer]) -> None:
        pass  # FluxDiT's blocks call torch's SDPA themselves (checked by _check_blocks)

    # -- one call ------------------------------------------------------------------------------
    def generation(self, arguments: Mapping[str, Any]) -> Generation:
        pipe = self.pipe
        self._check_features(arguments)
        prompt = first_of(arguments.get("prompt"))
        length = int(arguments.get("t5_sequence_length") or 512)
        height = _round_up(int(arguments.get("height") or 1024), pipe.height_division_factor)
        width = _round_up(int(arguments.get("width") or 1024), pipe.width_division_factor)
        entity_prompts, entity_masks = self._entities(arguments)
        names = self._names(len(entity_prompts))

        segments = [
            padded_segment(pipe.tokenizer_2, name, text, i * length, length)
            for i, (name, text) in enumerate(zip(names, entity_prompts, strict=True))
        ]
        if prompt is not None:
            first = len(entity_prompts) * length
            segments.append(padded_segment(pipe.tokenizer_2, "prompt", prompt, first, length))
        text = TextTokens(segments=tuple(segments), length=(len(entity_prompts) + 1) * length)

        attrs = {
            "prompt": prompt,
            "negative_prompt": arguments.get("negative_prompt"),
            "entity_prompts": list(entity_prompts),
            "entity_names": names,
            "seed": arguments.get("seed"),
            "height": height,
            "width": width,
            "num_inference_steps": arguments.get("num_inference_steps"),
            # DiffSynth's names for what diffusers calls guidance_scale / true_cfg_scale.
            "guidance_scale": arguments.get("embedded_guidance"),
            "true_cfg_scale": arguments.get("cfg_scale"),
            "t5_sequence_length": length,
            "denoising_strength": arguments.get("denoising_strength"),
            "sigma_shift": arguments.get("sigma_shift"),
            "eligen_enable_on_negative": bool(arguments.get("eligen_enable_on_negative")),
        }
        attrs = {key: value for key, value in attrs.items() if value is not None}
        masks = None
        if entity_masks:
            masks = np.stack([applied_entity_mask(m, height, width) for m in entity_masks])
            attrs["entity_mask_source"] = (
                "DiffSynth's latent-resolution mask (nearest resize to height/8 x width/8, mean "
                "RGB > 127.5); a token is inside when any latent pixel of its 2x2 patch is"
            )
        return Generation(text=text, attrs=attrs, entity_names=names, entity_masks=masks)

    def _check_features(self, arguments: Mapping[str, Any]) -> None:
        used = [name for name in _UNSUPPORTED_ARGUMENTS if arguments.get(name) is not None]
        reasons = [f"{name} ({_UNSUPPORTED_ARGUMENTS[name]})" for name in used]
        if arguments.get("tiled"):
            reasons.append("tiled=True (the DiT runs on overlapping tiles, each its own grid)")
        if getattr(self.pipe, "nexus_gen", None) is not None:
            reasons.append("a Nexus-Gen model (it replaces the T5 text with its own embedding)")
        if reasons:
            raise ValueError(
                f"attnscope can't trace this DiffSynth FLUX call yet: {'; '.join(reasons)}. "
                f"Supported: {_SUPPORTED}."
            )

    @staticmethod
    def _entities(arguments: Mapping[str, Any]) -> tuple[list[str], list[Any]]:
        prompts = arguments.get("eligen_entity_prompts")
        masks = arguments.get("eligen_entity_masks")
        # FluxImageUnit_EntityControl applies EliGen only when both are given.
        if prompts is None or masks is None:
            return [], []
        prompts, masks = list(prompts), list(masks)
        if not all(isinstance(p, str) for p in prompts):
            raise UsageError("eligen_entity_prompts must be a list of strings")
        if len(prompts) != len(masks):
            raise ValueError(
                f"EliGen needs one mask per entity prompt: got {len(prompts)} prompts and "
                f"{len(masks)} masks"
            )
        return prompts, masks

    def _names(self, count: int) -> list[str]:
        if self.entity_names is None:
            return [f"entity{i}" for i in range(count)]
        if len(self.entity_names) != count:
            raise ValueError(
                f"entity_names has {len(self.entity_names)} names {self.entity_names} but the "
                f"call has {count} EliGen entity prompts"
            )
        return list(self.entity_names)

    # -- denoiser --------------------------------------------------------------------------------
    def watch_denoiser(self, on_call: Callable[[DenoiserCall], None]) -> Callable[[], None]:
        pipe = self.pipe
        own = pipe.__dict__.get("model_fn", _MISSING)
        model_fn = pipe.model_fn
        grids: dict[tuple[int, ...], tuple[int, int]] = {}
        watching = [True]

        def traced_model_fn(*args: Any, **kwargs: Any) -> Any:
            if watching[0]:
                on_call(self._denoiser_call(kwargs, grids))
            return model_fn(*args, **kwargs)

        # `model_fn` is an instance attribute DiffSynth itself wraps (load_timestep_lora): the
        # step loop passes it to cfg_guided_model_fn on every step, so wrapping it sees each call.
        pipe.model_fn = traced_model_fn

        def stop() -> None:
            watching[0] = False
            if pipe.__dict__.get("model_fn") is not traced_model_fn:
                # Wrapped or replaced during the trace: restoring would drop that change, so
                # ours stays inside it, forwarding every call untouched.
                warnings.warn(
                    "pipe.model_fn was replaced during the trace; attnscope left the new one in "
                    "place (attnscope's wrapper inside it now only forwards calls)",
                    stacklevel=2,
                )
            elif own is _MISSING:
                pipe.__dict__.pop("model_fn", None)
            else:
                pipe.model_fn = own

        return stop

    def _denoiser_call(
        self, inputs: Mapping[str, Any], grids: dict[tuple[int, ...], tuple[int, int]]
    ) -> DenoiserCall:
        latents, prompt_emb = inputs.get("latents"), inputs.get("prompt_emb")
        if latents is None or prompt_emb is None:
            raise UnsupportedModelError(
                "DiffSynth's model_fn was called without latents or prompt_emb; attnscope reads "
                "the token layout from them"
            )
        odd = [name for name in _UNSUPPORTED_MODEL_INPUTS if inputs.get(name) is not None]
        if odd or inputs.get("tiled"):
            raise UnsupportedModelError(
                f"attnscope can't map this DiffSynth FLUX call's tokens "
                f"({', '.join(odd) or 'tiled'}); supported: {_SUPPORTED}"
            )
        text_len = int(prompt_emb.shape[1])
        entity_emb = inputs.get("entity_prompt_emb")
        if entity_emb is not None and inputs.get("entity_masks") is not None:
            # (batch, entities, tokens, dim): the entities' tokens come before the prompt's.
            text_len += int(entity_emb.shape[1]) * int(entity_emb.shape[2])

        rows, cols = int(latents.shape[-2]) // 2, int(latents.shape[-1]) // 2
        image_ids = inputs.get("image_ids")
        if image_ids is not None:
            key = tuple(image_ids.shape)
            if key not in grids:
                grids[key] = token_grid(image_ids)
            if grids[key] != (rows, cols):
                raise UnsupportedModelError(
                    f"image ids describe a {grids[key]} grid but the latents a {(rows, cols)} one"
                )
        return DenoiserCall(
            timestep=self._timestep(inputs),
            text_len=text_len,
            grid=(rows, cols),
            dtype=latents.dtype,
        )

    def _timestep(self, inputs: Mapping[str, Any]) -> float:
        given = float(inputs["timestep"].reshape(-1)[0])
        timesteps = self.pipe.scheduler.timesteps
        step = inputs.get("progress_id")
        # The loop hands the model `scheduler.timesteps[progress_id]` cast to the pipeline dtype;
        # in bfloat16 that rounds by up to 2 near 1000, enough to confuse neighbouring steps of
        # a long schedule. The scheduler's own value is exact; use it when it is the one given.
        if isinstance(step, int) and 0 <= step < len(timesteps):
            exact = float(timesteps[step])
            if abs(exact - given) <= 1e-2 * max(1.0, abs(exact)):
                return exact
        return given

    def schedule(self, first_timestep: float) -> tuple[np.ndarray, np.ndarray]:
        scheduler = self.pipe.scheduler
        timesteps = torch.as_tensor(scheduler.timesteps).double().cpu().numpy()
        sigmas = torch.as_tensor(scheduler.sigmas).double().cpu().numpy()[: len(timesteps)]
        start = int(np.argmin(np.abs(timesteps - first_timestep)))
        return timesteps[start:], sigmas[start:]

    def image(self, output: Any) -> np.ndarray | None:
        # FluxImagePipeline returns one PIL image.
        return image_to_uint8(first_of(output))

    def run_attrs(self) -> dict[str, Any]:
        pipe, dit = self.pipe, self.dit
        attention = dit.blocks[0].attn if len(dit.blocks) else None
        scheduler = pipe.scheduler
        set_timesteps = getattr(scheduler, "set_timesteps_fn", None)
        return super().run_attrs() | {
            "model": f"{type(dit).__module__}.{type(dit).__name__}",
            "model_revision": library_versions("diffsynth").get("diffsynth", ""),
            "scheduler": type(scheduler).__name__,
            "scheduler_config": jsonable(
                {"set_timesteps": getattr(set_timesteps, "__name__", str(set_timesteps))}
            ),
            "transformer_config": {
                "num_blocks": len(dit.blocks),
                "num_single_blocks": len(dit.single_blocks),
                "num_heads": None if attention is None else int(attention.num_heads),
                "head_dim": None if attention is None else int(attention.head_dim),
                "input_dim": int(getattr(dit, "input_dim", 64)),
                "guidance_embedder": dit.guidance_embedder is not None,
            },
            "vram_management": bool(getattr(pipe, "vram_management_enabled", False)),
            "dtype": str(pipe.torch_dtype).removeprefix("torch."),
            "versions": library_versions("torch", "diffsynth", "transformers", "attnscope"),
        }
