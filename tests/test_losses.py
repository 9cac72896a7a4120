"""Learned losses: exact identity at init, meta-gradients, export, and the meta-objective."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

import metascale
from metascale.errors import ExportFormatError
from metascale.export import read_loss
from metascale.inner import unroll
from metascale.losses import LossConfig, make_loss
from metascale.optim import RULES, LayerwiseConfig

init_meta = RULES["layerwise"].init_meta
from metascale.spec import load_spec
from metascale.tasks import SineConfig, SineFamily, TaskSampler

SPECS = Path(__file__).resolve().parent.parent / "tasks"
KINDS = [("ml3", True, False), ("ml3", False, False), ("adaptive_scale", True, False), ("adaptive_scale", False, False),
         ("ml3", True, True), ("adaptive_scale", True, True)]


def model(n_in: int, n_out: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(n_in, 8), nn.Tanh(), nn.Linear(8, n_out)).double()


def data(kind: str):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 3, generator=g, dtype=torch.float64)
    if kind == "regression":
        return x, torch.sin(x[:, :1]), model(3, 1), model(3, 1)
    return x, torch.randint(0, 4, (12,), generator=g), model(3, 4), model(3, 4)


@pytest.mark.parametrize("task_kind", ["regression", "classification"])
@pytest.mark.parametrize("kind, frac, scale_free", KINDS)
def test_init_is_exactly_the_task_loss_and_its_sgd_trajectory(task_kind, kind, frac, scale_free):
    """At init the learned loss equals MSE / cross-entropy bitwise, and 50 SGD steps on it give
    bitwise the same parameters as 50 SGD steps on the task loss."""
    x, y, m1, m2 = data(task_kind)
    loss = make_loss(task_kind, LossConfig(kind=kind, hidden=6, step_fraction=frac, scale_free=scale_free)).double()
    base = nn.MSELoss() if task_kind == "regression" else nn.CrossEntropyLoss()
    assert torch.equal(loss(m1(x), y, 0.3), base(m1(x), y))
    o1, o2 = torch.optim.SGD(m1.parameters(), lr=0.1), torch.optim.SGD(m2.parameters(), lr=0.1)
    for t in range(50):
        o1.zero_grad()
        loss(m1(x), y, t / 50).backward()
        o1.step()
        o2.zero_grad()
        base(m2(x), y).backward()
        o2.step()
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


def perturb_(loss: nn.Module, seed: int = 3, sigma: float = 0.3) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in loss.parameters():
            p.add_(sigma * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return loss


@pytest.mark.parametrize("kind", ["ml3", "adaptive_scale"])
def test_scale_free_regression_loss_scales_like_mse(kind):
    """With ``scale_free`` (trained weights), measuring targets and predictions in other units
    multiplies the loss by the square of the unit, as for MSE, and the gradient with respect to
    the predictions by the unit; without it the learned part depends on the units."""
    g = torch.Generator().manual_seed(5)
    pred, y = torch.randn(9, 1, generator=g, dtype=torch.float64), torch.randn(9, 1, generator=g, dtype=torch.float64)
    for scale_free in (True, False):
        loss = perturb_(make_loss("regression", LossConfig(kind=kind, hidden=5, scale_free=scale_free)).double(), sigma=1.0)
        for c in (0.01, 7.0):
            p1, p2 = pred.clone().requires_grad_(), (c * pred).requires_grad_()
            l1, l2 = loss(p1, y, 0.4), loss(p2, c * y, 0.4)
            (g1,), (g2,) = torch.autograd.grad(l1, p1), torch.autograd.grad(l2, p2)
            if scale_free:
                assert float(l2.detach()) == pytest.approx(c ** 2 * float(l1.detach()), rel=1e-12)
                assert torch.allclose(g2, c * g1, rtol=1e-10, atol=0)
            else:
                assert float(l2.detach()) != pytest.approx(c ** 2 * float(l1.detach()), rel=1e-3)


def small_task():
    return TaskSampler(SineFamily(SineConfig(hidden=(5,), n_train=6, n_val=12)), "train", 2, 6).task(0)


@pytest.mark.parametrize("kind, scale_free", [("ml3", False), ("adaptive_scale", False), ("ml3", True),
                                              ("adaptive_scale", True)])
def test_meta_gradient_through_the_loss_network_gradcheck_float64(kind, scale_free):
    loss = perturb_(make_loss("regression", LossConfig(kind=kind, hidden=3, scale_free=scale_free)).double())
    names = [n for n, _ in loss.named_parameters()]
    inputs = tuple(p.detach().clone().requires_grad_() for p in loss.parameters())
    rule = LayerwiseConfig(init_lr=0.05, momentum=0.0, per_step=False)
    meta = init_meta(rule, 3, dtype=torch.float64)
    task = small_task()

    def f(*ps):
        params = dict(zip(names, ps))
        fn = lambda pred, y, frac: torch.func.functional_call(loss, params, (pred, y, frac))
        return unroll(task, meta, rule, 3, train_loss=fn).meta_loss

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)
    grads = torch.autograd.grad(f(*inputs), inputs, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 1e-8 for g in grads)


def test_learned_loss_never_makes_the_meta_objective():
    """A constant added to the learned loss moves no inner gradient, so the trajectory and the
    meta-loss (true validation loss) are unchanged; were the learned loss the objective, the
    meta-loss would move by the constant."""
    rule = LayerwiseConfig(init_lr=0.05, momentum=0.0, per_step=False)
    meta = init_meta(rule, 4, dtype=torch.float64)
    task = small_task()
    loss = make_loss("regression", LossConfig(hidden=4)).double()
    plain = unroll(task, meta, rule, 4)
    with torch.no_grad():
        loss.net[2].bias.fill_(100.0)
    learned = unroll(task, meta, rule, 4, train_loss=loss)
    assert learned.val_losses == plain.val_losses
    assert float(learned.meta_loss.detach()) == float(plain.meta_loss.detach())


def tiny(name="sine.toml"):
    spec = load_spec(SPECS / name)
    return dataclasses.replace(spec, inner=dataclasses.replace(spec.inner, steps=4),
                               meta=dataclasses.replace(spec.meta, batch_size=2))


@pytest.mark.parametrize("learn", ["loss", "both"])
def test_meta_training_moves_the_loss_and_round_trips_through_load_loss(learn, tmp_path):
    spec = tiny()
    res = metascale.MetaTrainer(spec, meta_steps=3, learn=learn, inner_lr=0.05, device="cpu", progress=False).train()
    fresh = make_loss("regression", LossConfig())
    moved = max((a - b).abs().max() for a, b in zip(res.loss.state_dict().values(), fresh.state_dict().values()))
    assert moved > 1e-3
    path = metascale.save_loss(tmp_path / "loss.safetensors", res.loss, spec.to_dict(), res.summary)
    loaded = metascale.load_loss(path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), res.loss.state_dict().values()))
    x, y = torch.randn(7, 1), torch.randn(7, 1)
    assert torch.equal(loaded(x, y, 0.25), res.loss(x, y, 0.25))
    assert not any(p.requires_grad for p in loaded.parameters())
    init = init_meta(res.rule, spec.inner.steps)
    optimizer_moved = not torch.equal(res.meta["log_step_size"], init["log_step_size"])
    assert optimizer_moved == (learn == "both")
    if learn == "loss":  # plain SGD at the given step size underneath
        assert res.rule.momentum == 0 and not res.rule.per_step and res.rule.init_lr == 0.05


def test_learn_loss_needs_an_inner_lr_and_a_known_mode():
    with pytest.raises(ValueError, match="inner_lr"):
        metascale.MetaTrainer(tiny(), learn="loss")
    with pytest.raises(ValueError, match="learn"):
        metascale.MetaTrainer(tiny(), learn="everything")


def test_bad_loss_files(tmp_path):
    loss = make_loss("classification", LossConfig(kind="adaptive_scale", hidden=5))
    good = metascale.save_loss(tmp_path / "l.safetensors", loss, {}, {})
    assert metascale.load_loss(good).task_kind == "classification"
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportFormatError, match="truncated"):
        metascale.load_loss(tmp_path / "cut.safetensors")
    opt = metascale.save_optimizer(tmp_path / "o.safetensors", init_meta(LayerwiseConfig(), 2), LayerwiseConfig(),
                                   load_spec(SPECS / "sine.toml").to_dict(), {})
    with pytest.raises(ExportFormatError, match="not a metascale loss file"):
        metascale.load_loss(opt)
    from safetensors.torch import save_file
    from safetensors import safe_open
    with safe_open(str(good), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for change, needle in [({"format_version": "9"}, "version"), ({"loss_config": "{"}, "JSON"),
                           ({"task_kind": "ranking"}, "task_kind"), ({"loss_config": '{"kind": "l1"}'}, "kind")]:
        save_file(tensors, str(tmp_path / "m.safetensors"), metadata={**meta, **change})
        with pytest.raises(ExportFormatError, match=needle):
            metascale.load_loss(tmp_path / "m.safetensors")
    bad = dict(tensors)
    bad["net.0.weight"] = torch.zeros(2, 2)
    save_file(bad, str(tmp_path / "s.safetensors"), metadata=meta)
    with pytest.raises(ExportFormatError, match="tensors"):
        metascale.load_loss(tmp_path / "s.safetensors")


def test_loss_files_without_scale_free_load_as_raw_value_losses(tmp_path):
    """A regression loss file written before ``scale_free`` existed (no key in its config) loads
    with ``scale_free = False``, the inputs it was trained on; a new file keeps its setting."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file
    loss = perturb_(make_loss("regression", LossConfig(kind="adaptive_scale", hidden=4)))
    new = metascale.save_loss(tmp_path / "new.safetensors", loss, {}, {})
    assert read_loss(new).config.scale_free is True
    with safe_open(str(new), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    old_config = {k: v for k, v in json.loads(meta["loss_config"]).items() if k != "scale_free"}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={**meta, "loss_config": json.dumps(old_config)})
    old = read_loss(tmp_path / "old.safetensors")
    assert old.config == dataclasses.replace(loss.config, scale_free=False)
    raw = dataclasses.replace(loss.config, scale_free=False)
    ref = make_loss("regression", raw)
    ref.load_state_dict(loss.state_dict())
    x, y = torch.randn(7, 1), 3 * torch.randn(7, 1)
    assert torch.equal(old.module(x, y, 0.5), ref(x, y, 0.5))


def test_cli_learn_loss_and_both_then_evaluate(tmp_path, capsys):
    import json
    import tomllib

    from metascale.cli import main
    from test_specs import dump_toml
    data = tomllib.loads((SPECS / "digits.toml").read_text())
    data["inner"]["steps"] = 3
    data["meta"].update(steps=2, batch_size=2)
    data["evaluate"].update(tasks=3, tune_tasks=2, points_per_decade=1)
    spec = tmp_path / "d.toml"
    spec.write_text(dump_toml(data))
    assert main(["meta-train", "--spec", str(spec), "--out", str(tmp_path / "l"), "--learn", "loss", "--quiet"]) == 0
    assert (tmp_path / "l" / "loss.safetensors").is_file() and not (tmp_path / "l" / "optimizer.safetensors").exists()
    tuned = float(capsys.readouterr().out.split("(task loss): ")[1].split()[0])
    assert main(["evaluate", str(tmp_path / "l" / "loss.safetensors"), "--spec", str(spec), "--quiet",
                 "--json", str(tmp_path / "e.json")]) == 0
    rows = json.loads((tmp_path / "e.json").read_text())["optimizers"]
    assert rows["sgd+learned_loss"]["tuned_lr"] == rows["sgd"]["tuned_lr"] == pytest.approx(tuned, rel=1e-2)
    assert 0 <= rows["sgd+learned_loss"]["median_final_accuracy"] <= 1  # digits: accuracy reported
    assert main(["meta-train", "--spec", str(spec), "--out", str(tmp_path / "b"), "--learn", "both",
                 "--loss", "adaptive_scale", "--quiet"]) == 0
    b = tmp_path / "b"
    assert main(["evaluate", str(b / "optimizer.safetensors"), "--loss", str(b / "loss.safetensors"),
                 "--spec", str(spec), "--quiet"]) == 0
    assert "learned+learned_loss" in capsys.readouterr().out
    assert main(["evaluate", str(b / "loss.safetensors"), "--loss", str(b / "loss.safetensors"),
                 "--spec", str(spec), "--quiet"]) == 2
    assert "already a learned loss" in capsys.readouterr().err
