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
        dist.init_process_group(backend=backend)
    return True


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
