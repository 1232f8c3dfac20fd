"""Pinned host memory for the writer's step buffers: pinned at their size.

On a GPU the writer copies each layer's maps straight into a step buffer of pinned host memory
(tracer.writer), allocated through PyTorch's caching host allocator. That allocator rounds every
block up to the next power of two, so blocks of nearby sizes can be reused: a step buffer of
FLUX.1-dev's maps for a 20-word prompt (57 layers × 24 heads × 26 rows × 64×64, 583 MB) pins
1 GiB, nearly twice its memory, and pinning takes nearly twice as long. A process's first run
pays that while its first step waits for a buffer (0.39 s per GiB pinned on an H200 box,
`python -m bench.gpu`).

PyTorch's `pinned_max_round_threshold_mb` setting pins blocks past the threshold at their own
size, still cached for the next run. The setting is process-wide, as glibc's are
(analysis.allocator): `attnscope record`, which owns its process, applies it; a script calls
`pin_at_size()`.
"""

from __future__ import annotations

import torch

SETTING = "pinned_max_round_threshold_mb"
# Past this many MB a block is pinned at its size: below it, rounding wastes little.
THRESHOLD_MB = 64


def pin_at_size() -> bool:
    """Have PyTorch pin host blocks past THRESHOLD_MB at their size, not the next power of two,
    keeping the process's other allocator settings (and a threshold it already has).

    Returns False where this torch has no such setting (older releases).
    """
    try:
        settings = torch._C._accelerator_getAllocatorSettings()
        if SETTING not in settings:  # else set already, by the user or an earlier call
            torch._C._accelerator_setAllocatorSettings(
                ",".join(filter(None, [settings, f"{SETTING}:{THRESHOLD_MB}"]))
            )
    except (AttributeError, RuntimeError):
        return False
    return True
