"""The layer-wise rule against torch.optim.SGD, its foreach/for-loop and frozen/higher parity."""
from __future__ import annotations

import math

import higher
import pytest
import torch
from torch import nn

from metascale.inner.higher_engine import differentiable_optimizer
from metascale.optim import RULES, GroupInfo, LayerwiseConfig, LearnedOptimizer, group_parameters
from metascale.optim.kernels import heavy_ball
from metascale.optim.layerwise import group_schedules

init_meta = RULES["layerwise"].init_meta


def LayerwiseOptimizer(params, meta, *, momentum=0.0, nesterov=False, foreach=None, lr=1.0):
    """The frozen optimizer of the layer-wise rule with these settings (schedules from ``meta``)."""
    cfg = LayerwiseConfig(momentum=momentum, nesterov=nesterov, per_step=meta["log_scale"].shape[-1] > 1,
                          depth_bins=meta["log_scale"].shape[1])
    return LearnedOptimizer(params, meta, cfg, total_steps=100, lr=lr, foreach=foreach)



def make_model(seed: int = 0, sizes=(3, 8, 8, 2)) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    m = nn.Sequential(*layers).double()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    return m


def data(seed: int = 1, n: int = 32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randn(n, 2, generator=g, dtype=torch.float64)


def run(model: nn.Module, opt: torch.optim.Optimizer, steps: int, x, y) -> None:
    for t in range(steps):
        opt.zero_grad()
        # a different minibatch each step so that momentum and schedules matter
        idx = torch.arange(t % 4, x.shape[0], 4)
        ((model(x[idx]) - y[idx]) ** 2).mean().backward()
        opt.step()


def max_rel_err(m1: nn.Module, m2: nn.Module) -> float:
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(m1.parameters(), m2.parameters()))


def perturbed_meta(cfg: LayerwiseConfig, horizon: int, seed: int = 3, sigma: float = 0.3) -> dict:
    g = torch.Generator().manual_seed(seed)
    meta = init_meta(cfg, horizon, dtype=torch.float64)
    return {k: v + sigma * torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in meta.items()}


# One line per configuration checked against torch.optim.SGD.
SGD_CASES = [
    dict(momentum=0.0, nesterov=False),
    dict(momentum=0.9, nesterov=False),
    dict(momentum=0.5, nesterov=True),
]


@pytest.mark.parametrize("case", SGD_CASES, ids=lambda c: f"mu{c['momentum']}-nesterov{c['nesterov']}")
@pytest.mark.parametrize("foreach", [False, True])
def test_unit_meta_reproduces_torch_sgd_100_steps(case, foreach):
    """step size = base lr, scale = 1: the same trajectory as torch.optim.SGD(lr)."""
    lr = 0.05
    cfg = LayerwiseConfig(init_lr=lr, **case)
    x, y = data()
    m1, m2 = make_model(), make_model()
    ours = LayerwiseOptimizer(m1.parameters(), init_meta(cfg, 10, dtype=torch.float64), foreach=foreach, **case)
    ref = torch.optim.SGD(m2.parameters(), lr=lr, foreach=foreach, **case)
    run(m1, ours, 100, x, y)
    run(m2, ref, 100, x, y)
    assert max_rel_err(m1, m2) < 1e-12


@pytest.mark.parametrize("case", SGD_CASES, ids=lambda c: f"mu{c['momentum']}-nesterov{c['nesterov']}")
@pytest.mark.parametrize("s", [0.1, 3.0])
def test_constant_scale_is_a_step_size(case, s):
    """A constant rescaling factor s with step size lr equals step size s * lr."""
    lr = 0.02
    cfg = LayerwiseConfig(init_lr=lr, **case)
    meta = init_meta(cfg, 1, dtype=torch.float64)
    meta["log_scale"].fill_(math.log(s))
    x, y = data()
    m1, m2, m3 = make_model(), make_model(), make_model()
    run(m1, LayerwiseOptimizer(m1.parameters(), meta, **case), 100, x, y)
    run(m2, torch.optim.SGD(m2.parameters(), lr=lr * s, **case), 100, x, y)
    meta_eff = init_meta(LayerwiseConfig(init_lr=lr * s, **case), 1, dtype=torch.float64)
    run(m3, LayerwiseOptimizer(m3.parameters(), meta_eff, **case), 100, x, y)
    assert max_rel_err(m1, m2) < 1e-12
    assert max_rel_err(m1, m3) < 1e-12


@pytest.mark.parametrize("case", SGD_CASES, ids=lambda c: f"mu{c['momentum']}-nesterov{c['nesterov']}")
def test_foreach_matches_forloop(case):
    """The fused foreach kernels and the per-tensor loop give the same numbers (PyTorch's
    test_foreach_matches_forloop), with a non-trivial per-layer, per-step schedule."""
    cfg = LayerwiseConfig(**case)
    meta = perturbed_meta(cfg, 7)
    x, y = data()
    m1, m2 = make_model(), make_model()
    run(m1, LayerwiseOptimizer(m1.parameters(), meta, foreach=True, **case), 30, x, y)
    run(m2, LayerwiseOptimizer(m2.parameters(), meta, foreach=False, **case), 30, x, y)
    assert max_rel_err(m1, m2) < 1e-13


@pytest.mark.parametrize("case", SGD_CASES, ids=lambda c: f"mu{c['momentum']}-nesterov{c['nesterov']}")
def test_frozen_step_equals_higher_step(case):
    """The exported optimizer and the higher inner loop take the same steps for the same
    meta-parameters (per-layer, per-step schedule; 12 steps crossing the 8-step horizon)."""
    cfg = LayerwiseConfig(**case)
    meta = perturbed_meta(cfg, 8)
    x, y = data()
    m1, m2 = make_model(), make_model()
    frozen = LayerwiseOptimizer(m1.parameters(), meta, **case)
    opt2, override = differentiable_optimizer(m2.parameters(), meta, cfg, 100)
    with higher.innerloop_ctx(m2, opt2, override=override) as (fm, diffopt):
        for t in range(12):
            idx = torch.arange(t % 4, x.shape[0], 4)
            frozen.zero_grad()
            ((m1(x[idx]) - y[idx]) ** 2).mean().backward()
            frozen.step()
            diffopt.step(((fm(x[idx]) - y[idx]) ** 2).mean())
            err = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(m1.parameters(), fm.parameters()))
            assert err < 1e-13, (t, err)


def test_pure_update_leaves_inputs_untouched_out_of_place():
    p = [torch.ones(3, dtype=torch.float64)]
    g = [torch.full((3,), 2.0, dtype=torch.float64)]
    b = [torch.full((3,), 0.5, dtype=torch.float64)]
    new_p, new_b = heavy_ball(p, g, b, lr=0.1, scale=2.0, momentum=0.9, nesterov=False)
    assert torch.equal(p[0], torch.ones(3, dtype=torch.float64)) and torch.equal(b[0], torch.full((3,), 0.5, dtype=torch.float64))
    # b = 0.9 * 0.5 + 2 * 2 = 4.45; p = 1 - 0.1 * 4.45
    assert torch.allclose(new_b[0], torch.full((3,), 4.45, dtype=torch.float64), rtol=0, atol=1e-15)
    assert torch.allclose(new_p[0], torch.full((3,), 1 - 0.445, dtype=torch.float64), rtol=0, atol=1e-15)


def test_schedule_is_held_past_its_horizon():
    """Step t >= horizon uses the last learned step (the documented extension rule)."""
    cfg = LayerwiseConfig(momentum=0.0)
    meta = perturbed_meta(cfg, 3)
    lin = nn.Linear(2, 1, bias=False).double()
    opt = LayerwiseOptimizer(lin.parameters(), meta)
    eta, s = (x.tolist() for x in group_schedules(meta, GroupInfo("matrix", 0, 1)))
    for t in range(6):
        before = lin.weight.detach().clone()
        lin.weight.grad = torch.ones_like(lin.weight)
        opt.step()
        eff = eta[min(t, 2)] * s[min(t, 2)]
        assert torch.allclose(before - lin.weight.detach(), torch.full_like(before, eff), rtol=1e-14, atol=0)
        assert opt.param_groups[0]["last_step_size"] * opt.param_groups[0]["last_scale"] == pytest.approx(eff, rel=1e-15)
    assert eff == eta[-1] * s[-1]


def test_params_without_grad_are_skipped_and_zero_grads_are_finite():
    m = make_model()
    opt = LayerwiseOptimizer(m.parameters(), init_meta(LayerwiseConfig(), 4, dtype=torch.float64), momentum=0.9)
    before = [p.detach().clone() for p in m.parameters()]
    for p in list(m.parameters())[:2]:
        p.grad = torch.zeros_like(p)
    opt.step()
    after = list(m.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert len(opt.state) == 2


def test_grouping_by_role_and_depth():
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.LayerNorm(4), nn.Linear(4, 5), nn.Linear(5, 1))
    groups = group_parameters(m.parameters())
    desc = [(i.role, i.layer, i.num_layers, round(i.depth, 3), [tuple(p.shape) for p in ps]) for i, ps in groups]
    assert desc == [
        ("matrix", 0, 3, 0.0, [(4, 3)]),
        ("vector", 0, 3, 0.0, [(4,), (4,), (4,)]),  # bias, then LayerNorm weight and bias join layer 0
        ("matrix", 1, 3, 0.5, [(5, 4)]),
        ("vector", 1, 3, 0.5, [(5,)]),
        ("matrix", 2, 3, 1.0, [(1, 5)]),
        ("vector", 2, 3, 1.0, [(1,)]),
    ]


@pytest.mark.parametrize("bad, msg", [([], "empty"), ([{"params": []}], "empty"), ([3.0], "tensors")])
def test_bad_params_raise(bad, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        LayerwiseOptimizer(bad, init_meta(LayerwiseConfig(), 2))


def test_lr_scheduler_scales_the_learned_steps():
    cfg = LayerwiseConfig(momentum=0.0)
    lin = nn.Linear(2, 1, bias=False).double()
    opt = LayerwiseOptimizer(lin.parameters(), init_meta(cfg, 1, dtype=torch.float64))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for t in range(3):
        before = lin.weight.detach().clone()
        lin.weight.grad = torch.ones_like(lin.weight)
        opt.step()
        sched.step()
        assert torch.allclose(before - lin.weight.detach(), torch.full_like(before, 0.01 * 0.5 ** t), rtol=1e-13, atol=0)
