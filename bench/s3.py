"""Through an S3-compatible bucket against local disk: recording and reading, side by side.

Starts moto's standalone S3 server on 127.0.0.1 (a real HTTP server, as in the tests; a remote
bucket adds network latency and bandwidth on top), then, in one fresh interpreter:
- the quick geometry's demo generation, untraced and traced into a local store and into the
  bucket, in alternating pairs: each traced/untraced ratio;
- the analysis benchmark's synthetic store (FLUX.1-dev's layers and heads, fewer steps), written
  on disk and copied into the bucket: the mean over step, layer and head of every span read
  through each, in decoded MB/s.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

from bench.common import GEOMETRIES, isolated, log, median, scratch

ANALYSIS_STEPS = 4


@contextmanager
def moto_server() -> Iterator[dict[str, str]]:
    """moto's S3 server on a free local port; yields the AWS variables that reach it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "true"},
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto's S3 server did not start on {endpoint}") from None
                time.sleep(0.2)
        yield {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
        }
    finally:
        process.terminate()
        process.wait(timeout=10)


def measure(geometry: dict[str, Any], pairs: int, workdir: str) -> dict[str, Any]:
    """Both comparisons, in this (fresh) interpreter, against the bucket of AWS_ENDPOINT_URL."""
    import s3fs

    import analysis
    import tracer
    from bench.analysis_speed import write_store
    from bench.common import Geometry, build_pipeline, generate

    fs = s3fs.S3FileSystem()
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    geo = Geometry(**geometry)
    pipe = build_pipeline(geo)
    generate(pipe, geo)  # warm-up

    def traced(out: str) -> float:
        start = time.perf_counter()
        with tracer.trace(pipe, out, progress=False):
            generate(pipe, geo)
        return time.perf_counter() - start

    ratios: dict[str, list[float]] = {"local disk": [], "bucket": []}
    for i in range(pairs):
        for where, out in (
            ("local disk", f"{workdir}/trace-{i}.zarr"),
            ("bucket", f"s3://{bucket}/trace-{i}.zarr"),
        ):
            start = time.perf_counter()
            generate(pipe, geo)
            untraced = time.perf_counter() - start
            ratios[where].append(traced(out) / untraced)

    local = f"{workdir}/synthetic.zarr"
    written = write_store(local, steps=ANALYSIS_STEPS)
    fs.put(local, f"{bucket}/synthetic.zarr", recursive=True)
    means = {}
    for where, path in (("local disk", local), ("bucket", f"s3://{bucket}/synthetic.zarr")):
        ds = analysis.open_trace(path)
        start = time.perf_counter()
        ds.txt2img.mean(["step", "layer", "head"]).compute()
        means[where] = written["decoded_bytes"] / (time.perf_counter() - start) / 1e6
    return {
        "overhead": {where: {"ratio": median(r), "runs": r} for where, r in ratios.items()},
        "analysis_mb_s": means,
        "analysis_store": {k: written[k] for k in ("shape", "decoded_bytes", "stored_bytes")},
    }


def figures(pairs: int = 3) -> dict[str, Any]:
    """Start the server, measure in a fresh interpreter, stop the server."""
    geo = GEOMETRIES["quick"]
    with moto_server() as env, scratch("s3") as workdir:
        log("s3: recording and reading through moto's S3 server and local disk")
        result = isolated(
            "bench.s3:measure", env=env, geometry=asdict(geo), pairs=pairs, workdir=str(workdir)
        )
    return result | {"geometry": geo.name}
