"""Diverging inner runs: tasks whose meta-loss or meta-gradient is not finite are dropped from
the meta-gradient, counted, logged per meta-step in metrics.jsonl, reported in the export
summary and by the CLI; a meta-step whose tasks all diverge changes nothing."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import metascale.spec
from metascale.cli import main
from metascale.export import read_optimizer
from metascale.inner import unroll
from metascale.meta import MetaTrainer
from metascale.meta.checkpoint import read_checkpoint
from metascale.meta.trainer import clipped_mean
from metascale.optim import RULES

init_meta = RULES["layerwise"].init_meta
from metascale.spec import Spec, load_spec

SINE = Path(__file__).resolve().parent.parent / "tasks" / "sine.toml"


class Singular(nn.Module):
    """``model(x) + |v|^1.5`` with ``v = model(x) - model(x).detach()``, which is exactly 0: the
    same value and the same first derivative as ``model`` (so the same inner run and a finite
    meta-loss), but the second derivative of ``|v|^1.5`` at 0 is infinite (the sqrt-at-zero trap
    of differentiable optimizers) and the meta-gradient, which differentiates through the inner
    gradients, is NaN."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model(x)
        return y + (y - y.detach()).abs() ** 1.5


class DivergingSampler:
    """A sampler whose chosen draws blow up: ``"inputs"`` multiplies the inputs by 1e6 (the
    inner loss overflows), ``"curvature"`` wraps the model in :class:`Singular` (finite loss,
    non-finite meta-gradient)."""

    def __init__(self, inner, draws: dict[int, str]):
        self.inner, self.draws = inner, draws

    def task(self, index: int):
        task = self.inner.task(index)
        how = self.draws.get(index)
        if how == "inputs":
            return dataclasses.replace(task, x_train=task.x_train * 1e6, x_val=task.x_val * 1e6)
        if how == "curvature":
            build = task.build_model
            return dataclasses.replace(task, build_model=lambda: Singular(build()))
        assert how is None, how
        return task


@dataclasses.dataclass(frozen=True)
class DivergingSpec(Spec):
    """A spec whose meta-train draws in ``draws`` diverge (see :class:`DivergingSampler`)."""

    draws: tuple = ()

    def sampler(self, split: str, seed: int):
        return DivergingSampler(super().sampler(split, seed), dict(self.draws) if split == "train" else {})


B = 3
DRAWS = ((1, "inputs"), (4, "curvature"), (6, "inputs"), (7, "curvature"), (8, "inputs"))  # step 2: all three


def spec(draws=DRAWS, steps: int = 4, engine: str = "higher", batch: int = B, clip: float = 1.0) -> DivergingSpec:
    base = load_spec(SINE)
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(Spec)}
    fields.update(family=dataclasses.replace(base.family, hidden=(8,), n_val=20),
                  inner=dataclasses.replace(base.inner, steps=3, engine=engine),
                  meta=dataclasses.replace(base.meta, batch_size=batch, steps=steps, clip=clip))
    return DivergingSpec(**fields, draws=tuple(draws))


def meta_loss_and_grad(task, s: Spec) -> tuple[float, bool]:
    """An independent unroll at the initial meta-parameters: (meta-loss, meta-gradient finite)."""
    meta = {k: v.requires_grad_(True) for k, v in init_meta(s.rules["optimizer"], s.inner.horizon).items()}
    res = unroll(task, meta, s.rules["optimizer"], s.inner.steps, objective=s.inner.objective, device="cpu")
    if not torch.isfinite(res.meta_loss):
        return float(res.meta_loss.detach()), False
    grads = torch.autograd.grad(res.meta_loss, list(meta.values()))
    return float(res.meta_loss.detach()), all(bool(torch.isfinite(g).all()) for g in grads)


def test_the_chosen_draws_really_diverge():
    """Without this the counts below would prove nothing: at the initial meta-parameters the
    "inputs" draws have a non-finite meta-loss, the "curvature" draws a finite meta-loss but a
    non-finite meta-gradient, and every other draw is finite."""
    s = spec()
    sampler = s.sampler("train", 0)
    for i in range(12):
        loss, grad_ok = meta_loss_and_grad(sampler.task(i), s)
        how = dict(DRAWS).get(i)
        if how == "inputs":
            assert not math.isfinite(loss), i
        elif how == "curvature":  # the very inner run of the unwrapped model, NaN meta-gradient
            assert loss == meta_loss_and_grad(sampler.inner.task(i), s)[0] and not grad_ok, (i, loss)
        else:
            assert math.isfinite(loss) and grad_ok, (i, loss)


@pytest.mark.parametrize("engine", ["higher", "func"])
def test_diverging_tasks_are_dropped_counted_and_logged(tmp_path, engine):
    res = MetaTrainer(spec(engine=engine), seed=0, device="cpu", progress=False).train(tmp_path / "m.jsonl")
    recs = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["skipped_draws"] for r in recs] == [[1], [4], [6, 7, 8], []]
    assert [r["tasks_skipped"] for r in recs] == [1, 1, 3, 0]
    assert [r["tasks_ok"] for r in recs] == [2, 2, 0, 3]
    assert [r["skipped_total"] for r in recs] == [1, 2, 5, 5]
    assert recs[2]["meta_loss"] is None and recs[2]["meta_grad_norm"] is None
    assert all(math.isfinite(recs[i]["meta_loss"]) and recs[i]["meta_grad_norm"] > 0 for i in (0, 1, 3))
    assert recs[2]["learned"] == recs[1]["learned"]  # the empty meta-step moved nothing
    assert res.summary["skipped_tasks"] == 5 and res.summary["skipped_meta_steps"] == 1
    assert all(torch.isfinite(v).all() for v in res.meta.values())
    assert not torch.equal(res.meta["log_step_size"], init_meta(spec().rules["optimizer"], 3)["log_step_size"])


def test_a_dropped_task_leaves_no_trace_in_the_update(tmp_path):
    """Step 0 with draws (0 ok, 1 diverging) updates exactly as a meta-batch of draw 0 alone."""
    two = MetaTrainer(spec(draws=((1, "curvature"),), steps=1, batch=2), seed=0, device="cpu", progress=False).train()
    one = MetaTrainer(spec(draws=(), steps=1, batch=1), seed=0, device="cpu", progress=False).train()
    assert two.summary["skipped_tasks"] == 1 and one.summary["skipped_tasks"] == 0
    for k in one.meta:
        assert torch.equal(two.meta[k], one.meta[k]), k


def test_an_all_diverged_meta_step_changes_nothing(tmp_path):
    """Meta-parameters and Adam's state (moments and step count) after meta-step 2, whose three
    tasks all diverge, are bitwise those after meta-step 1 (read from the checkpoints)."""
    states = {}
    for steps in (2, 3):
        out = tmp_path / str(steps)
        MetaTrainer(spec(steps=steps), seed=0, device="cpu", progress=False).train(
            out / "m.jsonl", checkpoint_path=out / "ck.safetensors", checkpoint_every=1)
        states[steps] = read_checkpoint(out / "ck.safetensors")
    a, b = states[2], states[3]
    assert (b.step, b.skipped, b.history[2]) == (3, 5, None)
    assert a.meta.keys() == b.meta.keys() and all(torch.equal(a.meta[k], b.meta[k]) for k in a.meta)
    assert a.adam.keys() == b.adam.keys()
    for p in a.adam:
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(a.adam[p][k], b.adam[p][k]), (p, k)
    assert float(b.adam["meta.log_scale"]["step"]) == 2  # Adam stepped on meta-steps 0 and 1 only


def test_every_task_diverging_keeps_the_initial_meta_parameters():
    s = spec(draws=tuple((i, "inputs") for i in range(6)), steps=2)
    res = MetaTrainer(s, seed=0, device="cpu", progress=False).train()
    assert res.summary["skipped_tasks"] == 6 and res.summary["skipped_meta_steps"] == 2
    assert res.summary["first_meta_loss"] is None and res.summary["final_meta_loss_avg_last_10pct"] is None
    init = init_meta(s.rules["optimizer"], 3)
    assert all(torch.equal(res.meta[k], init[k]) for k in init)


def test_cli_reports_the_divergence(tmp_path, capsys, monkeypatch):
    """End to end through `metascale meta-train`: the warning line, and the counts in the
    exported summary."""
    monkeypatch.setattr(metascale.spec, "load_spec", lambda path: spec())
    code = main(["meta-train", "--spec", str(SINE), "--out", str(tmp_path / "run"), "--quiet", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "skipped tasks 5)" in out
    assert ("warning: 5 inner run(s) diverged (non-finite loss or meta-gradient) and were dropped from the "
            "meta-gradient; 1 meta-step(s) had no finite task and left the meta-parameters unchanged") in out
    summary = read_optimizer(tmp_path / "run" / "optimizer.safetensors").summary
    assert summary["skipped_tasks"] == 5 and summary["skipped_meta_steps"] == 1


def test_clipped_mean_is_clip_grad_norm_in_float64():
    g = torch.Generator().manual_seed(0)
    sums = [torch.randn(2, 3, 4, generator=g, dtype=torch.float64) * 3,
            torch.randn(5, generator=g, dtype=torch.float64)]
    for clip in (0.0, 0.5, 1e6):
        mean, norm = clipped_mean(sums, 2, clip)
        params = [torch.zeros_like(s, requires_grad=True) for s in sums]
        for p, s in zip(params, sums):
            p.grad = s / 2
        ref = float(torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf))
        assert norm == pytest.approx(ref, rel=1e-15)
        for m, p in zip(mean, params):
            torch.testing.assert_close(m, p.grad, rtol=1e-15, atol=0)
    assert clipped_mean(sums, 2, 0.5)[1] > 0.5  # the norm before clipping is reported


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_clipped_mean_of_huge_finite_gradients_stays_finite(clip):
    """Per-task meta-gradients near float32's limit: their float32 sum or norm overflows, the
    float64 mean and clip do not."""
    big = torch.full((4,), 3e38, dtype=torch.float64)
    mean, norm = clipped_mean([big * 3], 3, clip)  # the sum of three tasks' float32-finite gradients
    assert math.isfinite(norm) and norm == pytest.approx(6e38, rel=1e-12)
    assert torch.isfinite(mean[0].float()).all()
    assert float(torch.linalg.vector_norm(mean[0])) == pytest.approx(1.0 if clip else 6e38, rel=1e-6)
    assert not torch.isfinite((big.float() * 3)).all()  # what a float32 accumulator would have held
