"""Peak host memory of one generation per variant, each in a fresh interpreter.

Every process imports the same libraries (the tracer, the baselines) before building the model, so
a difference in peak RSS is what the run itself needed, not an import. Extra memory = a variant's
peak RSS minus the untraced run's, at the same number of steps; measuring it at two step counts
shows whether it grows with the run's length.

The figures are taken with glibc's mmap threshold fixed at 1 MiB (`MALLOC_MMAP_THRESHOLD_`, set
by the caller for the child). By default glibc raises that threshold to the largest block
freed so far (up to 32 MiB), after which freed activations of the model are kept in the heap in
fragments, and the peak RSS of the very same untraced run wanders by a few hundred MiB from one
process to the next, more than the tracer's whole footprint. With the threshold fixed, blocks
over 1 MiB are returned to the system when freed, and repeated runs peak within 1 MiB of each
other. The default allocator's figures are measured as well, for scale.
"""

from __future__ import annotations

import gc
import os
from typing import Any

from bench.common import Geometry, build_pipeline, current_rss, log, peak_rss, scratch


def measure(geometry: dict[str, Any], variant: str, steps: int) -> dict[str, Any]:
    """Run in a fresh interpreter (bench.common.isolated)."""
    import attention_map_diffusers  # noqa: F401  (every variant's process holds the same code)

    import tracer  # noqa: F401
    from bench.variants import VARIANTS

    geo = Geometry(**geometry)
    pipe = build_pipeline(geo)
    gc.collect()
    before = {"rss": current_rss(), "peak": peak_rss()}
    with scratch(f"mem-{variant}") as workdir:
        VARIANTS[variant](pipe, geo, workdir, steps)
    result = {
        "variant": variant,
        "steps": steps,
        "before": before,
        "peak": peak_rss(),
        "mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_", "glibc default"),
    }
    log(f"{geo.name}: {variant} at {steps} steps peaks at {result['peak'] / 2**20:.0f} MiB")
    return result
