"""`attnscope view` on a full-FLUX-shaped store: time to the first map, repaint per slider move,
and the server's memory.

The store is synthetic, written by the real writer (bench.analysis_speed.write_store): 28 steps,
57 layers (19 double, 38 single), 24 heads, 26 token rows (25 words and the padding), a 64×64
grid, txt2img, the default error bound: 6.5 GB of float32 once decoded. The server runs as
`attnscope view --no-browser` in its own process; headless Chromium (Debian's, through
Playwright) loads the page and moves the step, layer and head sliders at random (the others
where they were), timing each move until the page has drawn the new map. Targets (issue 15):
first map within 1.5 s of the page load, a repaint within 150 ms at the median and 400 ms at the
95th percentile, server memory under 500 MB.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import sys
import time
from typing import Any

from bench.common import isolated, log, scratch

WORDS = tuple(f"word{i}" for i in range(25))
MOVES = 40


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def figures(moves: int = MOVES) -> dict[str, Any]:
    """Write the store, serve it, drive the page; the figures."""
    import psutil
    from playwright.sync_api import sync_playwright

    with scratch("view") as workdir:
        path = str(workdir / "flux.zarr")
        written = isolated("bench.analysis_speed:write_store", path=path, words=list(WORDS))
        port = _free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "analysis", "view", path, "--no-browser", "--port", str(port)],
            stderr=subprocess.PIPE,
            text=True,
        )
        peak = 0
        try:
            while True:  # until it listens
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    time.sleep(0.05)
            process = psutil.Process(server.pid)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path=shutil.which("chromium"), args=["--no-sandbox"]
                )
                page = browser.new_page()
                ready = "document.getElementById('map').dataset.values !== undefined"
                start = time.perf_counter()
                page.goto(f"http://127.0.0.1:{port}/?span=word3")
                page.wait_for_function(ready, timeout=120_000)
                first = time.perf_counter() - start
                peak = max(peak, process.memory_info().rss)
                log(f"view: first map in {first:.2f} s")
                rng = random.Random(0)
                sizes = {"step": 28, "layer": 57, "head": 24}
                repaints = []
                for _ in range(moves):
                    dim = rng.choice(list(sizes))
                    value = rng.randrange(sizes[dim] + 1)  # the last position is the mean
                    page.evaluate("delete document.getElementById('map').dataset.values")
                    start = time.perf_counter()
                    page.fill(f"#{dim}", str(value))
                    page.dispatch_event(f"#{dim}", "input")
                    page.wait_for_function(ready, timeout=120_000)
                    repaints.append(time.perf_counter() - start)
                    peak = max(peak, process.memory_info().rss)
                browser.close()
        finally:
            server.terminate()
            server.wait(10)
    repaints.sort()
    return {
        "store": written,
        "first_map_s": first,
        "repaint_median_s": repaints[len(repaints) // 2],
        "repaint_p95_s": repaints[int(0.95 * (len(repaints) - 1))],
        "moves": moves,
        "server_peak_rss": peak,
    }


if __name__ == "__main__":
    import json

    print(json.dumps(figures(), indent=1))
