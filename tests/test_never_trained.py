"""Never-trained meta-parameters (issue 16): meta-training records which (role, depth anchor)
entries never received a meta-gradient, the export carries it, ``metascale info`` shows it and
``load_optimizer`` warns when a model maps onto them."""
import dataclasses
import warnings

import pytest
import torch

import metascale
from metascale.cli import main
from metascale.meta import MetaTrainer
from metascale.optim import RULES
from metascale.spec import load_spec



def two_layer_spec():
    """Sine tasks on a 1-8-1 MLP (two layers: depths 0 and 1), three depth anchors: the middle
    anchor (depth 0.5) can never receive a meta-gradient."""
    spec = load_spec("tasks/sine.toml")
    return dataclasses.replace(
        spec, family=dataclasses.replace(spec.family, hidden=(8,), n_val=20),
        inner=dataclasses.replace(spec.inner, steps=3),
        meta=dataclasses.replace(spec.meta, steps=2, batch_size=2, select_every=0))


@pytest.fixture(scope="module", params=["layerwise", "adaptive-momentum"])
def exported(request, tmp_path_factory):
    spec = two_layer_spec()
    res = MetaTrainer(spec, seed=0, device="cpu", progress=False, rule=request.param).train()
    path = tmp_path_factory.mktemp("nt") / "optimizer.safetensors"
    metascale.save_optimizer(path, res.meta, res.rule, spec.to_dict(), res.summary)
    return request.param, res, path


def test_the_middle_anchor_is_recorded_as_never_trained(exported):
    name, res, _ = exported
    nt = res.summary["never_trained"]
    assert nt["depth_bins"] == 3
    assert sorted((a["role"], a["depth"]) for a in nt["anchors"]) == [("matrix", 0.5), ("vector", 0.5)]
    assert 0 < sum(nt["entries"].values()) < sum(nt["sizes"].values())
    init = RULES[name].init_meta(res.rule, 3, seed=0)
    axes = RULES[name].anchor_axes(init)
    for k, (ra, ba) in axes.items():  # the untrained anchor kept its initial values exactly
        got, want = res.meta[k].movedim((ra, ba), (0, 1)), init[k].movedim((ra, ba), (0, 1))
        assert torch.equal(got[:, 1], want[:, 1]) and not torch.equal(got[:, 0], want[:, 0])


def test_load_optimizer_warns_for_models_that_map_there(exported):
    _, _, path = exported
    deep = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 1))
    with pytest.warns(UserWarning, match=r"map onto \(role, depth\) anchors that meta-training never reached") as w:
        metascale.load_optimizer(path, deep.parameters())
    assert "matrix layer 1 of 3 (depth 0.50)" in str(w[0].message)
    shallow = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metascale.load_optimizer(path, shallow.parameters())  # depths 0 and 1 only: no warning


def test_info_shows_them(exported, capsys):
    _, _, path = exported
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "anchors never reached: matrix depth 0.50, vector depth 0.50" in out


def test_all_anchors_reached_on_three_layers():
    spec = two_layer_spec()
    spec = dataclasses.replace(spec, family=dataclasses.replace(spec.family, hidden=(8, 8)))
    res = MetaTrainer(spec, seed=0, device="cpu", progress=False, meta_steps=1).train()
    assert res.summary["never_trained"]["anchors"] == []
