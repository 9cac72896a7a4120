"""The layer-wise Adam rule: identity meta-parameters are torch's Adam and AdamW, a constant
rescaling factor is a step size, and the rule meta-trains, exports and loads end to end.
(The front-end equivalences, gradcheck and resume run for it in tests/test_rules.py.)"""
from __future__ import annotations

import math

import pytest
import torch

import metascale
from metascale.cli import main
from metascale.export import read_optimizer
from metascale.optim import RULES, LearnedOptimizer
from metascale.optim.layerwise_adam import LayerwiseAdamConfig

from test_optim import data, make_model, run

RULE = RULES["layerwise-adam"]
F64 = torch.float64


def frozen(params, cfg, meta=None, foreach=None):
    meta = RULE.init_meta(cfg, 10, dtype=F64) if meta is None else meta
    return LearnedOptimizer(params, meta, cfg, total_steps=100, foreach=foreach)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_unit_meta_reproduces_torch_adam_and_adamw_100_steps(foreach, wd):
    lr = 0.01
    cfg = LayerwiseAdamConfig(init_lr=lr, weight_decay=wd)
    x, y = data()
    m1, m2 = make_model(), make_model()
    ref_cls = torch.optim.AdamW if wd else torch.optim.Adam
    run(m1, frozen(m1.parameters(), cfg, foreach=foreach), 100, x, y)
    run(m2, ref_cls(m2.parameters(), lr=lr, weight_decay=wd, foreach=foreach), 100, x, y)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert ((a - b).abs().max() / b.abs().max()).item() < 1e-10


@pytest.mark.parametrize("c", [0.1, 4.0])
def test_constant_rescaling_factor_is_a_step_size(c):
    """A loss scale c folded through 1/s^2 multiplies Adam's step by c: Adam(lr * c)."""
    lr = 0.003
    cfg = LayerwiseAdamConfig(init_lr=lr, per_step=False)
    meta = RULE.init_meta(cfg, 1, dtype=F64)
    meta["log_scale"].fill_(math.log(c))
    x, y = data()
    m1, m2 = make_model(), make_model()
    run(m1, frozen(m1.parameters(), cfg, meta), 60, x, y)
    run(m2, torch.optim.Adam(m2.parameters(), lr=lr * c), 60, x, y)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert ((a - b).abs().max() / b.abs().max()).item() < 1e-10


def test_state_is_adams():
    m = make_model()
    opt = frozen(m.parameters(), LayerwiseAdamConfig())
    x, y = data()
    run(m, opt, 3, x, y)
    for p in m.parameters():
        st = opt.state[p]
        assert st["exp_avg"].shape == st["exp_avg_sq"].shape == p.shape and st["step"] == 3


def test_meta_trains_through_both_engines_exports_and_loads(tmp_path, capsys):
    spec = tmp_path / "tiny.toml"
    spec.write_text(open("tasks/sine.toml").read().replace("steps = 20 ", "steps = 4 ")
                    .replace("hidden = [40, 40]", "hidden = [8, 8]"))
    files = {}
    for engine in ("higher", "func"):
        out = tmp_path / engine
        assert main(["meta-train", "--spec", str(spec), "--out", str(out), "--rule", "layerwise-adam", "--engine",
                     engine, "--meta-steps", "2", "--quiet"]) == 0
        files[engine] = read_optimizer(out / "optimizer.safetensors")
        assert files[engine].rule == "layerwise-adam" and files[engine].horizon == 4
        init = RULE.init_meta(files[engine].config, 4)["log_step_size"]
        assert not torch.equal(files[engine].meta["log_step_size"], init)  # meta-training moved it
    for k in files["higher"].meta:  # the engines take the same meta-steps
        assert torch.allclose(files["higher"].meta[k], files["func"].meta[k], rtol=1e-5, atol=1e-6)
    capsys.readouterr()
    assert main(["info", str(tmp_path / "func" / "optimizer.safetensors")]) == 0
    assert "rule layerwise-adam" in capsys.readouterr().out
    model = make_model().float()
    opt = metascale.load_optimizer(tmp_path / "func" / "optimizer.safetensors", model.parameters())
    x, y = data()
    run(model, opt, 10, x.float(), y.float())
    assert all(torch.isfinite(p).all() for p in model.parameters())
