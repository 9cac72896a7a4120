"""Meta-gradient estimators: ES and PES against analytic and backpropagated meta-gradients,
full backprop across windows, resume with the PES particles, and two ranks = one process.

The analytic problem: one weight ``w`` trained on ``w^2`` by the layer-wise rule without
momentum, step ``c = exp(theta_eta + theta_s)``: ``w_t = (1 - 2c)^t w_0``, so the final
validation loss after ``T`` steps is ``L = (1 - 2c)^{2T} w_0^2`` and
``dL/dtheta_eta = dL/dtheta_s = -4 T c (1 - 2c)^{2T - 1} w_0^2``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from metascale.inner.func_engine import unroll_func
from metascale.meta import MetaTrainer
from metascale.meta.estimators import PES, es_gradient, es_row, flatten, perturbation
from metascale.optim import RULES, LayerwiseConfig
from metascale.spec import InnerConfig, SpecError, load_spec
from metascale.tasks.base import Task

F64 = torch.float64
CFG = LayerwiseConfig(init_lr=0.05, momentum=0.0, per_step=False, depth_bins=1)


def quadratic_task() -> Task:
    one, zero = torch.ones(1, 1, dtype=F64), torch.zeros(1, 1, dtype=F64)
    return Task(family="quadratic-1d", split="train", index=0, seed=3, config={}, kind="regression",
                x_train=one, y_train=zero, x_val=one, y_val=zero,
                build_model=lambda: nn.Linear(1, 1, bias=False), batch_size=1)


def meta(theta_eta: float = math.log(0.05), theta_s: float = 0.3) -> dict[str, torch.Tensor]:
    m = RULES["layerwise"].init_meta(CFG, 1, dtype=F64)
    m["log_step_size"][0] = theta_eta  # the matrix role: the weight
    m["log_scale"][0] = theta_s
    return m


def analytic(m: dict, T: int, w0: float) -> torch.Tensor:
    """dL/d(flat meta) of the final loss after T steps (the vector role gets no gradient)."""
    c = math.exp(float(m["log_step_size"][0].detach()) + float(m["log_scale"][0].detach()))
    d = -4 * T * c * (1 - 2 * c) ** (2 * T - 1) * w0 ** 2
    return torch.tensor([d, 0.0, d, 0.0], dtype=F64)  # log_step_size (matrix, vector), log_scale (...)


def w0() -> float:
    return float(quadratic_task().make_model(dtype=F64).weight.detach())


def test_the_analytic_problem_is_what_the_unroll_computes():
    m = {k: v.requires_grad_() for k, v in meta().items()}
    res = unroll_func(quadratic_task(), m, CFG, 5, objective="final")
    g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(res.meta_loss, list(m.values()))])
    assert torch.allclose(g, analytic(m, 5, w0()), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("pairs, tol", [(200, 0.3), (1000, 0.12)])
def test_es_converges_to_the_analytic_meta_gradient(pairs, tol):
    """ES through the real inner loop (5 steps): relative error under 30% with 200 antithetic
    pairs, under 12% with 1,000 (sigma = 1e-3; the error shrinks as 1/sqrt(pairs): measured
    7-17% and 4-7% over three seeds, and under 5% with 3,000)."""
    m, inner = meta(), InnerConfig(steps=5, objective="final")
    task, want = quadratic_task(), analytic(meta(), 5, w0())
    row = es_row(task, m, CFG, inner, sigma=1e-3, pairs=pairs, seed=0, step=0, index=0, device=None)
    g = row[2:]
    assert float(torch.linalg.vector_norm(g - want) / torch.linalg.vector_norm(want)) < tol


def test_es_gradient_is_exact_for_a_linear_objective_up_to_sampling():
    """The estimator alone, on a closed form: for L = a.theta the antithetic estimate is
    mean(eps eps^T) a, which tends to a (relative error ~ sqrt(d / pairs))."""
    a = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    for pairs, tol in ((100, 0.4), (20_000, 0.03)):
        g, _ = es_gradient(lambda th: float(a @ th), torch.zeros(3, dtype=F64), 0.1, pairs,
                           lambda i: perturbation(0, 7, 0, i, 3))
        assert float(torch.linalg.vector_norm(g - a) / torch.linalg.vector_norm(a)) < tol


def test_pes_mean_matches_full_horizon_backprop():
    """PES over 3 windows of 2 steps, 600 particles on one task (no staggering), against the
    exact gradient of the mean window objective with the graph kept across windows: relative
    error under 15% (sigma = 1e-3; measured 11-15% with 300 particles, under 10% with 1,000)."""
    task = quadratic_task()
    inner = InnerConfig(steps=2, windows=3, objective="final", engine="func")
    m = meta(theta_s=0.6)
    # exact: backprop through all three windows
    mg = {k: v.clone().requires_grad_() for k, v in m.items()}
    state, losses = None, []
    for _ in range(3):
        res = unroll_func(task, mg, CFG, 2, objective="final", state=state, total_steps=6)
        state, _ = res.state, losses.append(res.meta_loss)
    exact = torch.cat([x.reshape(-1) for x in torch.autograd.grad(torch.stack(losses).mean(), list(mg.values()))])
    n = 600
    pes = PES(lambda draw: task, CFG, inner, sigma=1e-3, seed=0, batch=n, device=None, stagger=False)
    total = torch.zeros(4, dtype=F64)
    for step in range(3):  # every particle through windows 0, 1, 2
        rows = torch.stack([pes.row(j, step, m) for j in range(n)])
        total += rows[:, 2:].mean(0) / 3
    assert float(torch.linalg.vector_norm(total - exact) / torch.linalg.vector_norm(exact)) < 0.15
    assert all(p.window == 0 and p.draw == j + n for j, p in pes.particles.items())  # all started over


def test_tail_weights_count_the_last_windows():
    """[inner] tail: the last round(tail * N) windows, each weighted N / n; at least one."""
    w = lambda tail, n=4, k=5: [InnerConfig(steps=k, windows=n, tail=tail).window_weight(i * k) for i in range(n)]
    assert w(1.0) == [1.0] * 4 and w(0.5) == [0.0, 0.0, 2.0, 2.0] and w(0.01) == [0.0, 0.0, 0.0, 4.0]
    assert InnerConfig(steps=3).window_weight(0) == 1.0  # one window: always counted


def test_tail_share_blends_the_whole_run_and_the_tail():
    """[inner] tail_share a: weights (1 - a) + a N / n on the last n windows, 1 - a before them;
    they average 1, a = 1 is the tail alone and a = 0 the whole run."""
    def w(a, tail=0.25, n=8, k=3):
        return [InnerConfig(steps=k, windows=n, tail=tail, tail_share=a).window_weight(i * k) for i in range(n)]
    assert w(1.0) == [0.0] * 6 + [4.0, 4.0] and w(0.0) == [1.0] * 8
    assert w(0.5) == [0.5] * 6 + [2.5, 2.5] and sum(w(0.3)) == pytest.approx(8.0, abs=1e-12)
    assert w(0.5, tail=1.0) == [1.0] * 8  # the tail is the whole run: the share does not matter


def test_tail_share_out_of_range_is_refused(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(SPEC.format(est="backprop").replace('engine = "func"', 'engine = "func"\ntail_share = 1.5'))
    with pytest.raises(SpecError, match="tail_share"):
        load_spec(path)


def test_pes_with_a_tail_matches_backprop_of_the_last_window():
    """With tail = 1/3 of 3 windows, the meta-objective is the last window's loss alone; PES
    (which runs, but does not count, the first two windows) estimates its gradient through the
    whole horizon: within 15% of the exact gradient with the graph kept across the windows,
    600 particles (as the full-objective test)."""
    task = quadratic_task()
    inner = InnerConfig(steps=2, windows=3, objective="final", engine="func", tail=1 / 3)
    m = meta(theta_s=0.6)
    mg = {k: v.clone().requires_grad_() for k, v in m.items()}
    state = None
    for _ in range(3):
        res = unroll_func(task, mg, CFG, 2, objective="final", state=state, total_steps=6)
        state = res.state
    exact = torch.cat([x.reshape(-1) for x in torch.autograd.grad(res.meta_loss, list(mg.values()))])
    n = 600
    pes = PES(lambda draw: task, CFG, inner, sigma=1e-3, seed=1, batch=n, device=None, stagger=False)
    total = torch.zeros(4, dtype=F64)
    for step in range(3):
        rows = torch.stack([pes.row(j, step, m) for j in range(n)])
        if step < 2:
            assert float(rows[:, 1:].abs().max()) == 0.0  # uncounted windows: no loss, no estimate
        total += rows[:, 2:].mean(0) / 3
    assert float(torch.linalg.vector_norm(total - exact) / torch.linalg.vector_norm(exact)) < 0.15


def test_truncation_is_biased_where_pes_is_not():
    """Truncated backprop over the same windows misses how a window's loss depends on the
    meta-parameters through the earlier windows: its error against the exact gradient is large
    here (over 30%), which is the bias PES removes."""
    task = quadratic_task()
    m = {k: v.requires_grad_() for k, v in meta(theta_s=0.6).items()}
    state, exact_losses, trunc = None, [], torch.zeros(4, dtype=F64)
    for _ in range(3):
        res = unroll_func(task, m, CFG, 2, objective="final", state=state.detach() if state else None, total_steps=6)
        trunc += torch.cat([x.reshape(-1) for x in torch.autograd.grad(res.meta_loss, list(m.values()))]) / 3
        state = res.state
    state = None
    for _ in range(3):
        res = unroll_func(task, m, CFG, 2, objective="final", state=state, total_steps=6)
        state, _ = res.state, exact_losses.append(res.meta_loss)
    exact = torch.cat([x.reshape(-1) for x in torch.autograd.grad(torch.stack(exact_losses).mean(), list(m.values()))])
    assert float(torch.linalg.vector_norm(trunc - exact) / torch.linalg.vector_norm(exact)) > 0.3


SPEC = """description = "tiny estimator check"
[family]
name = "sine"
hidden = [8]
n_train = 10
n_val = 20
[inner]
steps = 2
windows = 3
engine = "func"
[meta]
batch_size = 4
steps = 4
select_every = 0
estimator = "{est}"
sigma = 0.01
"""


def spec_for(tmp_path: Path, est: str):
    path = tmp_path / f"{est}.toml"
    path.write_text(SPEC.format(est=est))
    return load_spec(path)


def test_backprop_estimator_keeps_the_graph_across_windows(tmp_path):
    """estimator = backprop meta-trains on the exact gradient over all windows; truncated does not."""
    a = MetaTrainer(spec_for(tmp_path, "backprop"), seed=0, device="cpu", progress=False, meta_steps=1).train()
    b = MetaTrainer(spec_for(tmp_path, "truncated"), seed=0, device="cpu", progress=False, meta_steps=1).train()
    assert not torch.equal(a.meta["log_step_size"], b.meta["log_step_size"])
    assert a.summary["skipped_tasks"] == b.summary["skipped_tasks"] == 0


@pytest.mark.parametrize("est", ["es", "pes"])
def test_resume_is_bit_identical_including_the_pes_particles(tmp_path, est):
    spec = spec_for(tmp_path, est)
    run = lambda steps, folder, resume=False: MetaTrainer(spec, seed=0, device="cpu", progress=False,
                                                           meta_steps=steps, rule="layerwise").train(
        tmp_path / folder / "metrics.jsonl", checkpoint_path=tmp_path / folder / "ck.safetensors",
        checkpoint_every=2, resume=resume)
    whole = run(4, "whole")
    run(2, "cut")
    resumed = run(4, "cut", resume=True)
    for k in whole.meta:
        assert torch.equal(whole.meta[k], resumed.meta[k]), k
    moved = RULES["layerwise"].init_meta(spec.rule_config("layerwise"), 6)["log_step_size"]
    assert not torch.equal(whole.meta["log_step_size"], moved)
    if est == "pes":
        assert len(list((tmp_path / "cut").glob("ck.pes-rank0.step*.safetensors"))) == 2  # steps 2 and 4


def test_estimators_need_learn_optimizer(tmp_path):
    with pytest.raises(ValueError, match="learn='optimizer'"):
        MetaTrainer(spec_for(tmp_path, "pes"), seed=0, device="cpu", progress=False, meta_steps=1, learn="loss",
                    inner_lr=0.01).train()


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun not installed")
def test_pes_two_gloo_ranks_equal_one_process(tmp_path):
    spec = tmp_path / "pes.toml"
    spec.write_text(SPEC.format(est="pes"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "METASCALE_JOBS": "1"}
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    common = ["meta-train", "--spec", str(spec), "--quiet", "--device", "cpu", "--rule", "layerwise"]
    one = subprocess.run([sys.executable, "-m", "metascale.cli", *common, "--out", "one"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29533", "-m", "metascale.cli",
                          *common, "--out", "two"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = load_file(str(tmp_path / "one" / "optimizer.safetensors")), load_file(str(tmp_path / "two" / "optimizer.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    la = [json.loads(line)["meta_loss"] for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(line)["meta_loss"] for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert la == lb and len(la) == 4


@pytest.mark.parametrize("est", ["backprop", "truncated", "es"])
def test_mixed_windows_give_each_block_of_the_meta_batch_its_horizon(tmp_path, est, monkeypatch):
    """[inner] mixed_windows = [1, 3]: tasks 0, 1 of the meta-batch of 4 run 1 window of 2
    steps (T = 2), tasks 2, 3 run 3 windows (T = 6), and every window's rule reads its own
    task's horizon; mixed_windows = [3, 3] is the plain spec, bit for bit."""
    import metascale.meta.estimators as estimators
    import metascale.meta.trainer as trainer
    seen = []
    for module in (trainer, estimators):
        real = module.unroll_func
        def spy(*a, real=real, **k):
            seen.append(k["total_steps"])
            return real(*a, **k)
        monkeypatch.setattr(module, "unroll_func", spy)
    text = SPEC.format(est=est).replace("windows = 3\n", "windows = 3\nmixed_windows = [1, 3]\n")
    (tmp_path / "mixed.toml").write_text(text)
    MetaTrainer(load_spec(tmp_path / "mixed.toml"), seed=0, device="cpu", progress=False, meta_steps=1,
                rule="layerwise").train()
    per_run = [2] + [6] * 3  # one task's run: a window of T = 2, or 3 windows of T = 6
    pairs = 2 if est == "es" else 1  # ES: an antithetic pair of runs per task
    assert seen == (per_run[:1] * pairs) * 2 + (per_run[1:] * pairs) * 2
    same = SPEC.format(est=est).replace("windows = 3\n", "windows = 3\nmixed_windows = [3, 3]\n")
    (tmp_path / "same.toml").write_text(same)
    run = lambda path: MetaTrainer(load_spec(path), seed=0, device="cpu", progress=False, meta_steps=2,
                                   rule="layerwise").train().meta
    a, b = run(tmp_path / "same.toml"), run(spec_for(tmp_path, est).path)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mixed_windows_are_refused_with_pes(tmp_path):
    mixed = SPEC.format(est="pes").replace("windows = 3\n", "windows = 3\nmixed_windows = [1, 3]\n")
    (tmp_path / "pes.toml").write_text(mixed)
    with pytest.raises(SpecError, match="mixed_windows is not allowed with"):
        load_spec(tmp_path / "pes.toml")
    assert InnerConfig(steps=2, windows=3, mixed_windows=(1, 3)).for_task(1, 4).windows == 1
    assert InnerConfig(steps=2, windows=3, mixed_windows=(1, 3)).for_task(2, 4).horizon == 6
    with pytest.raises(ValueError, match="at most"):
        InnerConfig(steps=1000, windows=1, mixed_windows=(1, 200)).validate()


def test_mixed_tails_give_each_block_of_the_meta_batch_its_tail(tmp_path, monkeypatch):
    """[inner] mixed_tails = [1, 1/3] with mixed_windows = [1, 3]: the T = 2 block counts its
    whole run and the T = 6 block its last window alone; mixed_tails = [t, t] is the plain
    spec with tail = t, bit for bit."""
    seen = set()
    real = InnerConfig.window_weight
    def spy(self, start):
        seen.add((self.windows, self.tail))
        return real(self, start)
    monkeypatch.setattr(InnerConfig, "window_weight", spy)
    mixed = "windows = 3\nmixed_windows = [1, 3]\nmixed_tails = [1.0, 0.3]\n"
    (tmp_path / "mixed.toml").write_text(SPEC.format(est="backprop").replace("windows = 3\n", mixed))
    MetaTrainer(load_spec(tmp_path / "mixed.toml"), seed=0, device="cpu", progress=False, meta_steps=1,
                rule="layerwise").train()
    assert seen == {(1, 1.0), (3, 0.3)}
    monkeypatch.undo()
    def run(text):
        (tmp_path / "s.toml").write_text(text)
        return MetaTrainer(load_spec(tmp_path / "s.toml"), seed=0, device="cpu", progress=False, meta_steps=2,
                           rule="layerwise").train().meta
    base = SPEC.format(est="backprop")
    a = run(base.replace("windows = 3\n", "windows = 3\nmixed_windows = [3, 3]\nmixed_tails = [0.3, 0.3]\n"))
    b = run(base.replace("windows = 3\n", "windows = 3\ntail = 0.3\n"))
    c = run(base)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the tail changes the meta-gradient


@pytest.mark.parametrize("keys, message", [("mixed_windows = [1, 3]\nmixed_tails = [1.0]", "one per entry"),
                                           ("mixed_tails = [1.0, 0.5]", "without mixed_windows"),
                                           ("mixed_windows = [1, 3]\nmixed_tails = [1.0, 0.0]", "mixed_tails")])
def test_mixed_tails_bad_input_is_refused(tmp_path, keys, message):
    path = tmp_path / "s.toml"
    path.write_text(SPEC.format(est="backprop").replace("windows = 3\n", f"windows = 3\n{keys}\n"))
    with pytest.raises(SpecError, match=message):
        load_spec(path)
