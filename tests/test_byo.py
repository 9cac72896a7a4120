"""Bring your own task (issue 16): metascale.custom_spec from a model factory, a data sampler and
a loss (no package or registry edit); a TOML [family] name = "package.module:Name" that the
command line imports; `metascale evaluate FILE` with the spec stored in FILE."""
import dataclasses
import textwrap

import pytest
import torch

import metascale
from metascale.errors import SpecError
from metascale.evaluate import FileOptimizer, evaluate
from metascale.spec import load_spec
from test_cli import assert_error, run, tiny_spec


def model():
    return torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def data(g, split):
    """A random plane y = w.x + b per task; meta-test tasks use another range of b."""
    w = torch.randn(2, generator=g)
    b = float(torch.rand((), generator=g)) + (2.0 if split == "test" else 0.0)
    x = torch.randn(40, 2, generator=g)
    y = (x @ w + b)[:, None]
    return x[:20], y[:20], x[20:], y[20:]


def l1(pred, target):
    return (pred - target).abs().mean()


def tiny(spec):
    return dataclasses.replace(spec, inner=dataclasses.replace(spec.inner, steps=3, batch_size=10),
                               meta=dataclasses.replace(spec.meta, steps=2, batch_size=2, select_every=0),
                               evaluate=dataclasses.replace(spec.evaluate, tasks=3, tune_tasks=2, points_per_decade=1))


def test_custom_spec_meta_trains_and_evaluates(tmp_path):
    spec = tiny(metascale.custom_spec(model, data, loss=l1, base="tasks/sine.toml", name="planes"))
    a, b = spec.sampler("train", 3).task(5), spec.sampler("train", 3).task(5)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_val, b.y_val)  # reproducible draws
    assert not torch.equal(a.x_train, spec.sampler("test", 3).task(5).x_train)
    pred = torch.zeros_like(a.y_val)
    assert float(a.loss(pred, a.y_val)) == pytest.approx(float(a.y_val.abs().mean()))  # the user's loss
    res = metascale.MetaTrainer(spec, seed=0, device="cpu", progress=False).train()
    assert res.summary["skipped_tasks"] == 0
    path = metascale.save_optimizer(tmp_path / "opt.safetensors", res.meta, res.rule, spec.to_dict(), res.summary)
    assert metascale.read_optimizer(path).spec["family"]["data"] == f"{__name__}.data"
    out = evaluate({"learned": FileOptimizer(str(path))}, spec, device="cpu", progress=False)
    assert out["tasks"] == 3 and "learned" in out["optimizers"] and "adam" in out["optimizers"]


def test_custom_spec_refuses_bad_data():
    with pytest.raises(TypeError, match="must return"):
        metascale.custom_spec(model, lambda g, split: (torch.zeros(3, 2),))


FAMILY = '''
import dataclasses
import torch
from metascale.config import check
from metascale.tasks.base import mlp


@dataclasses.dataclass(frozen=True)
class PlaneConfig:
    n_train: int = dataclasses.field(default=20, metadata=check("int", 1, 1000))


class PlaneFamily:
    name = "planes"
    config_type = PlaneConfig

    def __init__(self, cfg):
        self.cfg = cfg

    def sample(self, g, split):
        return {"w": torch.randn(2, generator=g).tolist(), "b": float(torch.rand((), generator=g))}

    def build(self, config, g, batch_size):
        x = torch.randn(self.cfg.n_train + 50, 2, generator=g)
        y = (x @ torch.tensor(config["w"]) + config["b"])[:, None]
        n = self.cfg.n_train
        return {"kind": "regression", "x_train": x[:n], "y_train": y[:n], "x_val": x[n:], "y_val": y[n:],
                "build_model": lambda: mlp((2, 8, 1))}
'''


def test_import_path_family_from_the_command_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "byo_planes.py").write_text(textwrap.dedent(FAMILY), encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # found in the current folder, as `python -m` would
    toml = tiny_spec(tmp_path, "planes", family={"name": "byo_planes:PlaneFamily", "n_train": 12})
    text = toml.read_text().replace("amplitude", "#").replace("phase =", "#").replace("x_range", "#") \
        .replace("n_val", "#").replace("hidden", "#")
    toml.write_text(text)
    spec = load_spec(toml)
    assert spec.family_name == "byo_planes:PlaneFamily" and spec.family.n_train == 12
    assert spec.sampler("train", 0).task(0).x_train.shape == (12, 2)
    code, out, err = run(capsys, "meta-train", "--spec", toml, "--out", tmp_path / "run", "--quiet", "--jobs", "1")
    assert code == 0, err
    opt = tmp_path / "run" / "optimizer.safetensors"
    assert_error(capsys, ["evaluate", opt, "--quiet", "--jobs", "1"], "import path", "--spec")
    code, out, err = run(capsys, "evaluate", opt, "--spec", toml, "--quiet", "--jobs", "1")
    assert code == 0, err
    assert "learned" in out


def test_evaluate_reads_the_stored_spec(tmp_path, capsys):
    toml = tiny_spec(tmp_path)
    assert run(capsys, "meta-train", "--spec", toml, "--out", tmp_path / "r", "--quiet", "--jobs", "1")[0] == 0
    code, out, err = run(capsys, "evaluate", tmp_path / "r" / "optimizer.safetensors", "--quiet", "--jobs", "1",
                         "--json", tmp_path / "e.json")
    assert code == 0, err
    assert "spec: the one stored in" in out and "tasks=3" in out


@pytest.mark.parametrize("name, msg", [("no_such_module_xyz:Fam", "no module 'no_such_module_xyz'"),
                                       ("os:sep", "must be a task family class"),
                                       ("os:NoSuchName", "has no 'NoSuchName'")])
def test_bad_import_paths_are_one_line_errors(tmp_path, name, msg):
    toml = tiny_spec(tmp_path, family={"name": name})
    with pytest.raises(SpecError, match=msg):
        load_spec(toml)
