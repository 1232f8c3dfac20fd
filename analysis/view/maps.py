"""What the viewer asks of a store: run metadata and the maps of one selection, as plain arrays.

Every map is read lazily through `analysis.open_trace` (token rows) and `span_view`, so only the
chunks a selection needs are decoded; the HTTP layer (`analysis.view.app`) only turns these
answers into JSON. A position along `step`, `layer` or `head` is an index, or `"mean"` for the
mean over that dim; so is one along a video run's `frame` (which defaults to the mean, so a
map is always one (y, x) image).
"""

from __future__ import annotations

import functools
import io
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import xarray as xr

from .. import store_format as sf
from ..compare import head_similarity, step_drift
from ..errors import SelectionError
from ..open import PartialRunWarning, open_trace, row_layers, trace_info
from ..selection import direction as pick_direction
from ..spans import span_view

MEAN = "mean"
POSITION_DIMS = ("step", "layer", "head", "frame")  # frame: video runs only


def position(dim: str, value: str | int, size: int) -> int | str:
    """An index along `dim` (of `size`), or MEAN, from a request's text."""
    if value == MEAN:
        return MEAN
    try:
        index = int(value)
    except (TypeError, ValueError):
        index = None
    if index is None or not 0 <= index < size:
        raise SelectionError(
            f"{dim} {value!r} is not a position of this run: give an index 0..{size - 1} "
            f"or {MEAN!r}"
        )
    return index


@functools.cache
def colormap(name: str = "magma") -> list[list[int]]:
    """A matplotlib colormap as 256 RGB triples, so the page draws as the CLI's figures do."""
    import matplotlib

    table = matplotlib.colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3]
    return (table * 255).round().astype(int).tolist()


class ViewStore:
    """One trace store, read for the viewer: each run opened once, lazily, and kept."""

    def __init__(self, path: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.path = path
        self.storage_options = dict(storage_options or {})
        self._tokens = functools.lru_cache(maxsize=4)(self._open)

    def _open(self, run: str | None) -> xr.Dataset:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PartialRunWarning)
            # Opened once as open_trace chunks it, to learn the maps' shape (metadata only).
            rows = open_trace(self.path, run, storage_options=self.storage_options, tokens=True)
            maps = next((rows[d] for d in sf.DIRECTIONS if d in rows), None)
            if maps is None:
                return rows  # no maps written yet: nothing to chunk
            # Each token row chunked as open_trace chunks a span's rows (one step, all heads,
            # as many layers as fit in ROW_CHUNK_BYTES): a map reads the rows of its span only,
            # one stored chunk each (the selection is fused into the read), and a mean over
            # every step and layer is tens of tasks, not thousands (on the benchmark's store,
            # one word's 0.78 s against 7.3 s with a chunk per layer, the prompt's 3.8 s
            # against 46 s; one map 25 ms against 27).
            return open_trace(
                self.path,
                rows.attrs["run"],  # the run just looked at, were another begun meanwhile
                storage_options=self.storage_options,
                tokens=True,
                chunks={"step": 1, "layer": row_layers(maps), "token": 1},
            )

    def tokens(self, run: str | None) -> xr.Dataset:
        """The run's token rows (dims step, layer, head, token, y, x), lazy."""
        return self._tokens(run)

    def meta(self, run: str | None) -> dict[str, Any]:
        """What the page needs to lay itself out: the run summary, the labels along each dim
        and the directions the run has (and why any is absent)."""
        ds = self.tokens(run)
        info = trace_info(self.path, ds.attrs["run"], storage_options=self.storage_options)
        present = [d for d in sf.DIRECTIONS if d in ds.data_vars]
        return {
            "store": info["store"],
            "runs": info["runs"],
            "run": info["run"],
            "directions": present,
            "directions_absent": dict(ds.attrs.get(sf.DIRECTIONS_ABSENT) or {}),
            "steps": [int(s) for s in ds.step.values],
            "timesteps": [float(t) for t in ds.timestep.values],
            "layers": [str(name) for name in ds.layer.values],
            "layer_kinds": [str(kind) for kind in ds.layer_kind.values],
            "heads": [int(h) for h in ds["head"].values],
            "frames": [int(f) for f in ds["frame"].values] if "frame" in ds.dims else [],
            "grid": [int(ds.sizes["y"]), int(ds.sizes["x"])],
            "has_image": "image" in ds.data_vars,
            "colormap": colormap(),
        }

    def _span(self, run: str | None, direction: str, span: str, **where: str | int) -> xr.DataArray:
        """A span's maps at the positions `where` names (an index, or MEAN over that dim).

        The indexed positions are taken from the stored rows first, so only their chunks enter
        the computation; then the span's rows are combined; then the means are taken.
        """
        ds = self.tokens(run)
        direction = pick_direction(ds, direction)
        where = dict(where)
        if "frame" in ds.dims:
            where.setdefault("frame", MEAN)
        elif where.pop("frame", MEAN) != MEAN:
            raise SelectionError(f"{ds.attrs['run']} has no frames: an image model's maps")
        at = {dim: position(dim, value, ds.sizes[dim]) for dim, value in where.items()}
        rows = ds[[direction]].isel({dim: i for dim, i in at.items() if i != MEAN})
        view = span_view(rows.assign_attrs(ds.attrs), {span: span})
        return (
            view[direction].sel(span=span, drop=True).mean([d for d, i in at.items() if i == MEAN])
        )

    def map(
        self,
        run: str | None,
        direction: str,
        span: str,
        step: str,
        layer: str,
        head: str,
        frame: str = MEAN,
    ) -> np.ndarray:
        """One (y, x) map of a span, at a step, layer, head (and a video's frame): each an index
        or "mean"."""
        da = self._span(run, direction, span, step=step, layer=layer, head=head, frame=frame)
        return np.asarray(da.values, dtype=np.float32)

    def heads(
        self, run: str | None, direction: str, span: str, step: str, layer: str, frame: str = MEAN
    ) -> tuple[np.ndarray, np.ndarray]:
        """Every head's (y, x) map of a span at a step and layer (and frame), and the heads'
        similarity (Pearson correlation, head × head)."""
        da = self._span(run, direction, span, step=step, layer=layer, frame=frame).compute()
        similarity = head_similarity(da, metric="correlation")
        return np.asarray(da.values, np.float32), np.asarray(similarity.values, np.float64)

    def drift(
        self, run: str | None, direction: str, span: str, layer: str, head: str, frame: str = MEAN
    ) -> np.ndarray:
        """How far each step's map is from the final step's (Jensen–Shannon, bits)."""
        da = self._span(run, direction, span, layer=layer, head=head, frame=frame).compute()
        return np.asarray(step_drift(da, metric="js").values, np.float64)

    def entity_mask(self, run: str | None, entity: str) -> np.ndarray:
        """An EliGen entity's mask as the model applied it (nonzero inside), as stored."""
        ds = self.tokens(run)
        names = [str(e) for e in ds["entity"].values] if "entity_mask" in ds.data_vars else []
        if entity not in names:
            raise SelectionError(
                f"{ds.attrs['run']} has no entity {entity!r}; its entities: {names or 'none'}"
            )
        return np.asarray(ds.entity_mask.isel(entity=names.index(entity)).values, np.float32)

    def image_png(self, run: str | None) -> bytes:
        """The generated image as PNG bytes."""
        import matplotlib.image

        ds = self.tokens(run)
        if "image" not in ds.data_vars:
            raise SelectionError(f"{ds.attrs['run']} holds no generated image")
        out = io.BytesIO()
        matplotlib.image.imsave(out, np.asarray(ds.image.values), format="png")
        return out.getvalue()
