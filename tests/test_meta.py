"""Meta-gradients (float64 gradcheck), reproducibility and robustness of the meta-trainer."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from metascale.inner import meta_objective, unroll
from metascale.meta import MetaTrainer
from metascale.optim import RULES, LayerwiseConfig

init_meta = RULES["layerwise"].init_meta
from metascale.spec import load_spec
from metascale.tasks import SineConfig, SineFamily, TaskSampler

SPECS = Path(__file__).resolve().parent.parent / "tasks"




def small_task(index: int = 0):
    fam = SineFamily(SineConfig(hidden=(6,), n_train=8, n_val=16))
    return TaskSampler(fam, "train", seed=5, batch_size=4).task(index)


@pytest.mark.parametrize("objective", ["log_mean", "final"])
@pytest.mark.parametrize("momentum, nesterov", [(0.0, False), (0.9, False), (0.5, True)])
def test_meta_gradient_gradcheck_float64(objective, momentum, nesterov):
    """d meta-loss / d (log step sizes, log scales) through a 4-step higher unroll equals
    finite differences in float64."""
    cfg = LayerwiseConfig(init_lr=0.05, momentum=momentum, nesterov=nesterov, depth_bins=2)
    g = torch.Generator().manual_seed(0)
    meta0 = init_meta(cfg, 4, dtype=torch.float64)
    inputs = tuple((v + 0.2 * torch.randn(v.shape, generator=g, dtype=torch.float64)).requires_grad_()
                   for v in meta0.values())
    task = small_task()

    def f(log_step_size, log_scale):
        return unroll(task, {"log_step_size": log_step_size, "log_scale": log_scale}, cfg, 4,
                      objective=objective).meta_loss

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)
    # the gradient is not trivially zero
    grads = torch.autograd.grad(f(*inputs), inputs)
    assert all(gr.abs().sum() > 1e-6 for gr in grads)


def test_meta_objective_reductions():
    losses = [torch.tensor(4.0), torch.tensor(1.0), torch.tensor(1.0)]
    assert meta_objective(losses, "mean").item() == 2.0
    assert meta_objective(losses, "log_mean").item() == pytest.approx(math.log(2.0), abs=1e-7)
    assert meta_objective(losses, "final").item() == 1.0
    assert meta_objective(losses, "log_final").item() == 0.0


def test_untracked_unroll_matches_tracked_values():
    cfg = LayerwiseConfig()
    meta = init_meta(cfg, 5, dtype=torch.float64)
    a = unroll(small_task(), meta, cfg, 5, track_higher_grads=True)
    b = unroll(small_task(), meta, cfg, 5, track_higher_grads=False)
    assert a.val_losses == pytest.approx(b.val_losses, rel=1e-12)


def tiny_spec(name: str = "sine.toml", **over):
    spec = load_spec(SPECS / name)
    return dataclasses.replace(
        spec, inner=dataclasses.replace(spec.inner, steps=over.get("K", 4)),
        meta=dataclasses.replace(spec.meta, batch_size=over.get("B", 2), steps=over.get("steps", 3)),
        rules={**spec.rules, "optimizer": dataclasses.replace(spec.rules["optimizer"], **over.get("opt", {}))})


def test_same_seed_same_meta_training_result(tmp_path):
    r1 = MetaTrainer(tiny_spec(), seed=7, device="cpu", progress=False).train(tmp_path / "a.jsonl")
    r2 = MetaTrainer(tiny_spec(), seed=7, device="cpu", progress=False).train(tmp_path / "b.jsonl")
    r3 = MetaTrainer(tiny_spec(), seed=8, device="cpu", progress=False).train()
    for k in r1.meta:
        assert torch.equal(r1.meta[k], r2.meta[k])
    assert not torch.equal(r1.meta["log_step_size"], r3.meta["log_step_size"])
    a = [json.loads(l)["meta_loss"] for l in (tmp_path / "a.jsonl").read_text().splitlines()]
    b = [json.loads(l)["meta_loss"] for l in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert a == b and len(a) == 3


def test_metrics_jsonl_and_meta_parameters_move(tmp_path):
    spec = tiny_spec(steps=4)
    res = MetaTrainer(spec, seed=0, device="cpu", progress=False).train(tmp_path / "m.jsonl")
    lines = [json.loads(l) for l in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [l["meta_step"] for l in lines] == [0, 1, 2, 3]
    for l in lines:
        assert math.isfinite(l["meta_loss"]) and l["meta_grad_norm"] > 0 and l["tasks_ok"] == 2
        assert set(l["learned"]) == {"matrix", "vector"}
        assert len(l["learned"]["matrix"]["step_size"]) == spec.rules["optimizer"].depth_bins
        assert len(l["learned"]["matrix"]["step_size"][0]) == spec.inner.steps
    init = init_meta(spec.rules["optimizer"], spec.inner.steps)
    # Adam moves every entry by about lr per step in the first steps
    moved = (res.meta["log_step_size"] - init["log_step_size"]).abs()
    assert moved.max() > 0.5 * spec.meta.lr and moved.max() < 4 * spec.meta.lr + 1e-6
    last = lines[-1]["learned"]["vector"]["scale"]
    assert torch.allclose(torch.tensor(last), torch.exp(res.meta["log_scale"][1]), rtol=1e-6)


def test_diverging_tasks_are_skipped_and_meta_parameters_stay_finite():
    """A step size of 1e4 makes every inner run overflow: each task is skipped (counted), the
    meta-parameters are left untouched and the run completes."""
    spec = tiny_spec(steps=2, K=30, opt={"init_lr": 1e4, "momentum": 0.9})
    res = MetaTrainer(spec, seed=0, device="cpu", progress=False).train()
    assert res.summary["skipped_tasks"] == 4
    init = init_meta(spec.rules["optimizer"], spec.inner.steps)
    assert torch.equal(res.meta["log_step_size"], init["log_step_size"])
    assert all(torch.isfinite(v).all() for v in res.meta.values())


def test_func_engine_meta_training_matches_higher_engine():
    """The same meta-training with engine = func and engine = higher: equal meta-parameters."""
    a = MetaTrainer(tiny_spec(), seed=3, device="cpu", progress=False).train()
    spec = tiny_spec()
    spec = dataclasses.replace(spec, inner=dataclasses.replace(spec.inner, engine="func"))
    b = MetaTrainer(spec, seed=3, device="cpu", progress=False).train()
    for k in a.meta:
        assert torch.allclose(a.meta[k], b.meta[k], rtol=1e-6, atol=1e-7)


def test_truncated_windows_carry_state_and_learn_a_horizon_long_schedule(tmp_path):
    """windows = 3 of K = 4 steps: the schedule covers 12 steps, every window's meta-gradient
    reaches its own part of the schedule (the graph is cut between windows), and the run is
    deterministic."""
    spec = tiny_spec(K=4, steps=2)
    spec = dataclasses.replace(spec, inner=dataclasses.replace(spec.inner, windows=3))
    assert spec.inner.horizon == 12
    r1 = MetaTrainer(spec, seed=0, device="cpu", progress=False).train(tmp_path / "m.jsonl")
    r2 = MetaTrainer(spec, seed=0, device="cpu", progress=False).train()
    assert r1.meta["log_step_size"].shape[-1] == 12
    assert torch.equal(r1.meta["log_step_size"], r2.meta["log_step_size"])
    init = init_meta(spec.rules["optimizer"], 12)
    moved = (r1.meta["log_step_size"] - init["log_step_size"]).abs().amax(dim=(0, 1))
    assert (moved[:4] > 0).all() and (moved[4:8] > 0).all() and (moved[8:] > 0).all()
