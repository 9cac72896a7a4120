"""The normalised adaptive rule (``adaptive-rms``): untrained it is ``torch.optim.Adam`` at
``beta1 = 0`` (and AdamW with weight decay, up to the order of the decay), its learned factors
scale the normalised step, gradients reach them where a coordinate's gradient is 0, and its
state is one buffer per parameter. The rule-table tests (tests/test_rules.py) cover frozen =
differentiable, the engines, gradcheck, state_dict and export."""
from __future__ import annotations

import math

import higher
import pytest
import torch

from metascale.inner.higher_engine import differentiable_optimizer
from metascale.optim import RULES, LearnedOptimizer, rule_for
from metascale.optim.adaptive_rms import RmsConfig, rms_step, rms_step_
from metascale.spec import SpecError, load_spec

from test_optim import data, make_model, run

F64 = torch.float64


def untrained(cfg: RmsConfig, horizon: int = 20) -> dict:
    return RULES["adaptive-rms"].init_meta(cfg, horizon, dtype=F64)


@pytest.mark.parametrize("foreach", [True, False])
def test_untrained_rule_is_adam_without_momentum(foreach):
    cfg = RmsConfig(init_lr=3e-3, beta2=0.99, eps=1e-6)
    m1, m2 = make_model(), make_model()
    x, y = data()
    run(m1, LearnedOptimizer(m1.parameters(), untrained(cfg), cfg, total_steps=50, foreach=foreach), 50, x, y)
    run(m2, torch.optim.Adam(m2.parameters(), lr=3e-3, betas=(0.0, 0.99), eps=1e-6, foreach=False), 50, x, y)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.allclose(a, b, rtol=1e-13, atol=1e-15)


def test_weight_decay_is_adamw_up_to_its_order():
    """AdamW decays the parameters the step starts from; metascale's frozen optimizers decay
    after the update, which differs by ``lr^2 wd |G / sqrt(v)|`` per step (at most ``lr^2 wd /
    sqrt(1 - beta2)`` here)."""
    cfg = RmsConfig(init_lr=3e-3, beta2=0.99)
    m1, m2 = make_model(), make_model()
    x, y = data()
    run(m1, LearnedOptimizer(m1.parameters(), untrained(cfg), cfg, total_steps=50, weight_decay=0.1), 50, x, y)
    run(m2, torch.optim.AdamW(m2.parameters(), lr=3e-3, betas=(0.0, 0.99), weight_decay=0.1), 50, x, y)
    bound = 50 * 3e-3 ** 2 * 0.1 / math.sqrt(1 - 0.99)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert 0 < (a - b).abs().max() <= bound


def test_kernels_agree_and_are_invariant_to_a_loss_scale():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(5, 4, generator=g, dtype=F64)
    grads = [torch.randn(5, 4, generator=g, dtype=F64) * torch.logspace(-6, 3, 4, dtype=F64) for _ in range(3)]
    outs = []
    for scale in (1.0, 1e4):
        q, v = p.clone(), None
        for t, grad in enumerate(grads):
            (q,), (v,) = rms_step([q], [grad * scale], [v], lr=0.01, beta2=0.9, eps=0.0, step=t)
        outs.append(q)
        r, w = p.clone(), None
        for t, grad in enumerate(grads):
            (w,) = rms_step_([r], [grad * scale], [w], lr=0.01, beta2=0.9, eps=0.0, step=t)
        assert torch.allclose(r, q, rtol=1e-14, atol=0)
    assert torch.allclose(outs[0], outs[1], rtol=1e-13)  # wildly scaled columns all move ~0.01 per step
    # |G / sqrt(v_hat)| <= sqrt((1 - beta2^(t+1)) / (1 - beta2)) per step, whatever the gradient's size
    assert ((outs[0] - p).abs() <= 3 * 0.01 * math.sqrt(1 / 0.1) + 1e-12).all()
    cols = (outs[0] - p).abs().mean(0)
    assert cols.max() / cols.min() < 5  # columns whose gradients differ by 1e9 move alike


def test_meta_gradient_is_finite_where_a_gradient_is_zero():
    cfg = RULES["adaptive-rms"].resolve(RmsConfig(init_lr=1e-2, hidden=3, time_knots=3), 10)
    meta = {k: v.clone().requires_grad_(True) for k, v in untrained(cfg, 10).items()}
    m = make_model()
    x, y = data()
    x[:, 0] = 0.0  # the first input is always 0: its weights get no gradient, ever
    opt, override = differentiable_optimizer(m.parameters(), meta, cfg, 10)
    with higher.innerloop_ctx(m, opt, override=override, copy_initial_weights=True) as (fm, diffopt):
        for _ in range(3):
            diffopt.step(((fm(x) - y) ** 2).mean())
        ((fm(x) - y) ** 2).mean().backward()
    grads = torch.cat([v.grad.reshape(-1) for v in meta.values()])
    assert torch.isfinite(grads).all() and meta["b2"].grad.abs().sum() > 0


def test_one_buffer_declared_and_bad_settings(tmp_path):
    """One buffer per parameter, declared (tests/test_rules.py checks the state holds just it)."""
    cfg = RmsConfig()
    assert rule_for(cfg).name == "adaptive-rms" and RULES["adaptive-rms"].buffers == ("exp_avg_sq",)
    assert isinstance(load_spec("tasks/sine.toml").rule_config("adaptive-rms"), RmsConfig)
    path = tmp_path / "bad.toml"
    path.write_text(open("tasks/sine.toml").read() + "\n[adaptive_rms]\nmomentum = 0.9\n")
    with pytest.raises((SpecError, ValueError), match="no momentum"):
        load_spec(path).rule_config("adaptive-rms")


@pytest.mark.parametrize("foreach", [True, False])
def test_mup_scales_matrices_after_the_first_layer_by_width_over_fan_in(foreach):
    """On the first step ``G / sqrt(v_hat) = sign(G)`` (eps 0), so every coordinate moves by
    the step size times its tensor's muP multiplier: 1 for the first layer and the vectors,
    ``16 / 8`` for the 8-to-8 and 8-to-2 matrices."""
    cfg = RmsConfig(init_lr=1e-3, eps=0.0, mup_width=16)
    model = make_model()  # 3-8-8-2
    x, y = data()
    before = [p.detach().clone() for p in model.parameters()]
    run(model, LearnedOptimizer(model.parameters(), untrained(cfg), cfg, total_steps=5, foreach=foreach), 1, x, y)
    expected = [1.0, 1.0, 2.0, 1.0, 2.0, 1.0]  # weight, bias per Linear
    for p, b, m in zip(model.parameters(), before, expected):
        assert torch.allclose((p - b).abs(), torch.full_like(p, 1e-3 * m), rtol=1e-12)
    off = RmsConfig(init_lr=1e-3, eps=0.0)
    other = make_model()
    run(other, LearnedOptimizer(other.parameters(), untrained(off), off, total_steps=5), 1, x, y)
    assert all(torch.allclose((p - b).abs(), torch.full_like(p, 1e-3), rtol=1e-12)
               for p, b in zip(other.parameters(), before))


@pytest.mark.parametrize("name", ["adaptive-rms", "layerwise-adam"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_moments_stay_float32_through_a_state_dict(name, dtype):
    """Moments of float16/bfloat16 parameters are float32 (``(1 - beta2) G^2`` vanishes in
    float16). ``torch.optim`` casts loaded state to the parameters' dtype; the frozen optimizer
    takes them from the state_dict again, so a resumed run continues bit for bit."""
    import copy
    import io

    from metascale.spec import load_spec as spec_of
    rule = RULES[name]
    cfg = spec_of("tasks/sine.toml").rule_config(name)
    meta = rule.init_meta(cfg, 20)
    x, y = data()
    x, y = x.to(dtype), y.to(dtype)

    def fresh():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).to(dtype)

    def steps(model, opt, n):
        for _ in range(n):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x).float(), y.float()).backward()
            opt.step()

    m1 = fresh()
    o1 = LearnedOptimizer(m1.parameters(), meta, cfg, total_steps=20)
    steps(m1, o1, 5)
    buf = io.BytesIO()
    torch.save(o1.state_dict(), buf)
    m2 = copy.deepcopy(m1)
    o2 = LearnedOptimizer(m2.parameters(), meta, cfg, total_steps=20)
    buf.seek(0)
    o2.load_state_dict(torch.load(buf, weights_only=True))
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        for key in rule.buffers:
            assert o2.state[p2][key].dtype == torch.float32
            assert torch.equal(o2.state[p2][key], o1.state[p1][key])
    steps(m1, o1, 5)
    steps(m2, o2, 5)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2) and torch.isfinite(p1).all()
