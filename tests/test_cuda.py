"""CUDA checks (``pytest -m cuda``; run by ``benchmarks/gpu.sh``; skipped without a GPU): the
exported optimizers, meta-training, evaluation runs and the GradScaler fold give the CPU's
numbers on CUDA up to float32 rounding."""
from __future__ import annotations

import json

import pytest
import torch

import metascale
from metascale.cli import main

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

SPEC = """description = "tiny CUDA check"
[family]
name = "sine"
hidden = [16]
[inner]
steps = 5
[meta]
batch_size = 4
steps = 2
[evaluate]
tasks = 3
tune_tasks = 2
"""


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(SPEC)
    return path


def meta_train(tmp_path, spec, out, device, *extra):
    assert main(["meta-train", "--spec", str(spec), "--out", str(tmp_path / out), "--quiet", "--device", device,
                 "--jobs", "1", *extra]) == 0
    return tmp_path / out / "optimizer.safetensors"


@pytest.mark.parametrize("rule", ["layerwise", "adaptive-momentum"])
def test_meta_train_on_cuda_matches_cpu(tmp_path, spec, rule):
    from safetensors.torch import load_file
    a = load_file(str(meta_train(tmp_path, spec, "cpu", "cpu", "--rule", rule)))
    b = load_file(str(meta_train(tmp_path, spec, "cuda", "cuda", "--rule", rule)))
    assert set(a) == set(b)
    for k in a:  # two Adam meta-steps of size ~lr from the same start: float32 rounding only
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    lines = [json.loads(l) for l in (tmp_path / "cuda" / "metrics.jsonl").read_text().splitlines()]
    assert [l["tasks_ok"] for l in lines] == [4, 4]


@pytest.mark.parametrize("rule", ["layerwise", "adaptive", "adaptive-momentum"])
def test_frozen_optimizer_on_cuda_matches_cpu(tmp_path, spec, rule):
    path = meta_train(tmp_path, spec, rule, "cpu", "--rule", rule, "--meta-steps", "1")
    finals = []
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2)).to(device)
        x = torch.linspace(-1, 1, 24 * 3).reshape(24, 3).to(device)
        y = torch.stack([x.sum(1).sin(), x[:, 0] * x[:, 1]], 1)
        start = model[0].weight.detach().cpu().clone()
        opt = metascale.load_optimizer(path, model.parameters(), total_steps=20)
        for _ in range(20):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        finals.append([p.detach().cpu() for p in model.parameters()])
    for a, b in zip(*finals):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert not torch.equal(finals[0][0], start)  # it trained


def test_evaluate_on_cuda_matches_cpu(tmp_path, spec):
    path = meta_train(tmp_path, spec, "opt", "cpu", "--meta-steps", "1")
    res = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.json"
        assert main(["evaluate", str(path), "--spec", str(spec), "--quiet", "--device", device, "--jobs", "1",
                     "--baselines", "adam", "--json", str(out)]) == 0
        res[device] = json.loads(out.read_text())["optimizers"]
    for name in ("adam", "learned"):
        assert res["cuda"][name]["final_losses"] == pytest.approx(res["cpu"][name]["final_losses"], rel=1e-3, abs=1e-5)
    assert res["cuda"]["adam"]["tuned_lr"] == res["cpu"]["adam"]["tuned_lr"]


@pytest.mark.parametrize("kernel", ["foreach", "fused"])
def test_scaled_adam_fold_on_cuda(kernel):
    from metascale.scaling.optimizers import ScaledAdam
    torch.manual_seed(0)
    ref = [torch.nn.Parameter(torch.randn(64, 32, device="cuda")) for _ in range(3)]
    mine = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    grads = [[torch.randn_like(p) for p in ref] for _ in range(5)]
    opt_ref = torch.optim.Adam(ref, lr=1e-2, **{kernel: True})
    opt = ScaledAdam(mine, lr=1e-2, mode="invariant")
    s_ref, s = (torch.amp.GradScaler("cuda", init_scale=2.0 ** 12, growth_interval=10 ** 9) for _ in range(2))
    for gs in grads:  # GradScaler-scaled gradients: unscale_ + Adam against the fold
        for p, q, g in zip(ref, mine, gs):
            p.grad, q.grad = g * 2.0 ** 12, g * 2.0 ** 12
        s_ref.scale(torch.ones((), device="cuda"))
        s.scale(torch.ones((), device="cuda"))
        s_ref.step(opt_ref), s_ref.update()
        s.step(opt), s.update()
    for p, q in zip(ref, mine):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_jobs_refused_beyond_visible_gpus(tmp_path, spec, capsys):
    n = torch.cuda.device_count()
    assert main(["meta-train", "--spec", str(spec), "--out", str(tmp_path / "x"), "--quiet", "--device", "cuda",
                 "--jobs", str(n + 1)]) == 2
    assert "one GPU per process" in capsys.readouterr().err
