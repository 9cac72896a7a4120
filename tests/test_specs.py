"""Every shipped spec loads, meta-trains and evaluates through the command line (tiny budgets),
and the Python quickstart example runs."""
from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from metascale.cli import main
from metascale.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "tasks").glob("*.toml"))




def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return repr(v)


def dump_toml(data: dict, prefix: str = "") -> str:
    """A minimal TOML writer for spec dicts (scalars, then nested tables as [a.b])."""
    lines = [f"{k} = {_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for k, v in data.items():
        if isinstance(v, dict):
            lines.append(f"\n[{prefix}{k}]")
            lines.append(dump_toml(v, f"{prefix}{k}.").rstrip("\n"))
    return "\n".join(lines) + "\n"


def tiny_copy(path: Path, tmp: Path) -> Path:
    data = tomllib.loads(path.read_text())
    data.setdefault("inner", {})["steps"] = 3
    data["inner"]["windows"] = min(data["inner"].get("windows", 1), 2)
    data.setdefault("meta", {}).update(batch_size=2, steps=2)
    data.setdefault("evaluate", {}).update(tasks=3, tune_tasks=2, points_per_decade=1)
    data["evaluate"].pop("steps", None)  # T = the (shrunk) meta-training horizon
    out = tmp / path.name
    out.write_text(dump_toml(data))
    return out


def test_every_family_has_a_shipped_spec():
    assert {load_spec(p).family_name for p in SHIPPED} == {"sine", "teacher_mlp", "quadratic", "gaussian_mixture",
                                                            "digits", "mnist", "mnist_1d", "tabular", "char_lm",
                                                            "mixture"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_spec_is_valid_and_round_trips(path):
    spec = load_spec(path)
    assert spec.description and spec.inner.steps >= 1 and spec.meta.steps >= 1
    again = load_spec(Path(path))
    assert spec.to_dict() == again.to_dict()
    train, test = spec.sampler("train", 0).task(0), spec.sampler("test", 0).task(0)
    assert train.config != test.config


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_spec_meta_trains_and_evaluates(path, tmp_path, capsys):
    spec = tiny_copy(path, tmp_path)
    run = tmp_path / "run"
    assert main(["meta-train", "--spec", str(spec), "--out", str(run), "--quiet"]) == 0
    assert main(["evaluate", str(run / "optimizer.safetensors"), "--spec", str(spec), "--quiet",
                 "--json", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert set(result["optimizers"]) == {"learned", "sgd", "sgd_momentum", "adam"}
    T = load_spec(spec).inner.horizon  # evaluated over the meta-training horizon
    for row in result["optimizers"].values():
        assert len(row["final_losses"]) == 3 and len(row["median_curve"]) == T + 1
    out = capsys.readouterr().out
    assert "learned" in out and "steps to Adam" in out


def test_python_quickstart_example_runs(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--meta-steps", "2",
                           "--out", str(tmp_path / "qs")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    losses = [float(l.split()[-1]) for l in proc.stdout.splitlines() if l.startswith("step")]
    assert len(losses) == 5 and losses[-1] < 0.5 * losses[0]
    assert (tmp_path / "qs" / "optimizer.safetensors").is_file()
