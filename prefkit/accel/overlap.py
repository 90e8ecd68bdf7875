"""Two forwards at once on a CPU: the frozen reference's forward on a worker thread while the policy's runs.

A CPU training step leaves cores idle: Python dispatch, element-wise ops below the parallel grain size and the
per-pair attention calls (whose kernel is no faster on two threads than on one at these lengths) run on one
core while the others wait. The reference forward needs nothing but the batch, so it can run alongside the
policy forward, each with half the intra-op threads, and fill those gaps (the gain: docs/performance.md,
lever 7).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

Front = TypeVar("Front")
Back = TypeVar("Back")

_pool: ThreadPoolExecutor | None = None


def run_alongside(foreground: Callable[[], Front], background: Callable[[], Back]) -> tuple[Front, Back]:
    """(foreground(), background()), the second run on a worker thread meanwhile; the intra-op threads are split
    between them and restored after (one after the other with a single thread). Grad mode and autocast are per
    thread: ``background`` sets its own."""
    global _pool
    total = torch.get_num_threads()
    if total < 2:
        return foreground(), background()
    if _pool is None:
        _pool = ThreadPoolExecutor(1, thread_name_prefix="prefkit-reference")
    mine, theirs = total - total // 2, max(1, total // 2)

    def job() -> Back:
        torch.set_num_threads(theirs)
        return background()

    torch.set_num_threads(mine)
    try:
        pending = _pool.submit(job)
        try:
            front = foreground()
        finally:
            back = pending.result()  # never left running; its error surfaces here
    finally:
        torch.set_num_threads(total)
    return front, back
