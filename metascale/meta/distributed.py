"""Meta-training over tasks with ``torch.distributed``.

Launched by ``torchrun``, or by ``metascale meta-train --jobs N``, which starts the ``N`` local
ranks itself with the same environment (:func:`metascale.parallel.launch`: ``MASTER_ADDR``
127.0.0.1, a free port, ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``); ``WORLD_SIZE`` > 1 in the
environment means a group: gloo on CPU, nccl on CUDA.
Rank ``r`` of ``W`` unrolls tasks ``j = r, r + W, r + 2W, ...`` of each meta-batch; the
per-task results (finite flag, meta-loss, flattened meta-gradient) are all-gathered and every
rank reduces them **in task order** ``j = 0 .. B-1``, exactly as one process does, so two ranks
with B/2 tasks each give bit-for-bit the meta-parameters of one rank with B tasks (given the
same per-task arithmetic, e.g. the same number of threads). Only rank 0 writes files and logs.
"""
from __future__ import annotations

import importlib
import math
import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: torch.device) -> bool:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    Returns True when running with more than one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # Before the group exists: torch.distributed.nn.functional takes ``group.WORLD`` as the
        # default argument of ten functions when it is imported, and torch imports it lazily
        # (the trainer's first torch.optim.Adam imports torch._dynamo, which imports it). Imported
        # after init_process_group it would hold the group past destroy_process_group (see
        # :func:`leave`); imported now, its defaults are None.
        importlib.import_module("torch.distributed.nn.functional")
        dist.init_process_group(backend=backend)
    return True


def leave() -> None:
    """Leave the process group: every rank calls it after its last collective, before it writes
    or exits. No-op outside a group.

    The group must really be gone here, not at interpreter exit: gloo's worker threads release
    each collective's tensors after the waiting caller has resumed, and a worker that does so while
    the interpreter finalizes needs the GIL, is ended by CPython mid-destructor, and aborts the
    process ("terminate called without an active exception"). destroy_process_group joins those
    threads only when nothing else holds the group (:func:`init_from_env`)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def my_tasks(batch: int) -> list[int]:
    """Indices ``j`` of the meta-batch this rank unrolls."""
    rank, size = world()
    return list(range(rank, batch, size))


def gather_in_task_order(rows: torch.Tensor, batch: int) -> torch.Tensor:
    """All-gather per-task rows (``(len(my_tasks(batch)), D)``) into ``(batch, D)`` ordered by
    task index. Outside a process group this returns ``rows``."""
    rank, size = world()
    if size == 1:
        return rows
    n_max = math.ceil(batch / size)
    padded = torch.zeros((n_max, rows.shape[1]), dtype=rows.dtype, device=rows.device)
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    return torch.stack([parts[j % size][j // size] for j in range(batch)])
