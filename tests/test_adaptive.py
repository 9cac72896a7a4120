"""The adaptive layer-wise rule: SGD at init, frozen = higher = torch.func, gradcheck, state
size, state_dict resumption, export and the command line."""
from __future__ import annotations

import json
import math

import higher
import pytest
import torch
from torch import nn

import metascale
from metascale.cli import main
from metascale.errors import ExportFormatError
from metascale.export import read_optimizer, save_optimizer
from metascale.inner.func_engine import unroll_func
from metascale.inner.higher_engine import differentiable_optimizer, unroll
from metascale.optim import RULES, AdaptiveConfig, LearnedOptimizer, rule_for
from metascale.optim.adaptive import NET_NAMES, adaptive_factors, adaptive_features, horizon_weights, net_shapes
from metascale.optim.groups import anchor_weights
from metascale.spec import load_spec
from metascale.tasks import SineConfig, SineFamily, TaskSampler

from test_optim import data, make_model, run

F64 = torch.float64
SINE = "tasks/sine.toml"
VARIANTS = [AdaptiveConfig(init_lr=0.05, momentum=0.0), AdaptiveConfig(init_lr=0.05, momentum=0.9),
            AdaptiveConfig(init_lr=0.05, momentum=0.9, nesterov=True)]
IDS = ["state-free", "momentum", "nesterov"]


def init_net(cfg: AdaptiveConfig, seed: int = 0, dtype=torch.float32, horizon: int = 20) -> dict:
    """The untrained network of the adaptive rule of ``cfg`` (its table over ``horizon`` steps
    unless ``cfg`` sets ``table_steps``)."""
    rule = RULES["adaptive-momentum" if cfg.momentum > 0 else "adaptive"]
    return rule.init_meta(cfg, horizon, seed=seed, dtype=dtype)


def AdaptiveOptimizer(params, net, cfg, *, total_steps):
    return LearnedOptimizer(params, net, cfg, total_steps=total_steps)


def random_net(cfg: AdaptiveConfig, seed: int = 0, spread: float = 0.3, grad: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    net = {k: v + spread * torch.randn(v.shape, generator=g, dtype=F64)
           for k, v in init_net(cfg, seed, dtype=F64).items()}
    return {k: v.requires_grad_(grad) for k, v in net.items()}


def small_task(index: int = 0):
    fam = SineFamily(SineConfig(hidden=(6, 5), n_train=8, n_val=16))
    return TaskSampler(fam, "train", seed=5, batch_size=4).task(index)


@pytest.mark.parametrize("cfg", VARIANTS, ids=IDS)
def test_untrained_rule_is_sgd(cfg):
    m1, m2 = make_model(), make_model()
    x, y = data()
    run(m1, AdaptiveOptimizer(m1.parameters(), init_net(cfg, dtype=F64), cfg, total_steps=100), 100, x, y)
    # the frozen heavy-ball step is torch's fused SGD kernel (one pass): compare with fused SGD
    fused = cfg.momentum > 0 and not cfg.nesterov
    run(m2, torch.optim.SGD(m2.parameters(), lr=cfg.init_lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                            fused=fused or None), 100, x, y)
    for a, b in zip(m1.parameters(), m2.parameters()):
        # bitwise except Nesterov, whose two adds round differently from torch's fused form
        assert torch.equal(a, b) if not cfg.nesterov else torch.allclose(a, b, rtol=1e-12, atol=1e-14)


def test_factors_match_the_formula():
    cfg = AdaptiveConfig(init_lr=0.1, hidden=3, bound=2.0, table_steps=6, depth_bins=3)
    net = random_net(cfg, spread=1.0)
    g, p, v, g0 = (torch.tensor([0.5, 2.0, 0.1], dtype=F64), torch.tensor([1.0, 0.1, 3.0], dtype=F64),
                   torch.tensor([0.4, 3.0, 0.2], dtype=F64), torch.tensor([1.0, 1.0, 0.5], dtype=F64))
    roles, depths = torch.tensor([1.0, -1.0, 1.0], dtype=F64), torch.tensor([0.0, 1.0, 0.3], dtype=F64)
    x = adaptive_features(g, p, v, g0, 0.33, roles, depths)
    lr = lambda m: 0.5 * torch.log(m + 1e-16)
    assert torch.allclose(x[:, 0], 0.1 * lr(g)) and torch.allclose(x[:, 1], 0.1 * lr(p))
    assert torch.allclose(x[:, 2], lr(g) - lr(v))
    assert torch.allclose(x[:, 3], lr(v) - lr(g0)) and torch.all(x[:, 4] == 0.33)
    for step in (0, 4, 5, 9):  # the table's last step (5) is held after it
        eta, s = adaptive_factors(net, x, cfg, [step] * 3)
        check_factors(net, x, eta, s, roles, depths, min(step, 5))
    assert (torch.log(eta / 0.1).abs() <= 2).all() and (torch.log(s).abs() <= 2).all()
    no_table = AdaptiveConfig(init_lr=0.1, hidden=3, bound=2.0, table_steps=0)
    assert "table" not in init_net(no_table) and set(net_shapes(no_table)) == set(NET_NAMES)
    # groups at different steps (one started later) read their own table columns
    eta, s = adaptive_factors(net, x, cfg, [0, 7, 2])
    for i, step in enumerate((0, 7, 2)):
        e1, s1 = adaptive_factors(net, x, cfg, [step] * 3)
        assert eta[i].item() == pytest.approx(e1[i].item(), rel=1e-14) and s[i].item() == pytest.approx(s1[i].item(), rel=1e-14)


def test_time_schedule_interpolates_its_knots_in_t_over_T():
    """time_knots = 5: knots at t/T = 0, 0.25, .., 1; between two, the log offsets interpolate
    linearly, so eta at t/T = 0.6 is eta_0 exp(B tanh((0.6 D[2] + 0.4 D[3]) / B))."""
    cfg = AdaptiveConfig(init_lr=0.1, hidden=3, bound=50.0, table_steps=0, time_knots=5)
    net = init_net(cfg, dtype=F64)
    net["time"] = torch.tensor([[0.0, 0.5, -1.0, -2.0, -4.0], [0.0, 0.0, 0.3, 0.0, 0.0]], dtype=F64)
    x = torch.zeros(4, 7, dtype=F64)
    x[:, 4] = torch.tensor([0.0, 0.25, 0.6, 1.0], dtype=F64)
    eta, s = adaptive_factors(net, x, cfg, [0] * 4)
    bounded = lambda r: torch.exp(50 * torch.tanh(torch.tensor(r, dtype=F64) / 50))
    assert torch.allclose(eta, 0.1 * bounded([0.0, 0.5, 0.6 * -1.0 + 0.4 * -2.0, -4.0]), rtol=1e-12)
    assert torch.allclose(s, bounded([0.0, 0.0, 0.6 * 0.3, 0.0]), rtol=1e-12)
    assert net_shapes(cfg)["time"] == (2, 5) and "time" not in net_shapes(AdaptiveConfig(table_steps=0))
    with pytest.raises(ValueError, match="time_knots = 1"):
        AdaptiveConfig(time_knots=1).validate()


def check_factors(net, x, eta, s, roles, depths, column):
    for i in range(3):
        r = net["wl"] @ x[i] + net["w2"] @ torch.tanh(net["w1"] @ x[i] + net["b1"]) + net["b2"]
        # the offset table, read with the static rule's anchor interpolation in depth and in time
        role = 0 if roles[i] > 0 else 1
        wd = anchor_weights(float(depths[i]), 3)
        r = r + sum(wd[b] * net["table"][:, role, b, column] for b in range(3))
        assert eta[i].item() == pytest.approx(0.1 * torch.exp(2 * torch.tanh(r[0] / 2)).item(), rel=1e-12)
        assert s[i].item() == pytest.approx(torch.exp(2 * torch.tanh(r[1] / 2)).item(), rel=1e-12)


@pytest.mark.parametrize("cfg", VARIANTS, ids=IDS)
def test_frozen_equals_higher_twin(cfg):
    net = random_net(cfg)
    x, y = data()
    m1, m2 = make_model(), make_model()
    o1 = AdaptiveOptimizer(m1.parameters(), net, cfg, total_steps=12)
    o2, override = differentiable_optimizer(m2.parameters(), net, cfg, 12)
    with higher.innerloop_ctx(m2, o2, override=override, copy_initial_weights=True) as (f, d):
        for t in range(12):
            idx = torch.arange(t % 4, x.shape[0], 4)
            o1.zero_grad()
            nn.functional.mse_loss(m1(x[idx]), y[idx]).backward()
            o1.step()
            d.step(nn.functional.mse_loss(f(x[idx]), y[idx]))
        for a, b in zip(m1.parameters(), f.parameters()):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
    # the network really moves the factors away from SGD's
    assert len({round(g["last_step_size"], 12) for g in o1.param_groups}) > 1


@pytest.mark.parametrize("cfg", VARIANTS[:2], ids=IDS[:2])
def test_windows_compose_into_one_unroll(cfg):
    task = small_task(1)
    net = random_net(cfg, seed=2, grad=True)
    full = unroll_func(task, net, cfg, 6, objective="final")
    w1 = unroll_func(task, net, cfg, 3, objective="final", total_steps=6)
    w2 = unroll_func(task, net, cfg, 3, objective="final", state=w1.state, total_steps=6)
    assert w2.meta_loss.item() == pytest.approx(full.meta_loss.item(), rel=1e-12)
    g1 = torch.autograd.grad(full.meta_loss, list(net.values()))
    g2 = torch.autograd.grad(w2.meta_loss, list(net.values()))
    for x, y in zip(g1, g2):
        assert torch.allclose(x, y, rtol=1e-10, atol=1e-13)
    cut = unroll_func(task, net, cfg, 3, objective="final", state=w1.state.detach(), total_steps=6)
    assert cut.meta_loss.item() == pytest.approx(full.meta_loss.item(), rel=1e-12)
    assert cut.state.groups[0].stats["avg_sq_grad"].grad_fn is not None  # stats carry a graph inside the window


@pytest.mark.parametrize("cfg", VARIANTS[:2], ids=IDS[:2])
def test_meta_gradient_gradcheck(cfg):
    cfg = AdaptiveConfig(init_lr=0.05, momentum=cfg.momentum, hidden=2, table_steps=2, depth_bins=2)
    task = small_task(2)
    base = random_net(cfg, seed=3)
    names = list(base)  # the network and the offset table

    def f(*tensors):
        net = dict(zip(names, tensors))
        return unroll(task, net, cfg, 3, objective="log_mean").meta_loss

    inputs = tuple(base[k].clone().requires_grad_() for k in names)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_state_free_variant_keeps_only_scalars():
    cfg = VARIANTS[0]
    m = make_model(sizes=(3, 64, 64, 2))
    x, y = torch.randn(32, 3, dtype=F64), torch.randn(32, 2, dtype=F64)
    opt = AdaptiveOptimizer(m.parameters(), random_net(cfg), cfg, total_steps=5)
    run(m, opt, 5, x, y)
    state_numbers = sum(v.numel() if torch.is_tensor(v) else 1 for st in opt.state.values() for v in st.values())
    groups = len(opt.param_groups)
    assert state_numbers == 3 * groups  # step, running mean square, first mean square
    momentum = AdaptiveOptimizer(m.parameters(), random_net(VARIANTS[1]), VARIANTS[1], total_steps=5)
    run(m, momentum, 1, x, y)
    bufs = sum(st["momentum_buffer"].numel() for st in momentum.state.values())
    assert bufs == sum(p.numel() for p in m.parameters())


def test_total_steps_drives_the_fraction_feature():
    cfg = AdaptiveConfig(init_lr=0.05, momentum=0.0, hidden=2)
    net = init_net(cfg, dtype=F64)
    net["wl"][0, 4] = 1.0  # log step size grows with the fraction done
    x, y = data()
    m1, m2 = make_model(), make_model()
    short = AdaptiveOptimizer(m1.parameters(), net, cfg, total_steps=2)
    long = AdaptiveOptimizer(m2.parameters(), net, cfg, total_steps=200)
    run(m1, short, 2, x, y)
    run(m2, long, 2, x, y)
    # step index 1: fraction 1/2 against 1/200; log(eta / eta_0) = B tanh(fraction / B)
    for opt, frac in ((short, 0.5), (long, 0.005)):
        want = 0.05 * torch.exp(10 * torch.tanh(torch.tensor(frac / 10, dtype=F64))).item()
        assert opt.param_groups[0]["last_step_size"] == pytest.approx(want, rel=1e-12)
    m = m1
    with pytest.raises(ValueError, match="total_steps"):
        AdaptiveOptimizer(m.parameters(), net, cfg, total_steps=0)


def test_export_round_trip_and_validation(tmp_path):
    spec = load_spec(SINE)
    cfg = spec.rule_config("adaptive")
    assert cfg.momentum == 0 and spec.rule_config("adaptive-momentum").momentum == spec.rules["adaptive"].momentum
    net = {k: v.float() for k, v in random_net(cfg).items()}
    path = save_optimizer(tmp_path / "a.safetensors", net, cfg, spec.to_dict(), {"meta_steps": 1})
    exp = read_optimizer(path)
    assert exp.rule == "adaptive" and exp.config == cfg and exp.horizon == spec.inner.horizon
    assert sorted(exp.meta) == sorted(net) and "table" in net
    for k in net:
        assert torch.equal(exp.meta[k], net[k])
    # loads onto architectures it never saw, as a drop-in optimizer
    for sizes in ((3, 8, 2), (3, 32, 32, 32, 2)):
        model = make_model(sizes=sizes).float()
        opt = metascale.load_optimizer(path, model.parameters(), total_steps=50)
        assert isinstance(opt, LearnedOptimizer) and opt.total_steps == 50
        x, y = torch.randn(16, 3), torch.randn(16, 2)
        before = nn.functional.mse_loss(model(x), y).item()
        for _ in range(20):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        assert torch.isfinite(torch.tensor(nn.functional.mse_loss(model(x), y).item()))
        assert before > 0
    with pytest.raises(ValueError, match="total_steps"):
        metascale.load_optimizer(path, make_model().parameters(), total_steps=0)
    # mis-shaped / missing tensors and a config that does not match the tensors
    bad = dict(net, w1=torch.zeros(3, 7))
    save_optimizer(tmp_path / "b.safetensors", bad, cfg, spec.to_dict(), {})
    with pytest.raises(ExportFormatError, match="'w1' has shape"):
        read_optimizer(tmp_path / "b.safetensors")
    from safetensors.torch import save_file
    meta = {"format": "metascale.optimizer", "format_version": "1", "rule": "adaptive",
            "rule_config": json.dumps({"hidden": 16, "momentum": 0.0}), "group_mapping": json.dumps(metascale.optim.MAPPING_RULE),
            "spec": json.dumps(spec.to_dict()), "summary": "{}"}
    save_file({k: net[k] for k in NET_NAMES if k != "wl"}, str(tmp_path / "c.safetensors"), metadata=meta)
    with pytest.raises(ExportFormatError, match="expected exactly"):
        read_optimizer(tmp_path / "c.safetensors")
    save_file({**{k: net[k] for k in NET_NAMES}, "log_scale": torch.zeros(2, 3, 1)}, str(tmp_path / "d.safetensors"),
              metadata=meta)
    with pytest.raises(ExportFormatError, match="expected exactly"):
        read_optimizer(tmp_path / "d.safetensors")
    # a file from before the offset table (no 'table_steps' in its config) reads as table_steps = 0
    save_file({k: net[k] for k in NET_NAMES}, str(tmp_path / "e.safetensors"), metadata=meta)
    old = read_optimizer(tmp_path / "e.safetensors")
    assert old.config.table_steps == 0 and sorted(old.meta) == sorted(NET_NAMES) and old.rule == "adaptive"
    save_optimizer(tmp_path / "f.safetensors", dict(net, table=torch.zeros(2, 2, 3, 5)), cfg, spec.to_dict(), {})
    with pytest.raises(ExportFormatError, match="'table' has shape"):
        read_optimizer(tmp_path / "f.safetensors")


def test_rules_by_name():
    spec = load_spec(SINE)
    for name in ("layerwise", "adaptive", "adaptive-momentum"):
        cfg = spec.rule_config(name)
        assert rule_for(cfg) is RULES[name]
    with pytest.raises(metascale.SpecError, match="unknown rule"):
        spec.rule_config("adam")
    zero = spec.with_table("adaptive", AdaptiveConfig(momentum=0.0))
    with pytest.raises(metascale.SpecError, match="momentum > 0"):
        zero.rule_config("adaptive-momentum")


def test_cli_meta_train_evaluate_info_adaptive(tmp_path, capsys):
    spec = tmp_path / "tiny.toml"
    spec.write_text(open(SINE).read().replace("steps = 20 ", "steps = 4 ").replace("tasks = 50", "tasks = 3")
                    .replace("tune_tasks = 64", "tune_tasks = 2").replace("hidden = [40, 40]", "hidden = [8, 8]"))
    for rule in ("adaptive", "adaptive-momentum", "layerwise"):
        assert main(["meta-train", "--spec", str(spec), "--out", str(tmp_path / rule), "--rule", rule,
                     "--meta-steps", "2", "--quiet"]) == 0
        exp = read_optimizer(tmp_path / rule / "optimizer.safetensors")
        assert exp.summary["rule"] == rule
    capsys.readouterr()
    assert main(["info", str(tmp_path / "adaptive" / "optimizer.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "rule adaptive" in out and "per-parameter state: none" in out and "log_grad_rms" in out
    assert main(["evaluate", str(tmp_path / "adaptive-momentum" / "optimizer.safetensors"), "--spec", str(spec),
                 "--compare", str(tmp_path / "adaptive" / "optimizer.safetensors"),
                 str(tmp_path / "layerwise" / "optimizer.safetensors"),
                 "--baselines", "adam,adafactor,prodigy,schedulefree_adamw", "--json", str(tmp_path / "e.json"),
                 "--quiet"]) == 0
    rows = json.loads((tmp_path / "e.json").read_text())["optimizers"]
    assert set(rows) == {"adam", "adafactor", "prodigy", "schedulefree_adamw", "learned", "learned_adaptive",
                         "learned_layerwise"}
    assert rows["prodigy"].get("lr_free") and "tuning_median_final_loss" in rows["adafactor"]
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "adaptive" / "optimizer.safetensors"), "--spec", str(spec),
                 "--baselines", "adam,lion", "--quiet"]) == 2
    assert "unknown baseline 'lion'" in capsys.readouterr().err


@pytest.mark.parametrize("rule", ["layerwise", "adaptive-momentum"])
def test_closure_and_sparse_gradients(rule):
    """Both frozen optimizers return the closure's loss, skip parameters without a gradient
    and refuse sparse gradients before touching any parameter."""
    spec = load_spec(SINE)
    cfg = spec.rule_config(rule)
    emb, lin = nn.Embedding(5, 3, sparse=True), nn.Linear(3, 1)
    opt = LearnedOptimizer(list(lin.parameters()) + list(emb.parameters()), RULES[rule].init_meta(cfg, 20), cfg,
                           total_steps=20)
    x = torch.randn(4, 3)

    def closure():
        opt.zero_grad()
        loss = lin(x).pow(2).mean()
        loss.backward()
        return loss
    before = [p.detach().clone() for p in emb.parameters()]
    assert float(opt.step(closure).detach()) > 0 and all(torch.equal(a, b) for a, b in zip(before, emb.parameters()))
    lin_before = [p.detach().clone() for p in lin.parameters()]
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(lin_before, lin.parameters()))


def test_schedule_per_horizon_interpolates_in_log_T():
    """time_horizons = (1000, 4000): at T = 1000 the first anchor's schedule, at 4000 the
    second's, held beyond both ends, and at the geometric mean 2000 the mean of the two (log T
    halfway); within a run the t/T knots interpolate as before."""
    cfg = AdaptiveConfig(init_lr=0.1, hidden=3, bound=50.0, table_steps=0, time_knots=3, time_horizons=(1000, 4000))
    net = init_net(cfg, dtype=F64)
    assert net["time"].shape == (2, 3, 2)
    d_short = torch.tensor([[0.0, 1.0, -1.0], [0.2, 0.0, 0.0]], dtype=F64)
    d_long = torch.tensor([[0.5, -2.0, -3.0], [0.0, 0.0, 0.4]], dtype=F64)
    net["time"] = torch.stack([d_short, d_long], dim=-1)
    x = torch.zeros(3, 7, dtype=F64)
    x[:, 4] = torch.tensor([0.0, 0.25, 1.0], dtype=F64)
    bounded = lambda r: torch.exp(50 * torch.tanh(r / 50))
    hat = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]], dtype=F64)
    for T, d in ((1000, d_short), (500, d_short), (4000, d_long), (20_000, d_long),
                 (2000, (d_short + d_long) / 2)):
        eta, s = adaptive_factors(net, x, cfg, [0] * 3, T)
        assert torch.allclose(eta, 0.1 * bounded(hat @ d[0]), rtol=1e-12), T
        assert torch.allclose(s, bounded(hat @ d[1]), rtol=1e-12), T
    assert horizon_weights(3000, (1000, 3000, 9000)) == [0.0, 1.0, 0.0]
    assert horizon_weights(6000, (1000, 3000, 9000))[1:] == pytest.approx([1 - math.log(2) / math.log(3),
                                                                           math.log(2) / math.log(3)])
    with pytest.raises(ValueError, match="needs the run's horizon"):
        adaptive_factors(net, x, cfg, [0] * 3)
    text = "\n".join(RULES["adaptive-momentum"].describe(net, cfg, 1000))  # metascale info: one row per anchor
    assert "T = 1000   1.22, 2.72, 0.368" in text and "T = 4000   1.65, 0.135, 0.0743" in text


@pytest.mark.parametrize("bad", [(1000,), (5000, 1000), (1000, 1000)])
def test_schedule_per_horizon_rejects_bad_anchors(bad):
    with pytest.raises(ValueError, match="at least 2 increasing"):
        AdaptiveConfig(time_knots=3, time_horizons=bad).validate()
    with pytest.raises(ValueError, match="set time_knots"):
        AdaptiveConfig(time_horizons=(1000, 5000)).validate()
