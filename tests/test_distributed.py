"""torch.distributed meta-training: two gloo ranks with B/2 tasks each give bit-for-bit the
meta-parameters of one process with B tasks (launched for real with torchrun)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SPEC = """description = "tiny distributed check"
[family]
name = "sine"
hidden = [8]
[inner]
steps = 4
[meta]
batch_size = 5
steps = 3
"""


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same per-task arithmetic in every process
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None
                    and shutil.which("torchrun") is None, reason="torchrun not installed")
def test_two_gloo_ranks_equal_one_process(tmp_path):
    spec = tmp_path / "tiny.toml"
    spec.write_text(SPEC)
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    one = run([sys.executable, "-m", "metascale.cli", "meta-train", "--spec", str(spec), "--out", "one",
               "--quiet", "--device", "cpu"], tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    two = run([torchrun, "--nproc_per_node", "2", "--master_port", "29517", "-m", "metascale.cli", "meta-train",
               "--spec", str(spec), "--out", "two", "--quiet", "--device", "cpu"], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "distributed over 2 processes" in two.stdout
    assert two.stdout.count("wrote ") == 1  # only rank 0 writes
    a, b = load_file(str(tmp_path / "one" / "optimizer.safetensors")), load_file(str(tmp_path / "two" / "optimizer.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    la = [json.loads(l) for l in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(l) for l in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [l["meta_loss"] for l in la] == [l["meta_loss"] for l in lb]
    assert [l["tasks_ok"] for l in lb] == [5, 5, 5]
    # the meta-parameters moved, so the comparison is not trivial
    assert not torch.equal(a["log_step_size"], torch.full_like(a["log_step_size"], a["log_step_size"].flatten()[0]))


def _gloo_threads() -> list[str]:
    """Names of this process's threads that belong to gloo or the TCPStore (Linux /proc)."""
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            names.append(Path(f"/proc/self/task/{tid}/comm").read_text().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return [n for n in names if "gloo" in n or "tcpstore" in n]


def _join_gather_leave() -> int:
    """A --jobs rank in small: join, build an Adam after joining (as the trainer does; it imports
    torch._dynamo), all-gather, leave. 0 when no gloo or store thread outlives leave()."""
    import torch.distributed as dist
    from metascale.meta.distributed import gather_in_task_order, init_from_env, leave
    assert init_from_env(torch.device("cpu"))
    if not _gloo_threads():
        return 2  # the check below could not see them
    torch.optim.Adam([torch.zeros(2, requires_grad=True)])
    rows = gather_in_task_order(torch.full((2, 1), float(dist.get_rank())), 4)
    assert rows.flatten().tolist() == [0.0, 1.0, 0.0, 1.0]
    leave()
    left = _gloo_threads()
    if left:
        print(f"threads alive after leave(): {left}", file=sys.stderr)
        return 3
    return 0


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="thread names from Linux /proc")
def test_leave_stops_gloo_threads():
    """leave() joins gloo's threads before the rank goes on: a gloo worker still alive at interpreter
    exit can abort the process ('terminate called without an active exception')."""
    from metascale import parallel
    assert parallel.launch(_join_gather_leave, (), 2, threads=1) == 0
