"""Running batches of per-file work in worker processes, shared by detect and align."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from functools import partial
from itertools import islice
from typing import Callable, Iterable, Iterator

from spherecli.core.errors import UserError


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
                initargs: tuple = (), start_here: bool = False) -> Iterator[Iterator]:
    """Yield an iterator of fn(job) results, in completion order.

    With workers > 1 the jobs run in that many worker processes, each set up
    once by initializer(*initargs); with 1 they run here, in order. Jobs are
    drawn from the iterable as workers free up, so a tree of any size streams.
    With start_here, this process also runs jobs (set up the same way) until
    the first worker's result comes back: a worker that imports torch takes
    a second or more to start, which a short run would otherwise spend idle.
    """
    if workers <= 1:
        initializer(*initargs)
        yield map(fn, jobs)
        return
    pool = ProcessPoolExecutor(workers, _context(fn.__module__), _init, (initializer, initargs))
    try:
        yield _in_completion_order(pool, fn, iter(jobs), 2 * workers,
                                   partial(initializer, *initargs) if start_here else None)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _in_completion_order(pool: ProcessPoolExecutor, fn: Callable, jobs: Iterator,
                         depth: int, setup_here: Callable | None) -> Iterator:
    try:
        first = list(islice(jobs, depth))
        if setup_here:
            # A submit waits until the fork server has imported what the workers need
            # (torch: over a second), so a thread submits while this process works.
            with ThreadPoolExecutor(1) as starter:
                submitted = starter.submit(lambda: [pool.submit(fn, job) for job in first])
                for count, job in enumerate(jobs):
                    if count == 0:
                        setup_here()
                    yield fn(job)
                    if submitted.done() and any(future.done() for future in submitted.result()):
                        break
                running = set(submitted.result())
        else:
            running = {pool.submit(fn, job) for job in first}
        while running:
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()
            running |= {pool.submit(fn, job) for job in islice(jobs, len(done))}
    except BrokenProcessPool:
        # multiprocessing.Pool would wait forever for a worker the kernel
        # killed; here the run stops and keeps what it wrote.
        raise UserError("a worker process stopped unexpectedly (killed for memory, or see its "
                        "error above); the work finished so far is saved and the same command "
                        "resumes it") from None


def _context(module: str):
    """Workers fork from a fresh server process that has imported `module`.

    Forking this process instead can deadlock: a child inherits the locks of
    thread pools (OpenCV's, OpenMP's, CUDA's) but not their threads. "spawn"
    is safe too, but re-imports torch in every worker.
    """
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([module])
    return ctx
