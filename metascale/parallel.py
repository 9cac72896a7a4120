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
  the same code from the same inputs, only elsewhere. :class:`Workers` keeps one pool open
  for several such maps (e.g. a tuning phase, then the runs that depend on it).
* :func:`add_arguments` and :func:`resolve` are the ``--threads``/``--jobs`` flags every
  command shares (``meta-train``, ``evaluate``, ``bench``): parse, then resolve against the
  device and the number of independent items.
* :func:`launch` runs ``fn(*args)`` in ``nprocs`` local processes that form one
  ``torch.distributed`` group (the environment torchrun would give them), which is how
  ``metascale meta-train --jobs N`` splits every meta-batch (:mod:`metascale.meta.distributed`).

Workers are started with the ``spawn`` method (a fresh interpreter: no forked OpenMP pool,
no inherited CUDA context). Function, items and results travel between this program's own
processes through :mod:`multiprocessing`'s pipes; nothing is read from files.
"""
from __future__ import annotations

import argparse
import multiprocessing
import multiprocessing.connection
import os
import socket
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, Callable, Iterable, Sequence, TypeVar

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


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask; ``os.cpu_count()`` elsewhere)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def idle_cpus() -> int:
    """Usable cores minus the 1-minute load average (rounded), at least 1: the cores nobody
    else is running on, as far as the kernel's (lagging) average tells."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not Unix
        load = 0.0
    return max(1, usable_cpus() - int(load + 0.5))


def default_jobs() -> int:
    """The ``--jobs`` default: ``METASCALE_JOBS`` if set, else one process per idle core
    (:func:`idle_cpus`). Results do not depend on the number of processes, so the default may
    follow the machine: a second one-thread process on a free core adds its throughput, but
    next to other CPU-bound work it only competes with it, and starting it costs seconds
    (docs/benchmarks.md, throughput)."""
    env = os.environ.get("METASCALE_JOBS", "").strip()
    if env:
        try:
            v = int(env)
        except ValueError:
            v = 0
        if v < 1:
            raise ValueError(f"METASCALE_JOBS must be a positive integer, got {env!r}")
        return v
    return idle_cpus()


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def add_arguments(parser: argparse.ArgumentParser, what: str = "the independent runs", per: str = "run") -> None:
    """Add ``--threads N`` and ``--jobs N`` to a command's parser (both default to None;
    :func:`resolve` turns them into numbers). ``what`` the processes share, at most one
    process ``per`` unit of work (for the help text)."""
    parser.add_argument("--threads", type=positive_int, metavar="N",
                        help="torch intra-op threads per process (default: 1 on CPU, where tiny models run "
                             "fastest on one thread; torch's default on CUDA)")
    parser.add_argument("--jobs", type=positive_int, metavar="N",
                        help=f"local processes that share {what} (default: $METASCALE_JOBS, else one per idle CPU "
                             f"core, i.e. cores minus the load average, at most one per {per}; 1 on CUDA); results "
                             "are bit-for-bit those of one process at the same --threads")


def resolve(threads: int | None, jobs: int | None, device: Any = "cpu", limit: int | None = None) -> tuple[int | None, int]:
    """``(threads, jobs)`` in force for a command on ``device`` with ``limit`` independent items.

    ``threads``: as given, else 1 on CPU and None (torch's default) on CUDA. ``jobs``: as
    given, else :func:`default_jobs` on CPU and 1 on CUDA; never more than ``limit``."""
    cpu = str(device).split(":")[0] == "cpu"
    if threads is None and cpu:
        threads = DEFAULT_THREADS
    if jobs is None:
        jobs = default_jobs() if cpu else 1
    if limit is not None:
        jobs = max(1, min(jobs, limit))
    return threads, jobs


class Workers:
    """A pool of ``jobs`` spawned worker processes at ``threads`` intra-op threads each, kept
    open for several :meth:`map` calls (``with Workers(2) as w: a = w.map(f, xs); b = w.map(g, ys)``).
    With ``jobs = 1`` no process is started and :meth:`map` is a loop in this process."""

    def __init__(self, jobs: int = 1, *, threads: int | None = DEFAULT_THREADS):
        if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
            raise ValueError(f"jobs must be a positive integer, got {jobs!r}")
        self.jobs, self.threads, self._pool = jobs, threads, None

    def __enter__(self) -> "Workers":
        if self.jobs > 1:
            self._pool = ProcessPoolExecutor(max_workers=self.jobs, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_worker, initargs=(self.threads,))
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=exc[0] is None, cancel_futures=True)
            self._pool = None

    def map(self, fn: Callable[[T], R], items: Iterable[T], on_result: Callable[[int, R], None] | None = None) -> list[R]:
        """``[fn(x) for x in items]`` on the pool, in item order (see :func:`map_jobs`)."""
        items = list(items)
        if self._pool is None or len(items) <= 1:
            out = []
            for i, x in enumerate(items):
                out.append(fn(x))
                if on_result is not None:
                    on_result(i, out[-1])
            return out
        results: list = [None] * len(items)
        futures = {self._pool.submit(fn, x): i for i, x in enumerate(items)}
        for fut in as_completed(futures):
            i = futures[fut]
            results[i] = fut.result()
            if on_result is not None:
                on_result(i, results[i])
        return results


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
    with Workers(max(1, min(jobs, len(items))), threads=threads) as w:
        return w.map(fn, items, on_result)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, nprocs: int, port: int, threads: int | None, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(nprocs), LOCAL_WORLD_SIZE=str(nprocs), GROUP_RANK="0")
    set_threads(threads)
    code = fn(*args)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code if isinstance(code, int) else 0)


def launch(fn: Callable[..., int | None], args: tuple = (), nprocs: int = 2, *, threads: int | None = DEFAULT_THREADS,
           port: int | None = None) -> int:
    """Run ``fn(*args)`` in ``nprocs`` spawned local processes, each with the environment that
    ``torchrun --nproc_per_node nprocs`` gives its ranks (``MASTER_ADDR=127.0.0.1``, a free
    ``MASTER_PORT``, ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``) and ``threads`` intra-op threads;
    ``fn`` joins the group itself (e.g. :func:`metascale.meta.distributed.init_from_env`).

    Returns the exit status: 0 when every process returned 0 (or None), else the first
    non-zero status; when one process fails the others are stopped at once (they would
    otherwise wait in a collective). ``fn`` and ``args`` must be picklable."""
    if not isinstance(nprocs, int) or nprocs < 1:
        raise ValueError(f"nprocs must be a positive integer, got {nprocs!r}")
    ctx = multiprocessing.get_context("spawn")
    port = port or free_port()
    old = os.environ.get("OMP_NUM_THREADS")
    if threads is not None:  # the children's OpenMP pool, sized at their torch import
        os.environ["OMP_NUM_THREADS"] = str(threads)
    procs = [ctx.Process(target=_rank_main, args=(r, nprocs, port, threads, fn, args), name=f"metascale-rank{r}")
             for r in range(nprocs)]
    try:
        for p in procs:
            p.start()
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old
    status = 0
    try:
        running = list(procs)
        while running:
            multiprocessing.connection.wait([p.sentinel for p in running])
            for p in [p for p in running if not p.is_alive()]:
                running.remove(p)
                p.join()
                if p.exitcode != 0 and status == 0:
                    status = p.exitcode if p.exitcode > 0 else 128 - p.exitcode
                    for q in running:
                        q.terminate()
    except KeyboardInterrupt:
        for p in procs:
            if p.is_alive():
                p.terminate()
        raise
    finally:
        for p in procs:
            p.join()
    return status
