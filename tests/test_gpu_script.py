"""benchmarks/gpu.sh runs end to end on the CPU (``--device cpu --quick``): the CUDA tests skip
cleanly, every step writes its JSON, and the summary collects them."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_script_on_cpu_quick(tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--device", "cpu", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = {p.name for p in out.glob("*.json")}
    assert names == {"pytest_cuda.json", "meta_rate.json", "vmap_tasks.json", "amp_adam.json", "step_cost.json",
                     "summary.json"}
    tests = json.loads((out / "pytest_cuda.json").read_text())
    assert tests["returncode"] == 0 and tests["counts"].get("skipped", 0) >= 1 and "failed" not in tests["counts"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"] == "cpu" and summary["meta_steps_per_s"]["cpu1"] > 0
    assert {"adam_fused", "sgd_momentum", "layerwise", "adaptive", "adaptive_momentum"} <= set(summary["step_ms"])
    assert set(summary["amp_time_ratio_to_unscale_plus_adam_foreach"]) >= {"adam_foreach", "scaled_adam"}
    assert json.loads((out / "vmap_tasks.json").read_text())["meta_gradient_rel_diff"] < 1e-4


def test_gpu_script_refuses_cuda_without_a_device(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "no CUDA device" in proc.stderr
