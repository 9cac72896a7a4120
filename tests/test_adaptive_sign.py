"""The sign-momentum adaptive rule (``adaptive-sign``): untrained it is Lion (against a reference
written here from the paper's update), its learned factors move every coordinate by ``eta * s``,
and its state is one buffer per parameter. The rule-table tests (tests/test_rules.py) cover
frozen = differentiable, the engines, gradcheck, state_dict and export."""
from __future__ import annotations

import math

import pytest
import torch

import metascale
from metascale.optim import RULES, LearnedOptimizer, rule_for
from metascale.optim.adaptive_sign import SignConfig, sign_momentum, sign_momentum_
from metascale.spec import SpecError, load_spec

from test_optim import data, make_model, run

F64 = torch.float64


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al., 2023, Algorithm 2) as a reference. The paper decays the parameters
    the step starts from, ``P - lr (sign(c) + wd P)``; metascale's frozen optimizers decay after
    the rule's update, ``(P - lr sign(c)) (1 - lr wd)`` (``decay_after``), which differs by
    ``lr^2 wd`` per coordinate and step."""

    def __init__(self, params, lr, betas, weight_decay=0.0, decay_after=False):
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})
        self.decay_after = decay_after

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                m = self.state[p].setdefault("m", torch.zeros_like(p))
                c = b1 * m + (1 - b1) * p.grad
                if self.decay_after:
                    p.add_(torch.sign(c), alpha=-group["lr"]).mul_(1 - group["lr"] * group["weight_decay"])
                else:
                    p.mul_(1 - group["lr"] * group["weight_decay"]).add_(torch.sign(c), alpha=-group["lr"])
                m.mul_(b2).add_(p.grad, alpha=1 - b2)


def untrained(cfg: SignConfig, horizon: int = 20) -> dict:
    return RULES["adaptive-sign"].init_meta(cfg, horizon, dtype=F64)


@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("foreach", [True, False])
def test_untrained_rule_is_lion(wd, foreach):
    cfg = SignConfig(init_lr=1e-3, momentum=0.95, interpolation=0.8)
    m1, m2 = make_model(), make_model()
    x, y = data()
    run(m1, LearnedOptimizer(m1.parameters(), untrained(cfg), cfg, total_steps=50, weight_decay=wd,
                             foreach=foreach), 50, x, y)
    m3 = make_model()
    run(m2, Lion(m2.parameters(), lr=1e-3, betas=(0.8, 0.95), weight_decay=wd, decay_after=True), 50, x, y)
    run(m3, Lion(m3.parameters(), lr=1e-3, betas=(0.8, 0.95), weight_decay=wd), 50, x, y)
    for a, b, c in zip(m1.parameters(), m2.parameters(), m3.parameters()):
        assert torch.allclose(a, b, rtol=1e-13, atol=1e-15)
        # the paper's order: within 50 steps of lr^2 wd (plus rare sign flips it may cause: none here)
        assert (a - c).abs().max() <= 50 * 1e-6 * wd + 1e-15


def test_every_coordinate_moves_by_eta_times_s():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(5, 4, generator=g, dtype=F64)
    grad = torch.randn(5, 4, generator=g, dtype=F64) * torch.logspace(-6, 3, 4, dtype=F64)  # wildly scaled columns
    buf = torch.randn(5, 4, generator=g, dtype=F64) * 1e-3
    (new,), (b,) = sign_momentum([p], [grad], [buf], lr=0.02, beta1=0.9, beta2=0.99)
    assert torch.allclose((new - p).abs(), torch.full_like(p, 0.02), rtol=1e-12)
    assert torch.equal(torch.sign(p - new), torch.sign(0.9 * buf + 0.1 * grad))
    assert torch.allclose(b, 0.99 * buf + 0.01 * grad, rtol=1e-14)
    q, qb = p.clone(), buf.clone()
    sign_momentum_([q], [grad], [qb], lr=0.02, beta1=0.9, beta2=0.99)
    assert torch.equal(q, new) and torch.allclose(qb, b, rtol=1e-15)


def test_learned_factors_scale_the_step_and_gradients_reach_them():
    cfg = RULES["adaptive-sign"].resolve(SignConfig(init_lr=1e-2, hidden=3, time_knots=3), 10)
    meta = {k: v.clone().requires_grad_(True) for k, v in untrained(cfg, 10).items()}
    with torch.no_grad():
        meta["b2"][0] = 0.5  # log step size
        meta["b2"][1] = -0.2  # log rescaling factor
    model = make_model()
    x, y = data()
    before = [p.detach().clone() for p in model.parameters()]
    opt = LearnedOptimizer(model.parameters(), meta, cfg, total_steps=10)
    run(model, opt, 1, x, y)
    bounded = lambda r: cfg.bound * math.tanh(r / cfg.bound)  # eta = eta_0 e^{B tanh(r_0/B)}, s = e^{B tanh(r_1/B)}
    distance = 1e-2 * math.exp(bounded(0.5)) * math.exp(bounded(-0.2))
    for a, b in zip(model.parameters(), before):  # the first step is sign(G): every coordinate by eta * s
        assert torch.allclose((a - b).abs(), torch.full_like(a, distance), rtol=1e-12)
    from metascale.inner.higher_engine import differentiable_optimizer
    import higher
    m = make_model()
    opt2, override = differentiable_optimizer(m.parameters(), meta, cfg, 10)
    with higher.innerloop_ctx(m, opt2, override=override, copy_initial_weights=True) as (fm, diffopt):
        for t in range(3):
            diffopt.step(((fm(x) - y) ** 2).mean())
        ((fm(x) - y) ** 2).mean().backward()
    assert meta["b2"].grad.abs().sum() > 0 and meta["time"].grad.abs().sum() > 0


def test_one_buffer_declared_and_the_rule_is_found_by_its_config():
    """One buffer per parameter, declared (tests/test_rules.py checks the state holds just it)."""
    cfg = SignConfig()
    assert rule_for(cfg).name == "adaptive-sign" and RULES["adaptive-sign"].buffers == ("momentum_buffer",)


def test_spec_table_and_bad_settings(tmp_path):
    spec = load_spec("tasks/sine.toml")
    assert isinstance(spec.rule_config("adaptive-sign"), SignConfig)
    text = open("tasks/sine.toml").read() + "\n[adaptive_sign]\nnesterov = true\n"
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises((SpecError, ValueError), match="nesterov"):
        load_spec(path).rule_config("adaptive-sign")
    assert "adaptive-sign" in metascale.optim.RULES
