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
