"""Keep large CPU tensors' memory in the process between steps instead of returning it to the kernel each time.

glibc serves allocations above 32 MB at most with fresh mmap'd pages and unmaps them on free, so every training
step on a CPU page-faults its full-vocabulary logits (tens of MB each) in again; PyTorch has no CPU caching
allocator to prevent it. Serving every allocation from the heap, with a high trim threshold, lets freed blocks
be reused.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters from glibc's malloc.h
_KEEP_BYTES = 1 << 30  # freed memory at the top of the heap kept before it is returned


def keep_freed_cpu_memory() -> bool:
    """Heap-only allocation with a 1 GiB trim threshold on Linux/glibc (a no-op elsewhere); True when applied."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt: keep their defaults
        return False
    applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))
    log.debug("glibc: no mmap'd allocations, trim threshold %d bytes: %s", _KEEP_BYTES, applied)
    return applied
