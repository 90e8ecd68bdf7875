"""CPU training keeps freed memory in the process instead of handing it back to the OS every step.

glibc's malloc serves large blocks with mmap and gives them back on free, and trims the heap top once more than
the trim threshold is free there. A training step allocates and frees the same activation-sized buffers over
and over, so each step faults fresh pages in again (the kernel zero-fills each one). A fixed mmap threshold
of 32 MB (glibc's maximum dynamic value) and a 64 MB trim threshold let freed buffers be reused as they are;
both are set, since a trim threshold alone makes glibc fix the mmap threshold at 128 KB. TRL gains alike when
given them, so ``benchmarks/throughput.py`` runs TRL with them too (the figures: docs/performance.md, lever 8).
Process-wide: :func:`prefkit.accel.install` sets it for a CPU run; ``PREFKIT_MALLOC_TUNING=0`` opts out.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

logger = logging.getLogger(__name__)

# mallopt parameters, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 64 * 2**20

_done = False


def tune_cpu_malloc() -> bool:
    """Set glibc malloc's mmap and trim thresholds for this process (once); False where not glibc or opted out
    with ``PREFKIT_MALLOC_TUNING=0``. Only when memory goes back to the OS changes, never what is allocated."""
    global _done
    if _done:
        return True
    if os.environ.get("PREFKIT_MALLOC_TUNING", "").lower() in ("0", "false", "no"):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    _done = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if _done:
        logger.debug("glibc malloc: mmap threshold %d MB, trim threshold %d MB", MMAP_THRESHOLD >> 20,
                    TRIM_THRESHOLD >> 20)
    return _done
