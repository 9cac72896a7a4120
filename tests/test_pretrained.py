"""Pretrained optimizers that ship inside the package load by name, with no meta-training."""
from __future__ import annotations

import pytest
import torch

import metascale
from metascale.cli import main
from metascale.errors import ExportFormatError
from metascale.export import read_optimizer
from metascale.pretrained import catalog, resolve

REQUIRED = ("name", "file", "rule", "summary", "meta_trained_on", "meta_training", "state", "heldout_suite",
            "prefer_adamw_when")


def test_every_catalog_entry_is_a_valid_file_of_its_rule():
    entries = catalog()
    assert entries, "no pretrained optimizer ships"
    for name, e in entries.items():
        assert all(e.get(k) for k in REQUIRED), name
        exp = read_optimizer(name)  # by name
        assert exp.rule == e["rule"] and resolve(name).stat().st_size < 64 * 1024  # a few KB


@pytest.mark.parametrize("name", list(catalog()))
def test_load_by_name_trains_a_model_it_never_saw(name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 3))
    g = torch.Generator().manual_seed(1)  # labels of a random linear teacher: learnable, unlike random labels
    x = torch.randn(256, 10, generator=g)
    y = (x @ torch.randn(10, 3, generator=g)).argmax(1)
    opt = metascale.load_optimizer(name, model.parameters(), total_steps=200)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0)  # composes with torch's schedulers
    first = None
    for _ in range(200):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        sched.step()
        first = float(loss.detach()) if first is None else first
    assert float(loss.detach()) < 0.2 * first  # mix1k-v1: 1.06 -> 7e-5, mix1k-v2: 1.06 -> 0.034, mix1k-v3: 1.06 -> 0.020,
    # mix1k5k-v4: 1.06 -> 0.015, mix1k5k-v5: 1.06 -> 0.007, mix1k5k-v6: 1.06 -> 0.024
    state = sum(t.numel() for st in opt.state.values() for t in st.values() if torch.is_tensor(t) and t.dim() > 0)
    assert state <= sum(p.numel() for p in model.parameters())  # at most one buffer per parameter


def test_unknown_name_is_one_error_line(capsys):
    with pytest.raises(ExportFormatError, match="nor a pretrained optimizer"):
        read_optimizer("no-such-optimizer")
    assert main(["info", "no-such-optimizer"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "metascale pretrained" in err


def test_the_pretrained_command_lists_them(capsys):
    assert main(["pretrained"]) == 0
    out = capsys.readouterr().out
    for name in catalog():
        assert name in out and "prefer adamw when" in out
