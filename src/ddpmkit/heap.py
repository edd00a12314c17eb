"""How ddpmkit's process keeps the memory it frees: on the heap, for the next step.

glibc's malloc serves a large block (over 128 KiB at first) with its own mmap and hands it back to the OS when it is
freed, so every training step's activations were fresh pages: 1,500-6,000 page faults a step of the demo UNet on 2 CPU
cores, each a kernel entry and a page of zeros. Raising the mmap threshold to glibc's largest default (32 MiB) and the
trim threshold to 1 GiB keeps freed blocks on the heap for reuse: under 100 faults a step and less kernel time
(bench/train_throughput.py --heap; the step's speed moved within the machine's noise). The price is that a process
keeps its peak heap until it exits, as torch's own GPU allocator does. The thresholds keep the heap of the main arena,
where the main thread allocates; glibc moves a thread whose allocation failed (a tensor larger than memory) to another
arena, whose emptied heaps go back to the OS whatever the thresholds, so that thread faults again (the tests fail
allocations in a thread of their own: tests/conftest.py::in_a_thread). Only glibc has these knobs; elsewhere nothing
changes, and a user who tunes malloc (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ or their GLIBC_TUNABLES) keeps
their own settings.
"""
from __future__ import annotations

import ctypes
import os
import platform

# mallopt's parameter numbers (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Set glibc's thresholds (see the module's note); whether they were set."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"} & set(os.environ) or "threshold" in tunables:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


KEPT = keep_freed_memory()
