"""Processes and threads for tiny models on a CPU.

torch's intra-op thread pool helps large tensors and hurts tiny ones: on a shared 2-core
machine its threads spin and wait, and meta-training a 40-unit MLP ran several times slower
with the default thread count than with one thread (docs/benchmarks.md, throughput). So
metascale runs one intra-op thread per process by default and uses the cores by running
independent work (tasks, training runs) in separate processes.

* :func:`set_threads` sets the intra-op thread count of this process.
* :func:`map_jobs` maps a module-level function over items in ``jobs`` worker processes, each
  at ``threads`` intra-op threads, and returns the results in item order. Results are exactly
  those of a serial loop in a process with the same thread count: every item is computed by
  the same code from the same inputs, only elsewhere.

Workers are started with the ``spawn`` method (a fresh interpreter: no forked OpenMP pool,
no inherited CUDA context). Function, items and results travel between this program's own
processes through :mod:`multiprocessing`'s pipes; nothing is read from files.
"""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Callable, Iterable, Sequence, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_THREADS = 1


def set_threads(threads: int | None = DEFAULT_THREADS) -> int:
    """Set this process's torch intra-op threads (``None``: leave torch's default); returns
    the count in force. Raises ``ValueError`` for a count below 1."""
    if threads is not None:
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise ValueError(f"threads must be a positive integer, got {threads!r}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def _init_worker(threads: int | None) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(threads or 1))
    set_threads(threads)


def map_jobs(fn: Callable[[T], R], items: Iterable[T], jobs: int = 1, *, threads: int | None = DEFAULT_THREADS,
             on_result: Callable[[int, R], None] | None = None) -> list[R]:
    """``[fn(x) for x in items]``, computed by ``jobs`` worker processes (``jobs = 1``: in this
    process, no worker started).

    Args:
        fn: a module-level function (it is sent to the workers by reference).
        jobs: worker processes; at most ``len(items)`` are started.
        threads: intra-op threads in each worker (``None``: torch's default).
        on_result: called as ``on_result(i, result)`` in this process as item ``i`` finishes
            (in completion order), e.g. to advance a progress bar.
    """
    items: Sequence[T] = list(items)
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}")
    if jobs == 1 or len(items) <= 1:
        out = []
        for i, x in enumerate(items):
            out.append(fn(x))
            if on_result is not None:
                on_result(i, out[-1])
        return out
    ctx = multiprocessing.get_context("spawn")
    results: list = [None] * len(items)
    with ProcessPoolExecutor(max_workers=min(jobs, len(items)), mp_context=ctx, initializer=_init_worker,
                             initargs=(threads,)) as pool:
        futures = {pool.submit(fn, x): i for i, x in enumerate(items)}
        for fut in as_completed(futures):
            i = futures[fut]
            results[i] = fut.result()
            if on_result is not None:
                on_result(i, results[i])
    return results
