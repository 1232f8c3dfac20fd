"""Bytes on disk per stored attention value, compression ratio and measured error.

One generation is traced twice, at the default error bound and losslessly (`keepbits=None`); the
model and its capture are deterministic on one machine, so the lossless store holds the exact
float32 maps the rounded one approximates. Sizes count the stored shards of each variable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bench.common import Geometry, build_pipeline, du, generate, log, scratch


def _stored(run: Path, name: str) -> int:
    return du(run / name / "c")  # the shards; metadata (zarr.json) is a few kB


def measure(geometry: dict[str, Any]) -> dict[str, Any]:
    """Run in a fresh interpreter (bench.common.isolated)."""
    import warnings

    import zarr

    import tracer
    from analysis import store_format as fmt

    # Opening an array with bit rounding warns that numcodecs codecs are outside the Zarr spec.
    warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr")
    geo = Geometry(**geometry)
    pipe = build_pipeline(geo)
    stores: dict[str, Any] = {}
    with scratch("store") as workdir:
        for label, keepbits in (("default", fmt.DEFAULT_KEEPBITS), ("lossless", None)):
            path = workdir / f"{label}.zarr"
            with tracer.trace(pipe, path, keepbits=keepbits, progress=False) as rec:
                generate(pipe, geo)
            run = zarr.open_group(str(path), path=rec.last_run, mode="r")
            stores[label] = {
                "group": run,
                "dir": path / rec.last_run,
                "error_bound": run.attrs["error_bound"],
            }
        result: dict[str, Any] = {
            "geometry": geometry,
            "keepbits": fmt.DEFAULT_KEEPBITS,
            "error_bound": stores["default"]["error_bound"],
            "directions": {},
        }
        for name in fmt.DIRECTIONS:
            rounded = stores["default"]["group"][name][...]
            exact = stores["lossless"]["group"][name][...]
            nonzero = exact != 0
            relative = np.abs(rounded[nonzero] - exact[nonzero]) / np.abs(exact[nonzero])
            values = exact.size
            stored = _stored(stores["default"]["dir"], name)
            lossless = _stored(stores["lossless"]["dir"], name)
            # The rounded values' information if their kept mantissa bits were random: the
            # exponent's entropy (sign is always 0) plus the kept bits, in bytes per value.
            exponents = (rounded[nonzero].view(np.uint32) >> 23).astype(np.int64)
            freq = np.bincount(exponents) / exponents.size
            freq = freq[freq > 0]
            entropy_bits = float(-(freq * np.log2(freq)).sum()) + fmt.DEFAULT_KEEPBITS
            result["directions"][name] = {
                "entropy_bytes_per_value": entropy_bits / 8,
                "shape": list(exact.shape),
                "values": values,
                "bytes": stored,
                "bytes_per_value": stored / values,
                "ratio": 4 * values / stored,
                "lossless_bytes_per_value": lossless / values,
                "lossless_ratio": 4 * values / lossless,
                "max_relative_error": float(relative.max()) if relative.size else 0.0,
                "zeros_exact": bool(np.all(rounded[~nonzero] == 0)),
            }
            log(
                f"{geo.name}: {name} {stored / values:.3f} B/value, "
                f"max relative error {result['directions'][name]['max_relative_error']:.2e}"
            )
    return result
