"""Every registered rule, through every front end: one registry entry buys these tests.

For each rule in :data:`metascale.optim.RULES`, with perturbed meta-parameters (so that every
path of the rule is live) in float64:

* the frozen optimizer (in place) equals the ``higher`` engine's differentiable step (1e-12);
* the ``higher`` and ``torch.func`` engines agree on the meta-loss (1e-12) and the
  meta-gradient (1e-10);
* windows with carried state compose into one unroll;
* float64 ``gradcheck`` of the meta-gradient;
* the foreach and per-tensor kernels agree (1e-13);
* a ``state_dict`` round trip continues bit for bit;
* the state per parameter is the rule's declared ``buffers`` (each of the parameter's shape)
  and Python numbers, nothing else;
* an exported file loads to the same optimizer (bit for bit).
"""
from __future__ import annotations

import copy
import dataclasses

import higher
import pytest
import torch
from torch import nn

import metascale
from metascale.export import read_optimizer, save_optimizer
from metascale.inner.func_engine import unroll_func
from metascale.inner.higher_engine import differentiable_optimizer, unroll
from metascale.optim import RULES, LearnedOptimizer
from metascale.spec import load_spec
from metascale.tasks import SineConfig, SineFamily, TaskSampler

from test_optim import data, make_model, run

F64 = torch.float64
SINE = "tasks/sine.toml"
SMALL = {"hidden": 3, "depth_bins": 2, "time_knots": 3, "mup_width": 4}  # shrunk; a t/T schedule; muP on
NAMES = list(RULES)
PER_HORIZON = {"time_horizons": (2, 20)}  # a t/T schedule per horizon anchor; the tests' horizons lie between
CASES = [(n, {}) for n in NAMES] + [(n, PER_HORIZON) for n in NAMES
                                     if "time_horizons" in {f.name for f in dataclasses.fields(RULES[n].config_type)}]
CASE_IDS = [n + ("-per-horizon" if over else "") for n, over in CASES]


def config(name: str, horizon: int, **over):
    """The rule's config from the sine spec's table, shrunk, resolved for ``horizon``."""
    rule = RULES[name]
    cfg = load_spec(SINE).rule_config(name)
    fields = {f.name for f in dataclasses.fields(cfg)}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in {**SMALL, **over}.items() if k in fields})
    if "table_steps" in fields:
        cfg = dataclasses.replace(cfg, table_steps=None)
    return rule.resolve(cfg, horizon)


def perturbed(name: str, cfg, horizon: int, seed: int = 0, spread: float = 0.2, grad: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    meta = RULES[name].init_meta(cfg, horizon, seed=seed, dtype=F64)
    return {k: (v + spread * torch.randn(v.shape, generator=g, dtype=F64)).requires_grad_(grad)
            for k, v in meta.items()}


def small_task(index: int = 0):
    fam = SineFamily(SineConfig(hidden=(6, 5), n_train=8, n_val=16))
    return TaskSampler(fam, "train", seed=5, batch_size=4).task(index)


@pytest.mark.parametrize("name, over", CASES, ids=CASE_IDS)
def test_frozen_step_equals_the_differentiable_step(name, over):
    cfg = config(name, 8, **over)
    meta = perturbed(name, cfg, 8)
    x, y = data()
    m1, m2 = make_model(), make_model()
    frozen = LearnedOptimizer(m1.parameters(), meta, cfg, total_steps=12)
    opt2, override = differentiable_optimizer(m2.parameters(), meta, cfg, 12)
    with higher.innerloop_ctx(m2, opt2, override=override, copy_initial_weights=True) as (fm, diffopt):
        for t in range(12):  # crosses the 8-step horizon of the schedules
            idx = torch.arange(t % 4, x.shape[0], 4)
            frozen.zero_grad()
            nn.functional.mse_loss(m1(x[idx]), y[idx]).backward()
            frozen.step()
            diffopt.step(nn.functional.mse_loss(fm(x[idx]), y[idx]))
        for a, b in zip(m1.parameters(), fm.parameters()):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
    moved = [float((a.detach() - b.detach()).abs().max()) for a, b in zip(m1.parameters(), make_model().parameters())]
    assert min(moved) > 1e-4  # every tensor trained


@pytest.mark.parametrize("name", NAMES)
def test_engines_agree(name):
    cfg = config(name, 6)
    meta = perturbed(name, cfg, 6, grad=True)
    task = small_task()
    a, b = unroll(task, meta, cfg, 6), unroll_func(task, meta, cfg, 6)
    assert b.meta_loss.item() == pytest.approx(a.meta_loss.item(), rel=1e-12)
    ga = torch.autograd.grad(a.meta_loss, list(meta.values()))
    gb = torch.autograd.grad(b.meta_loss, list(meta.values()))
    for x, y in zip(ga, gb):
        assert torch.allclose(x, y, rtol=1e-10, atol=1e-13)
    assert all(float(x.abs().sum()) > 0 for x in ga)  # every meta-parameter tensor gets a gradient


@pytest.mark.parametrize("name", NAMES)
def test_windows_compose_into_one_unroll(name):
    cfg = config(name, 6)
    meta = perturbed(name, cfg, 6, seed=2, grad=True)
    task = small_task(1)
    full = unroll_func(task, meta, cfg, 6, objective="final")
    w1 = unroll_func(task, meta, cfg, 3, objective="final", total_steps=6)
    w2 = unroll_func(task, meta, cfg, 3, objective="final", state=w1.state, total_steps=6)
    assert w2.meta_loss.item() == pytest.approx(full.meta_loss.item(), rel=1e-12)
    for x, y in zip(torch.autograd.grad(full.meta_loss, list(meta.values())),
                    torch.autograd.grad(w2.meta_loss, list(meta.values()))):
        assert torch.allclose(x, y, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name, over", CASES, ids=CASE_IDS)
def test_meta_gradient_gradcheck(name, over):
    cfg = config(name, 3, **over)
    base = perturbed(name, cfg, 3, seed=3)
    names = list(base)
    task = small_task(2)

    def f(*tensors):
        return unroll(task, dict(zip(names, tensors)), cfg, 3, objective="log_mean").meta_loss

    inputs = tuple(base[k].clone().requires_grad_() for k in names)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_foreach_matches_forloop(name):
    cfg = config(name, 7)
    meta = perturbed(name, cfg, 7, seed=4)
    x, y = data()
    m1, m2 = make_model(), make_model()
    run(m1, LearnedOptimizer(m1.parameters(), meta, cfg, total_steps=30, foreach=True), 30, x, y)
    run(m2, LearnedOptimizer(m2.parameters(), meta, cfg, total_steps=30, foreach=False), 30, x, y)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.allclose(a, b, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_resume_continues_exactly(name):
    cfg = config(name, 5)
    meta = perturbed(name, cfg, 5, seed=5)
    x, y = data()
    m1 = make_model()
    o1 = LearnedOptimizer(m1.parameters(), meta, cfg, total_steps=10)
    run(m1, o1, 10, x, y)
    m2 = make_model()
    o2 = LearnedOptimizer(m2.parameters(), meta, cfg, total_steps=10)
    run(m2, o2, 4, x, y)
    saved_model, saved_opt = copy.deepcopy(m2.state_dict()), copy.deepcopy(o2.state_dict())
    m3 = make_model(seed=9)
    m3.load_state_dict(saved_model)
    o3 = LearnedOptimizer(m3.parameters(), meta, cfg, total_steps=10)
    o3.load_state_dict(saved_opt)
    for t in range(4, 10):  # the minibatch sequence of run() from step 4
        idx = torch.arange(t % 4, x.shape[0], 4)
        o3.zero_grad()
        ((m3(x[idx]) - y[idx]) ** 2).mean().backward()
        o3.step()
    for a, b in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_state_is_the_declared_buffers_and_numbers(name):
    cfg = config(name, 5)
    model = make_model()
    x, y = data()
    opt = LearnedOptimizer(model.parameters(), perturbed(name, cfg, 5, seed=7), cfg, total_steps=10)
    run(model, opt, 3, x, y)
    for p in model.parameters():
        tensors = {k for k, v in opt.state[p].items() if torch.is_tensor(v)}
        assert tensors == set(RULES[name].buffers), (name, tensors)
        assert all(opt.state[p][k].shape == p.shape for k in tensors)
        assert all(isinstance(v, (int, float)) for k, v in opt.state[p].items() if k not in tensors)


@pytest.mark.parametrize("name", NAMES)
def test_export_loads_the_same_optimizer(name, tmp_path):
    spec = load_spec(SINE)
    cfg = config(name, spec.inner.horizon)
    meta = {k: v.float() for k, v in perturbed(name, cfg, spec.inner.horizon, seed=6).items()}
    path = save_optimizer(tmp_path / "o.safetensors", meta, cfg, spec.to_dict(), {"meta_steps": 0})
    exp = read_optimizer(path)
    assert exp.rule == name and exp.config == cfg and exp.horizon == spec.inner.horizon
    x, y = data()
    m1, m2 = make_model().float(), make_model().float()
    x, y = x.float(), y.float()
    run(m1, metascale.load_optimizer(path, m1.parameters(), total_steps=15), 15, x, y)
    run(m2, LearnedOptimizer(m2.parameters(), meta, cfg, total_steps=15), 15, x, y)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
