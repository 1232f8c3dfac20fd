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

The settings hold for blocks of the one arena that every thread allocates from once they are
set. A thread that allocated before they were (a thread pool's, a driver's) made an arena of its
own, and threads started later take that arena over, where glibc maps blocks past 64 MiB afresh
every time: a writer thread's step buffers are then faulted in every step as if nothing were set
(tests/analysis/test_allocator.py). `reuse_freed_memory()` says so by returning False; the way out
is the environment below, set before Python starts.

The cost: memory freed is not handed back to the system until the process ends, so the process
keeps its peak; and every thread allocates from one arena. The settings are process-wide, so the
`attnscope` command, which owns its process, applies them for every verb that reads or records
maps; a script of its own calls `reuse_freed_memory()` first thing, or starts Python with the same
settings in its environment
(`MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1099511627776`, `ENVIRONMENT`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform

# The same settings for a process to start with (read by glibc before any thread exists).
ENVIRONMENT = "MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1099511627776"
# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
# mallopt takes an int: -1, which glibc reads as SIZE_MAX, turns trimming off. The largest
# positive value, 2 GiB, still trimmed a heap whose free top passed it, as a FLUX.1-dev-sized
# writer's buffers do on two cores: pages were faulted in again each step, and the writer's
# 1 -> 2 core scaling read 1.35 instead of 1.76 (bench.rate).
_NEVER_TRIM = -1


def reuse_freed_memory() -> bool:
    """Keep freed memory for reuse (one arena, no mmap'd blocks, no trimming) in this process.

    Returns whether every thread's large blocks are now reused: False where the settings do not
    apply (not Linux with glibc) and where a thread has already made an arena of its own
    (`arenas()` > 1; see the module's doc). Call it before the process starts threads.
    """
    libc = _glibc()
    if libc is None:
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM))
    applied = all(libc.mallopt(parameter, value) == 1 for parameter, value in settings)
    return applied and arenas() == 1


def arenas() -> int | None:
    """How many malloc arenas this process has (the main one included); None without glibc."""
    libc = _glibc()
    if libc is None:
        return None
    text, size = ctypes.c_char_p(), ctypes.c_size_t()
    stream = libc.open_memstream(ctypes.byref(text), ctypes.byref(size))
    try:
        libc.malloc_info(0, stream)  # an XML report, one <heap> element per arena
    finally:
        libc.fclose(stream)
    report = ctypes.string_at(text, size.value)
    libc.free(text)
    return report.count(b"<heap nr=")


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.open_memstream.restype = ctypes.c_void_p
    libc.open_memstream.argtypes = [
        ctypes.POINTER(ctypes.c_char_p),
        ctypes.POINTER(ctypes.c_size_t),
    ]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    libc.free.argtypes = [ctypes.c_void_p]
    return libc
