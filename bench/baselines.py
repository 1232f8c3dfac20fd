"""The two baselines attnscope is measured against, on the same pipeline and call.

- The seed method: the write-up's approach generalised to every head and step. An attention
  processor that computes each joint attention explicitly, materialising the full softmax map of
  every head (`[B, H, N, N]`), uses it for the layer's output, slices the text-query rows against
  the image-key columns (and, both directions where it can, the image-query rows against the
  text-key columns), copies them to the host and saves them as NumPy files, per layer and step.
- attention-map-diffusers (PyPI), the most complete peer: its documented `AttentionCapture`
  context manager with `relations=("image->text", "text->image")`, `heads="all"`,
  `timesteps="all"`, then `save(..., save_raw=True)` (its maps as `.pt` files; its PNG
  renderings are turned off, they are not a recording).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch


class SeedProcessor:
    """FLUX attention computed through its full softmax map, whose text/image blocks are saved.

    Same projections, norms and rotary embedding as diffusers' `FluxAttnProcessor`; the attention
    itself is `softmax(q·kᵀ/√d) @ v` with the map materialised, as the write-up did.
    """

    def __init__(self, layer: str, save: Callable[[str, torch.Tensor], None]) -> None:
        self.layer = layer
        self.save = save

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
    ) -> Any:
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, enc_query, enc_key, enc_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        heads = (-1, attn.head_dim)
        query = attn.norm_q(query.unflatten(-1, heads))
        key = attn.norm_k(key.unflatten(-1, heads))
        value = value.unflatten(-1, heads)
        if attn.added_kv_proj_dim is not None:
            query = torch.cat([attn.norm_added_q(enc_query.unflatten(-1, heads)), query], dim=1)
            key = torch.cat([attn.norm_added_k(enc_key.unflatten(-1, heads)), key], dim=1)
            value = torch.cat([enc_value.unflatten(-1, heads), value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, H, N, D]
        scores = torch.matmul(q, k.transpose(-1, -2)) * attn.head_dim**-0.5
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = scores.softmax(dim=-1)  # the full N x N map of every head
        self.save(self.layer, probs)
        out = torch.matmul(probs, v).transpose(1, 2).flatten(2, 3).to(query.dtype)
        del scores, probs

        if encoder_hidden_states is None:
            return out
        text_len = encoder_hidden_states.shape[1]
        enc_out, out = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(enc_out.contiguous())


@contextlib.contextmanager
def seed_method(pipe: Any, out_dir: Path, text_len: int) -> Iterator[None]:
    """Record every joint attention of `pipe` the seed way into `out_dir` (NumPy files)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    calls: Counter[str] = Counter()

    def save(layer: str, probs: torch.Tensor) -> None:
        step = calls[layer]
        calls[layer] += 1
        blocks = {
            "txt2img": probs[0, :, :text_len, text_len:],
            "img2txt": probs[0, :, text_len:, :text_len],
        }
        for name, block in blocks.items():
            array = block.to("cpu", torch.float32).numpy()
            np.save(out_dir / f"step{step:03d}-{layer}-{name}.npy", array)

    transformer = pipe.transformer
    original = transformer.attn_processors
    processors = {name: SeedProcessor(name.removesuffix(".processor"), save) for name in original}
    transformer.set_attn_processor(processors)
    try:
        yield
    finally:
        transformer.set_attn_processor(original)


def attention_map_diffusers(
    pipe: Any,
    out_dir: Path,
    run: Callable[[], Any],
    relations: tuple[str, ...] = ("image->text", "text->image"),
) -> dict[str, Any]:
    """Run `run()` under attention-map-diffusers' capture of every head and timestep, then save.

    `relations`: its names for the directions (a video model's: video->text, text->video).
    Returns what it recorded: the layers it captured maps of, and its record count.
    """
    from attention_map_diffusers import AttentionCapture

    capture = AttentionCapture(
        pipe,
        relations=relations,
        layers="all",
        heads="all",
        timesteps="all",
    )
    with capture:
        run()
    maps = capture.compute()
    maps.save(str(out_dir), save_raw=True, save_visualizations=False)
    layers = sorted({record.layer_id for record in maps.records})
    return {
        "layers_with_maps": layers,
        "records": len(maps.records),
        "processors_installed": capture.coverage.get("captured_modules"),
    }
