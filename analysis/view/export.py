"""One span's view as a self-contained HTML file: the page, with the answers it needs inside.

The file holds the answers for the span with one of step, layer, head (or a video's frame) off
its mean at a time (every step, every layer, every head, every frame), the head grid at the
means and the drift curve, and the generated image: what a reader scrubs through, in a file to
attach to a review or an issue. The page is the served one; it reads these answers instead of
asking a server.
"""

from __future__ import annotations

import base64
import json
from typing import Any
from urllib.parse import quote

from .app import ANSWERS, STATIC
from .maps import MEAN, ViewStore

# What JavaScript's encodeURIComponent leaves as it is, besides letters and digits.
_URI_SAFE = "-_.!~*'()"


def query_key(path: str, params: dict[str, Any]) -> str:
    """The key the page looks an answer up by (view.js `queryKey`)."""
    keys = sorted(k for k, v in params.items() if v is not None)
    return path + "?" + "&".join(f"{k}={quote(str(params[k]), safe=_URI_SAFE)}" for k in keys)


def export(store: ViewStore, run: str, direction: str, span: str) -> str:
    """The page of `run`'s `span` in `direction`, with every answer it can ask for inside."""
    meta = ANSWERS["api/meta"](store, {"run": run})
    answers = {query_key("api/meta", {"run": run}): meta}
    base = {"run": run, "direction": direction, "span": span}
    wanted: list[tuple[str, dict[str, Any]]] = []
    dims = ["step", "layer", "head"] + (["frame"] if meta["frames"] else [])
    means = dict.fromkeys(dims, MEAN)
    wanted.append(("api/map", base | means))
    for dim in dims:
        wanted += [("api/map", base | means | {dim: str(i)}) for i in range(len(meta[dim + "s"]))]
    wanted.append(("api/heads", base | {d: MEAN for d in dims if d != "head"}))
    wanted.append(("api/drift", base | {d: MEAN for d in dims if d != "step"}))
    wanted += [("api/entity", {"run": run, "entity": e}) for e in meta["run"]["entities"]]
    answers |= {query_key(path, params): ANSWERS[path](store, params) for path, params in wanted}
    image = None
    if meta["has_image"]:
        image = "data:image/png;base64," + base64.b64encode(store.image_png(run)).decode()
    data = {"answers": answers, "image": image, "state": base}
    page = (STATIC / "index.html").read_text()
    style = (STATIC / "view.css").read_text()
    script = (STATIC / "view.js").read_text()
    # "</" would end the script element early; "<\/" reads the same in JSON.
    embedded = json.dumps(data).replace("</", "<\\/")
    boot = f"window.ATTNSCOPE_EXPORT = {embedded};\n"
    stylesheet = '<link rel="stylesheet" href="static/view.css">'
    page = page.replace(stylesheet, f"<style>\n{style}</style>")
    return page.replace(
        '<script src="static/view.js"></script>', f"<script>\n{boot}{script}</script>"
    )
