"""glibc's allocator, set for a recording process: keep freed memory for reuse.

zarrs encodes a step's shard from a copy of the whole step and assembles the shard in one buffer:
hundreds of MB a step at FLUX.1-dev's shape. glibc serves blocks that large with fresh pages from
the kernel and hands them back when they are freed, so every step faults its buffers in again,
one zeroed 4 KiB page at a time: measured with perf, about 45% of the encoder's CPU time on this
project's benchmark machine, and the writer's rate per core rose 1.6-1.8× without it
(`python -m bench rate`). With one arena, no mmap'd blocks and no trimming, freed blocks stay in
the heap and the next step reuses them.

The cost: memory freed is not handed back to the system until the process ends, so the process
keeps its peak; and every thread allocates from one arena. The settings are process-wide, so
`attnscope record`, which owns its process, applies them; a script of its own calls
`tune_for_recording()` first thing, or starts Python with the same settings in its environment
(`MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1099511627776`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
# mallopt takes an int: -1, which glibc reads as SIZE_MAX, turns trimming off. The largest
# positive value, 2 GiB, still trimmed a heap whose free top passed it, as a FLUX.1-dev-sized
# writer's buffers do on two cores: pages were faulted in again each step, and the writer's
# 1 -> 2 core scaling read 1.35 instead of 1.76 (bench.rate).
_NEVER_TRIM = -1


def tune_for_recording() -> bool:
    """Keep freed memory for reuse (one arena, no mmap'd blocks, no trimming) in this process;
    returns whether it was applied: on Linux with glibc, not elsewhere. Best called before the
    process starts threads; threads started earlier may keep an arena of their own."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM))
    return all(libc.mallopt(parameter, value) == 1 for parameter, value in settings)
