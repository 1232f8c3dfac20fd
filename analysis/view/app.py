"""The viewer's HTTP side: a Starlette app serving one store's page and JSON answers.

Only the store given is served: requests name a run, a span and positions, never a path, and
the page's files come from this package's `static/` folder. Bad input answers with a JSON
`{"error": ...}` and a 4xx status (a damaged chunk: 409, and the page shows it as damaged).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..errors import AttnscopeError, CorruptChunkError, SelectionError
from .maps import MEAN, ViewStore

STATIC = Path(__file__).parent / "static"
Params = Mapping[str, str]


def _finite(values: np.ndarray) -> list[Any]:
    """Nested lists of an array, NaN (a map never computed) as None."""
    return np.where(np.isfinite(values), values, None).tolist()


def _range(values: np.ndarray) -> tuple[float | None, float | None]:
    finite = values[np.isfinite(values)]
    if not finite.size:
        return None, None
    return float(finite.min()), float(finite.max())


def _param(params: Params, name: str, default: str | None = None) -> str:
    value = params.get(name, default)
    if value is None:
        raise SelectionError(f"the request names no {name!r}")
    return value


def _plain(value: Any) -> Any:
    """`value` with its non-finite floats as text ("-inf"): JSON has no such numbers, and run
    attributes may hold them (DPM-Solver's `lambda_min_clipped` is -inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def _positions(params: Params, *dims: str) -> dict[str, str]:
    """The positions a request names along `dims` (an index, or the mean where it names none)."""
    return {dim: _param(params, dim, MEAN) for dim in dims}


def meta_answer(store: ViewStore, params: Params) -> dict[str, Any]:
    """`/api/meta`: the run's layout (ViewStore.meta)."""
    return _plain(store.meta(params.get("run")))


def map_answer(store: ViewStore, params: Params) -> dict[str, Any]:
    """`/api/map`: one map of a span, with its range."""
    values = store.map(
        params.get("run"),
        _param(params, "direction"),
        _param(params, "span"),
        **_positions(params, "step", "layer", "head", "frame"),
    )
    low, high = _range(values)
    return {"values": _finite(values), "min": low, "max": high}


def heads_answer(store: ViewStore, params: Params) -> dict[str, Any]:
    """`/api/heads`: every head's map at a step and layer, one range, their similarity."""
    maps, similarity = store.heads(
        params.get("run"),
        _param(params, "direction"),
        _param(params, "span"),
        **_positions(params, "step", "layer", "frame"),
    )
    low, high = _range(maps)
    return {"maps": _finite(maps), "min": low, "max": high, "similarity": _finite(similarity)}


def drift_answer(store: ViewStore, params: Params) -> dict[str, Any]:
    """`/api/drift`: the step-drift curve of a span at a layer and head."""
    values = store.drift(
        params.get("run"),
        _param(params, "direction"),
        _param(params, "span"),
        **_positions(params, "layer", "head", "frame"),
    )
    return {"drift": [v if math.isfinite(v) else None for v in values.tolist()]}


def entity_answer(store: ViewStore, params: Params) -> dict[str, Any]:
    """`/api/entity`: an EliGen entity's mask."""
    return {"values": _finite(store.entity_mask(params.get("run"), _param(params, "entity")))}


ANSWERS: dict[str, Callable[[ViewStore, Params], dict[str, Any]]] = {
    "api/meta": meta_answer,
    "api/map": map_answer,
    "api/heads": heads_answer,
    "api/drift": drift_answer,
    "api/entity": entity_answer,
}


def _answering(work: Callable[[Params], Any]) -> Callable[[Request], Awaitable[Response]]:
    """A route that runs `work` off the event loop and turns attnscope errors into JSON."""

    async def handler(request: Request) -> Response:
        params = dict(request.query_params)
        try:
            result = await run_in_threadpool(work, params)
        except CorruptChunkError as error:
            return JSONResponse({"error": str(error), "damaged": True}, status_code=409)
        except SelectionError as error:
            return JSONResponse({"error": str(error)}, status_code=404)
        except AttnscopeError as error:
            return JSONResponse({"error": str(error)}, status_code=400)
        return result if isinstance(result, Response) else JSONResponse(result)

    return handler


def create_app(store: ViewStore, run: str | None = None) -> Starlette:
    """The viewer of `store`; `run` is the run shown when a request names none."""

    def answer(name: str) -> Callable[[Params], Any]:
        return lambda params: ANSWERS[name](store, {"run": run, **params} if run else params)

    def image(params: Params) -> Response:
        return Response(store.image_png(params.get("run") or run), media_type="image/png")

    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    return Starlette(
        routes=[
            Route("/", page),
            *(Route(f"/{name}", _answering(answer(name))) for name in ANSWERS),
            Route("/api/image", _answering(image)),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ]
    )
