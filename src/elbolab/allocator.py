"""Keep freed CPU memory in the process, so that big temporaries stop page-faulting.

glibc hands every freed block above its mmap threshold (adaptive, 128 KB to 32 MB)
straight back to the OS, and trims the heap top above 128 KB. A training step of the
IWAE k = 50 model makes a dozen ``[K, B, 784]`` temporaries (15.7 MB each at B = 100),
so each is a fresh mapping whose 3,800 pages fault on first touch: about 2 ms per
tensor, 8% of the step (docs/bench.md). Raising both thresholds lets the next step
reuse the same pages, as torch's CUDA caching allocator does on a GPU. The process
keeps its peak footprint instead of shrinking after it (the peak itself is unchanged).
Blocks above 64 MB still go straight back to the OS (see MMAP_THRESHOLD).

Set ``ELBOLAB_RETAIN_FREED_MEMORY=0`` to leave the allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

#: glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: blocks below this come from the heap and are reused; above it, mmap as before. Not
#: higher: with 1 GiB, ELBO surgery's 134 MB table chunks, freed between small results
#: that stay alive, could not be coalesced and the heap grew by a chunk per chunk (22.8 GB,
#: killed, in a reproduction row; tests/test_fast_elementwise.py replays the pattern)
MMAP_THRESHOLD = 64 << 20
#: free memory at the heap top is returned to the OS only beyond this (mallopt takes a C int)
TRIM_THRESHOLD = (1 << 31) - 1

_done = False


def retain_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; True if they are raised.

    A no-op (False) off glibc (macOS, Windows, musl) or when the environment opts out.
    """
    global _done
    if _done:
        return True
    if os.environ.get("ELBOLAB_RETAIN_FREED_MEMORY", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        log.debug("mallopt refused the thresholds; the allocator is unchanged")
        return False
    _done = True
    return True
