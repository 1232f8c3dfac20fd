"""glibc's allocator, set for a process that moves maps in bulk: keep freed memory for reuse.

Recording and reading both move hundreds of MB of maps through buffers that live for one step or
one chunk: zarrs encodes a step's shard from a copy of the whole step and assembles it in one
buffer; a reduction decodes each chunk (24 MiB at FLUX.1-dev's shape) into a fresh array and
dask's NaN-skipping mean copies it. glibc serves blocks that large with fresh pages from the
kernel and hands them back when they are freed, so every step or chunk faults its buffers in
again, one zeroed 4 KiB page at a time: measured with perf, about 45% of the encoder's CPU time
on this project's benchmark machine. With one arena, no mmap'd blocks and no trimming, freed
blocks stay in the heap and the next step or chunk reuses them: the writer's rate per core rose
1.6-1.8× (`python -m bench rate`), and the mean of every span of a FLUX.1-dev-sized store ran
1.09-1.22× as fast with a third less peak memory (one arena instead of one per dask thread;
`python -m bench --rerun analysis`).

The cost: memory freed is not handed back to the system until the process ends, so the process
keeps its peak; and every thread allocates from one arena. The settings are process-wide, so the
`attnscope` command, which owns its process, applies them for every verb that reads or records
maps; a script of its own calls `reuse_freed_memory()` first thing, or starts Python with the same
settings in its environment
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


def reuse_freed_memory() -> bool:
    """Keep freed memory for reuse (one arena, no mmap'd blocks, no trimming) in this process;
    returns whether it was applied: on Linux with glibc, not elsewhere. Best called before the
    process starts threads; threads started earlier may keep an arena of their own."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM))
    return all(libc.mallopt(parameter, value) == 1 for parameter, value in settings)
