"""The torch.optim contract of the frozen learned optimizer, for every rule in RULES (issue 16):
add_param_group, named_parameters(), parameter-group dicts and options (lr, weight_decay,
maximize, foreach), decoupled weight decay in the state_dict, foreach-versus-for-loop parity
(as PyTorch's optim_db tests do) and the divergence guard."""
import warnings

import pytest
import torch

from metascale.optim import RULES, LearnedOptimizer, group_infos
from test_precision import SPEC, data, mlp, rule_meta

K = SPEC.inner.horizon


def make(name, params, **kw):
    config, meta = rule_meta(name)
    return LearnedOptimizer(params, meta, config, total_steps=K, **kw)


def run(model, opt, steps=6, sign=1.0):
    x, y = data()
    for _ in range(steps):
        opt.zero_grad()
        (sign * torch.nn.functional.mse_loss(model(x), y)).backward()
        opt.step()


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", list(RULES))
def test_add_param_group_places_new_layer_at_depth_one(name):
    """A head added later trains exactly as if the optimizer had it from the start (it is the last
    layer: depth 1), and the new groups take the optimizer's defaults unless they set options."""
    def two_layers():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    full = two_layers()
    run(full, make(name, full.parameters()))
    part = two_layers()
    opt = make(name, part[0].parameters())
    opt.add_param_group({"params": part[2].parameters()})
    assert [(i.role, i.depth) for i in group_infos(opt)] == [("matrix", 0.0), ("vector", 0.0), ("matrix", 1.0),
                                                             ("vector", 1.0)]
    assert opt.param_groups[-1]["lr"] == 1.0 and opt.param_groups[-1]["weight_decay"] == 0.0
    run(part, opt)
    for a, b in zip(full.parameters(), part.parameters()):
        assert torch.equal(a, b)


def test_add_param_group_depth_and_options():
    m = mlp()
    opt = make("layerwise", list(m[0].parameters()))
    opt.add_param_group({"params": list(m[2].parameters()), "depth": 0.5, "lr": 0.0})
    assert [round(i.depth, 6) for i in group_infos(opt)] == [0.0, 0.0, 0.5, 0.5]
    before = [p.detach().clone() for p in m[2].parameters()]
    run(m, opt, steps=2)
    assert all(torch.equal(a, b) for a, b in zip(before, m[2].parameters()))  # lr 0 in that group
    with pytest.raises(ValueError, match="depth"):
        opt.add_param_group({"params": list(m[4].parameters()), "depth": 2.0})
    with pytest.raises(ValueError, match="not one of"):
        opt.add_param_group({"params": list(m[4].parameters()), "betas": (0.9, 0.99)})


@pytest.mark.parametrize("name", list(RULES))
def test_named_parameters_give_the_same_run(name):
    a, b = mlp(), mlp()
    opt_b = make(name, b.named_parameters())
    run(a, make(name, a.parameters()))
    run(b, opt_b)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    names = [n for g in opt_b.state_dict()["param_groups"] for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in b.named_parameters())


@pytest.mark.parametrize("name", list(RULES))
def test_decoupled_weight_decay(name):
    """After the rule's update, p <- p (1 - lr eta_t s_t wd) with eta_t s_t the group's learned
    step this step; stored per group and in the state_dict; 0 changes nothing."""
    a, b, c = mlp(), mlp(), mlp()
    oa, ob, oc = make(name, a.parameters()), make(name, b.parameters(), weight_decay=0.1), \
        make(name, c.parameters(), weight_decay=0.0)
    for m, o in ((a, oa), (b, ob), (c, oc)):
        run(m, o, steps=1)
    for ga, gb, gc in zip(oa.param_groups, ob.param_groups, oc.param_groups):
        decay = 1 - ga["last_step_size"] * ga["last_scale"] * 0.1
        for pa, pb, pc in zip(ga["params"], gb["params"], gc["params"]):
            assert torch.allclose(pb, pa * decay, rtol=1e-6, atol=1e-7)
            assert torch.equal(pa, pc)
        assert gb["weight_decay"] == 0.1
    assert all(g["weight_decay"] == 0.1 for g in ob.state_dict()["param_groups"])


def test_param_group_dicts_keep_depth_and_options():
    """Dicts with options: roles and depths are those of all parameters in the order given (the
    dicts concatenated), each group keeps its dict's options."""
    m = mlp()
    opt = make("layerwise", [{"params": [*m[0].parameters(), *m[2].parameters()]},
                             {"params": m[4].parameters(), "lr": 0.5, "weight_decay": 0.01}], weight_decay=0.1)
    ref = make("layerwise", m.parameters())
    assert group_infos(opt) == group_infos(ref)
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(1.0, 0.1)] * 4 + [(0.5, 0.01)] * 2
    with pytest.raises(ValueError, match="not one of"):
        make("layerwise", [{"params": m.parameters(), "momentum": 0.5}])


@pytest.mark.parametrize("name", list(RULES))
def test_maximize(name):
    a, b = mlp(), mlp()
    run(a, make(name, a.parameters()))
    run(b, make(name, b.parameters(), maximize=True), sign=-1.0)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("options", [{}, {"weight_decay": 0.05}, {"maximize": True}, {"lr": 0.5}],
                         ids=["default", "weight_decay", "maximize", "lr"])
@pytest.mark.parametrize("name", list(RULES))
def test_foreach_matches_for_loop(name, options):
    """foreach (fused where allowed) against the per-tensor loop: same numbers up to rounding."""
    sign = -1.0 if options.get("maximize") else 1.0
    a, b = mlp(), mlp()
    run(a, make(name, a.parameters(), foreach=True, **options), steps=10, sign=sign)
    run(b, make(name, b.parameters(), foreach=False, **options), steps=10, sign=sign)
    p0 = params_of(mlp())
    moved = max(float((p.detach() - q).abs().max()) for p, q in zip(a.parameters(), p0))
    assert moved > 1e-3
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), float((p - q).abs().max())


@pytest.mark.parametrize("name", list(RULES))
def test_divergence_guard_warns_once_naming_group_and_step(name):
    """A NaN batch at step 5 makes every parameter NaN: one warning, naming a group and step 5."""
    m = mlp()
    opt = make(name, m.parameters())
    x, y = data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(1, 11):
            opt.zero_grad()
            torch.nn.functional.mse_loss(m(x * float("nan") if t == 5 else x), y).backward()
            opt.step()
    hits = [str(w.message) for w in caught if "non-finite" in str(w.message)]
    assert len(hits) == 1, [str(w.message) for w in caught]
    assert "parameter group 0 (matrix, layer 0 of 3)" in hits[0] and "after its step 5 " in hits[0], hits[0]
    assert not all(torch.isfinite(p).all() for p in m.parameters())


def test_divergence_guard_off_and_silent_on_a_healthy_run():
    m = mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(m, make("layerwise", m.parameters()), steps=10)
        m2 = mlp()
        run(m2, make("layerwise", m2.parameters(), lr=1e6, check_finite=False), steps=30)
    assert not all(torch.isfinite(p).all() for p in m2.parameters())
