"""Running batches of per-file work in worker processes, shared by detect and align."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator


def cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _init(initializer: Callable, args: tuple) -> None:
    # The parent turns Ctrl-C into "save what is done and stop"; workers
    # dying on their own first would lose their batches noisily.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    initializer(*args)


@contextmanager
def map_batches(fn: Callable, jobs: Iterable, workers: int, initializer: Callable,
                initargs: tuple = ()) -> Iterator[Iterator]:
    """Yield an iterator of fn(job) results, in completion order.

    With workers > 1 the jobs run in that many fresh ("spawn") processes, each
    set up once by initializer(*initargs); with 1 they run here, in order.
    """
    if workers <= 1:
        initializer(*initargs)
        yield map(fn, jobs)
        return
    pool = _context().Pool(workers, _init, (initializer, initargs))
    try:
        yield pool.imap_unordered(fn, jobs)
    finally:
        pool.terminate()


def _context():
    """fork where it is safe: workers start in milliseconds instead of re-importing
    torch for seconds. A process that has initialised CUDA cannot fork."""
    torch = sys.modules.get("torch")
    cuda_started = torch is not None and torch.cuda.is_initialized()
    if "fork" in mp.get_all_start_methods() and not cuda_started:
        return mp.get_context("fork")
    return mp.get_context("spawn")
