"""Process memory: what a long run does so that its resident memory stays flat from block to block.

glibc serves an allocation below its mmap threshold from the heap, and the threshold rises (up to 32 MB) each
time a bigger block is freed; a 7B block's many tensors of a few MB then fragment the heap and resident memory
creeps up by a few hundred MB a block. Allocations from MMAP_THRESHOLD up are mapped and unmapped on their own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import resource
from pathlib import Path

MMAP_THRESHOLD = 4 * 2**20  # bytes: allocations this big go straight to the OS and back when freed
BIG_BLOCK_BYTES = 256 * 2**20
"""Models whose blocks hold this much (float32) get the fixed threshold (a 7B block holds 0.8 GB). Smaller ones keep
glibc's dynamic one: there each fresh mapping's page faults cost more than fragmentation (measured on the default
model, 14 MB blocks: evaluating its artifact takes 28.1 s with the fixed threshold, 21.5 s without)."""
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


@functools.cache
def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def map_big_allocations(block_bytes: int) -> bool:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD (no dynamic rise) for a model whose blocks hold block_bytes,
    if that is at least BIG_BLOCK_BYTES; False where it is not set (smaller blocks, or no glibc)."""
    if block_bytes < BIG_BLOCK_BYTES:
        return False
    libc = _libc()
    try:
        return bool(libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except AttributeError:
        return False


def row_slices(rows: int, cols: int, elements: int) -> list[slice]:
    """Slices of consecutive rows covering [0, rows), each of about `elements` entries (at least one row): the one
    way a [rows, cols] matrix is worked on a part at a time (rotations, clip search, GGUF conversion)."""
    step = max(1, elements // max(1, cols))
    return [slice(i, min(rows, i + step)) for i in range(0, rows, step)]


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc malloc_trim), so fragmentation left by one block's
    temporaries does not add up over the blocks; a no-op where glibc is absent."""
    libc = _libc()
    try:
        if libc is not None:
            libc.malloc_trim(0)
    except AttributeError:
        pass


def memory_now() -> dict[str, float]:
    """Resident and peak memory of this process in MiB, logged per block to show it does not grow with depth."""
    out = {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        out["rss_mib"] = round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass  # not Linux: the peak alone
    return out


def available_memory() -> int | None:
    """Bytes of memory the system can still hand out (Linux MemAvailable), or None where that is not known."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
