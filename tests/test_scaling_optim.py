"""Scaled optimizers against torch.optim: the loss scale as a step size, the invariant mode,
time-varying scales with the buffer correction, and GradScaler without the unscale pass."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from metascale.scaling.optimizers import ScaledAdagrad, ScaledAdam, ScaledAdamW, ScaledRMSprop, ScaledSGD

# One line per configuration: (id, scaled factory, torch factory, kwargs). Adding an optimizer
# or an option adds one line.
CASES = [
    ("sgd", ScaledSGD, torch.optim.SGD, dict(lr=0.05)),
    ("sgd-momentum", ScaledSGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
    ("sgd-nesterov-wd", ScaledSGD, torch.optim.SGD, dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01)),
    ("sgd-dampening-wd", ScaledSGD, torch.optim.SGD, dict(lr=0.05, momentum=0.7, dampening=0.3, weight_decay=0.02)),
    ("adam", ScaledAdam, torch.optim.Adam, dict(lr=0.01)),
    ("adam-coupled-wd", ScaledAdam, torch.optim.Adam, dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.05)),
    ("adamw-decoupled-wd", ScaledAdamW, torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
    ("rmsprop", ScaledRMSprop, torch.optim.RMSprop, dict(lr=0.003)),
    ("rmsprop-momentum-centered-wd", ScaledRMSprop, torch.optim.RMSprop,
     dict(lr=0.002, momentum=0.9, centered=True, weight_decay=0.01)),
    ("adagrad", ScaledAdagrad, torch.optim.Adagrad, dict(lr=0.05)),
    ("adagrad-decay-wd-init", ScaledAdagrad, torch.optim.Adagrad,
     dict(lr=0.05, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1)),
]
IDS = [c[0] for c in CASES]


def make_model(dtype=torch.float64, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    m = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2)).to(dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.4)
    return m


def batch(t: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(1000 + t)
    x = torch.randn(16, 4, generator=g, dtype=torch.float64).to(dtype)
    return x, torch.sin(x[:, :2] * 1.5).to(dtype)


def loss_at(model, t, dtype=torch.float64):
    x, y = batch(t, dtype)
    return ((model(x) - y) ** 2).mean()


def rel_err(m1: nn.Module, m2: nn.Module) -> float:
    return max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
               for a, b in zip(m1.parameters(), m2.parameters()))


def scales(n: int, seed: int = 5) -> list[float]:
    """A scale per step spanning a factor 25 (log-uniform in [0.2, 5]); the learning rates
    of CASES keep every trajectory stable at 5x (a diverging run amplifies rounding)."""
    g = torch.Generator().manual_seed(seed)
    return (5 ** (2 * torch.rand(n, generator=g, dtype=torch.float64) - 1)).tolist()


def run_pair(scaled_opt, ref_opt, m1, m2, steps, s_of, lr, mode, dtype=torch.float64):
    """m1 trains on s_t * L with the scaled optimizer; m2 on L with torch.optim and lr_t."""
    for t in range(steps):
        s = s_of(t)
        for group in scaled_opt.param_groups:
            group["scale"] = s
        for group in ref_opt.param_groups:
            group["lr"] = lr * s if mode == "step" else lr
        scaled_opt.zero_grad()
        (s * loss_at(m1, t, dtype)).backward()
        scaled_opt.step()
        ref_opt.zero_grad()
        loss_at(m2, t, dtype).backward()
        ref_opt.step()


@pytest.mark.parametrize("s", [0.37, 2.5])
@pytest.mark.parametrize("name, scaled, ref, kw", CASES, ids=IDS)
@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "forloop"])
def test_constant_scale_is_a_step_size_200_steps_float64(name, scaled, ref, kw, s, foreach):
    """Scaled X(s, lr) fed gradients of s*L equals torch.optim X(lr*s) on L: rel. error <= 1e-10."""
    m1, m2 = make_model(), make_model()
    o1 = scaled(m1.parameters(), **kw, scale=s, foreach=foreach)
    o2 = ref(m2.parameters(), **{**kw, "lr": kw["lr"] * s}, foreach=foreach)
    run_pair(o1, o2, m1, m2, 200, lambda t: s, kw["lr"], "step")
    assert rel_err(m1, m2) <= 1e-10


@pytest.mark.parametrize("s", [0.37, 4.0])
@pytest.mark.parametrize("name, scaled, ref, kw", CASES, ids=IDS)
def test_constant_scale_is_a_step_size_float32(name, scaled, ref, kw, s):
    m1, m2 = make_model(torch.float32), make_model(torch.float32)
    o1 = scaled(m1.parameters(), **kw, scale=s)
    o2 = ref(m2.parameters(), **{**kw, "lr": kw["lr"] * s})
    run_pair(o1, o2, m1, m2, 200, lambda t: s, kw["lr"], "step", torch.float32)
    assert rel_err(m1, m2) <= 1e-5


@pytest.mark.parametrize("name, scaled, ref, kw", CASES, ids=IDS)
def test_changing_scale_mid_run_equals_changing_lr(name, scaled, ref, kw):
    """With the buffer correction, a scale that changes every step (0.2x..5x) behaves like
    the learning rate lr * s_t of torch.optim, momentum and Adam's moments included."""
    ss = scales(200)
    m1, m2 = make_model(), make_model()
    o1 = scaled(m1.parameters(), **kw)
    o2 = ref(m2.parameters(), **kw)
    run_pair(o1, o2, m1, m2, 200, lambda t: ss[t], kw["lr"], "step")
    assert rel_err(m1, m2) <= 1e-10


@pytest.mark.parametrize("name, scaled, ref, kw", CASES, ids=IDS)
def test_invariant_mode_reproduces_unscaled_training(name, scaled, ref, kw):
    """mode='invariant': gradients of s_t * L (s_t up to 1e4, changing) give the unscaled
    torch.optim trajectory, eps included."""
    ss = [x * 1e3 for x in scales(200, seed=9)]
    m1, m2 = make_model(), make_model()
    o1 = scaled(m1.parameters(), **kw, mode="invariant")
    o2 = ref(m2.parameters(), **kw)
    run_pair(o1, o2, m1, m2, 200, lambda t: ss[t], kw["lr"], "invariant")
    assert rel_err(m1, m2) <= 1e-10


def test_without_the_correction_momentum_would_differ():
    """The correction is needed: rescaling the buffer by sigma_t/sigma_{t-1} is what makes a
    changed scale act as a changed step size (a test that the tests above can fail)."""
    ss = scales(50)
    m1, m2 = make_model(), make_model()
    o1 = ScaledSGD(m1.parameters(), lr=0.05, momentum=0.9)
    o2 = torch.optim.SGD(m2.parameters(), lr=0.05, momentum=0.9)
    # a naive scaled momentum: b = mu b + s g ; p -= lr b  (no correction)
    m3 = make_model()
    bufs = None
    for t in range(50):
        s = ss[t]
        m3.zero_grad()
        (s * loss_at(m3, t)).backward()
        with torch.no_grad():
            gs = [p.grad for p in m3.parameters()]
            bufs = [g.clone() for g in gs] if bufs is None else [0.9 * b + g for b, g in zip(bufs, gs)]
            for p, b in zip(m3.parameters(), bufs):
                p.sub_(0.05 * b)
    run_pair(o1, o2, m1, m2, 50, lambda t: ss[t], 0.05, "step")
    assert rel_err(m1, m2) <= 1e-10
    assert rel_err(m3, m2) > 1e-3


@pytest.mark.parametrize("name, scaled, ref, kw", CASES, ids=IDS)
def test_per_group_scales(name, scaled, ref, kw):
    """A scale per group (the gradient of each layer carries its own factor) equals
    torch.optim with per-group learning rates lr * s_g."""
    group_s = [0.5, 3.0, 1.5]
    m1, m2 = make_model(), make_model()
    layers1 = [m1[0], m1[2], m1[4]]
    layers2 = [m2[0], m2[2], m2[4]]
    o1 = scaled([{"params": l.parameters(), "scale": s} for l, s in zip(layers1, group_s)], **kw)
    o2 = ref([{"params": l.parameters(), "lr": kw["lr"] * s} for l, s in zip(layers2, group_s)],
             **{k: v for k, v in kw.items() if k != "lr"}, lr=kw["lr"])
    for t in range(100):
        o1.zero_grad()
        loss_at(m1, t).backward()
        with torch.no_grad():
            for l, s in zip(layers1, group_s):
                for p in l.parameters():
                    p.grad.mul_(s)
        o1.step()
        o2.zero_grad()
        loss_at(m2, t).backward()
        o2.step()
    assert rel_err(m1, m2) <= 1e-10


def _amp_run(make_opt, steps: int, inf_steps: set[int], dtype=torch.float64):
    """Train with a CPU GradScaler; at inf_steps the loss is multiplied by inf (overflow)."""
    model = make_model(dtype)
    opt = make_opt(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_factor=2.0, backoff_factor=0.5,
                                  growth_interval=3)
    history = []
    for t in range(steps):
        opt.zero_grad()
        loss = loss_at(model, t, dtype)
        if t in inf_steps:
            loss = loss * math.inf
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        history.append(scaler.get_scale())
    return model, history


@pytest.mark.parametrize("name, scaled, ref, kw", CASES, ids=IDS)
def test_gradscaler_without_unscale_equals_unscaled_run_with_same_skips(name, scaled, ref, kw):
    """Invariant mode through torch.amp.GradScaler (no unscale pass), 200 steps with 8 overflows:
    the same parameters as
    torch.optim through GradScaler's usual unscale_ path, the same skipped steps and the same
    dynamic scale history; and the same as an unscaled run that skips those steps."""
    inf_steps = {4, 5, 11, 30, 77, 78, 79, 150}
    m1, h1 = _amp_run(lambda p: scaled(p, **kw, mode="invariant"), 200, inf_steps)
    m2, h2 = _amp_run(lambda p: ref(p, **kw), 200, inf_steps)
    assert h1 == h2 and len(set(h1)) > 2  # the scale backed off and grew
    assert rel_err(m1, m2) <= 1e-10
    m3 = make_model()
    o3 = ref(m3.parameters(), **kw)
    for t in range(200):
        if t in inf_steps:
            continue
        o3.zero_grad()
        loss_at(m3, t).backward()
        o3.step()
    assert rel_err(m1, m3) <= 1e-10


def test_gradscaler_manual_unscale_then_step():
    """After scaler.unscale_(opt) (e.g. to clip), the optimizer must not fold the scale again."""
    kw = dict(lr=0.01)
    model, ref_model = make_model(), make_model()
    opt = ScaledAdam(model.parameters(), **kw, mode="invariant")
    ref = torch.optim.Adam(ref_model.parameters(), **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for t in range(20):
        opt.zero_grad()
        scaler.scale(loss_at(model, t)).backward()
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        ref.zero_grad()
        loss_at(ref_model, t).backward()
        ref.step()
    assert rel_err(model, ref_model) <= 1e-10


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_bad_scale_raises(bad):
    with pytest.raises(ValueError, match="scale"):
        ScaledSGD(make_model().parameters(), lr=0.1, scale=bad)
    opt = ScaledAdam(make_model().parameters(), lr=0.1)
    opt.param_groups[0]["scale"] = bad
    loss_at_model = make_model()
    opt = ScaledAdam(loss_at_model.parameters())
    opt.param_groups[0]["scale"] = bad
    loss_at(loss_at_model, 0).backward()
    with pytest.raises(ValueError, match="scale"):
        opt.step()


def test_bad_mode_raises():
    with pytest.raises(ValueError, match="mode"):
        ScaledRMSprop(make_model().parameters(), mode="fast")


@pytest.mark.parametrize("name, scaled, ref, kw", CASES, ids=IDS)
def test_state_dict_round_trip(name, scaled, ref, kw):
    ss = scales(20)
    m1 = make_model()
    o1 = scaled(m1.parameters(), **kw)
    for t in range(10):
        o1.param_groups[0]["scale"] = ss[t]
        o1.zero_grad()
        (ss[t] * loss_at(m1, t)).backward()
        o1.step()
    m2 = make_model()
    m2.load_state_dict(copy.deepcopy(m1.state_dict()))
    o2 = scaled(m2.parameters(), **kw)
    o2.load_state_dict(copy.deepcopy(o1.state_dict()))  # as a real save/load would: no shared buffers
    for m, o in ((m1, o1), (m2, o2)):
        for t in range(10, 20):
            o.param_groups[0]["scale"] = ss[t]
            o.zero_grad()
            (ss[t] * loss_at(m, t)).backward()
            o.step()
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.5, 0.6)])
def test_adam_undecayed_moments_match_torch_state_across_renormalisations(betas):
    """ScaledAdam stores moments undecayed and renormalises them when beta^-k passes 2^16
    (every 16 steps for beta = 0.5); its moments equal torch.optim.Adam's state throughout."""
    ss = scales(120)
    m1, m2 = make_model(), make_model()
    o1 = ScaledAdam(m1.parameters(), lr=0.01, betas=betas)
    o2 = torch.optim.Adam(m2.parameters(), lr=0.01, betas=betas)
    run_pair(o1, o2, m1, m2, 120, lambda t: ss[t], 0.01, "step")
    assert rel_err(m1, m2) <= 1e-10
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        m, v = o1.moments(p1)
        assert torch.allclose(m, o2.state[p2]["exp_avg"], rtol=1e-10, atol=1e-300)
        assert torch.allclose(v, o2.state[p2]["exp_avg_sq"], rtol=1e-10, atol=1e-300)
    assert o1.state[next(m1.parameters())]["ref_step"] > 0  # it did renormalise


def test_adam_rejects_small_betas():
    with pytest.raises(ValueError, match="betas"):
        ScaledAdam(make_model().parameters(), betas=(0.0, 0.999))
