"""`metascale bench`: the metrics (speedup, IQM), a run's divergence handling, the tuning cache
(re-benchmarking never re-tunes), the outputs, and one-line errors with exit code 2."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from metascale import bench as B
from metascale.bench_suites import BenchTask, _t
from metascale.cli import main

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "release-0.1.0" / "layerwise.safetensors"

TINY = [
    _t("iris", "tabular", 16, 30, "iris MLP", datasets=["iris"], models=["mlp"], width=8, depth=1),
    _t("lm", "char_lm", 8, 12, "char LM", seq_len=8, d_model=8, layers=1, heads=2, n_train=64, n_val=16),
]


@pytest.fixture
def tiny(monkeypatch):
    """A 2-task suite ``tiny`` with 2-point grids and one extra weight decay."""
    monkeypatch.setitem(B.SUITES, "tiny", TINY)
    monkeypatch.setattr(B, "GRIDS", {**B.GRIDS, "adamw": [1e-3, 1e-2], "sgd_momentum": [1e-2, 1e-1]})
    monkeypatch.setattr(B, "ADAMW_WD_GRID", (0.0,))
    calls = []
    real = B.run
    monkeypatch.setattr(B, "run", lambda item: calls.append(item) or real(item))
    return calls


def curve(vals, every=10):
    return {"steps": [every * i for i in range(len(vals))], "val": vals, "final_loss": vals[-1]}


def test_speedup_is_adamws_steps_to_its_final_loss_over_the_optimizers():
    adam = curve([5.0, 3.0, 2.0, 2.5])  # final 2.5, first reached at step 20
    assert B.speedup(curve([5.0, 2.4, 2.0, 1.0]), adam) == 2.0
    assert B.speedup(curve([5.0, 4.0, 3.0, 2.5]), adam) == 20 / 30
    assert B.speedup(curve([5.0, 4.0, 3.0, 2.6]), adam) == 0.0  # never reaches it
    assert B.speedup(adam, adam) == 1.0
    assert math.isnan(B.speedup(adam, curve([5.0, math.inf])))


def test_iqm_cuts_a_quarter_at_each_end():
    assert B.iqm([8, 1, 2, 3, 4, 5, 6, 7]) == 4.5
    assert B.iqm([1.0, 2.0, 3.0, math.inf]) == 2.5  # an inf in the top quarter is cut
    assert B.iqm([1.0, math.inf, math.inf, math.inf]) == math.inf
    assert B.iqm([0.5, 1.5, 1.0]) == 1.0  # n = 3: nothing cut
    assert math.isnan(B.iqm([]))


def test_run_is_deterministic_and_tuning_draw_differs_from_evaluation_draw():
    t = TINY[0]
    item = {"task": t, "split": "test", "seed": 0, "opt": {"baseline": "adamw", "lr": 1e-2, "wd": 0.0}}
    a, b = B.run(item), B.run(item)
    assert a["val"] == b["val"] and a["steps"] == B.eval_steps(30) == [0] + list(range(1, 31))
    assert a["val"][-1] < 0.8 * a["val"][0] and not a["diverged"] and 0 < a["final_accuracy"] <= 1
    tune = B.run({**item, "split": "train", "seed": B.TUNE_SEED})
    assert tune["val"][0] != a["val"][0]  # other rows, other init


def test_a_diverging_run_is_stopped_and_counted():
    item = {"task": TINY[0], "split": "test", "seed": 0, "opt": {"baseline": "sgd_momentum", "lr": 1e12}}
    r = B.run(item)
    assert r["diverged"] and r["final_loss"] == math.inf and r["final_accuracy"] is None
    assert r["steps"][-1] < 30 and r["val"][-1] == math.inf
    s = B.summarize({"iris": [r]}, {"iris": [B.run({**item, "opt": {"baseline": "adamw", "lr": 1e-2}})]})
    assert s["diverged_runs"] == 1 and s["tasks"]["iris"]["speedup"] == 0.0 and not s["beats_adamw"]


def test_bench_tunes_once_then_reuses_the_cache(tiny, tmp_path, capsys):
    cache = tmp_path / "cache.json"
    res = B.bench("adamw", "tiny", seeds=[0, 1], cache=cache, progress=False)
    assert len(tiny) == 2 * (2 + 1) + 2 * 2  # per task: 2 learning rates + 1 weight decay; 2 seeds
    assert res["iqm_speedup"] == 1.0 and res["iqm_normalised_loss"] == 1.0 and res["beats_adamw"] == 0
    stored = json.loads(cache.read_text())["tasks"]
    for name in ("iris", "lm"):
        tuned = stored[name]["tuned"]["adamw"]
        assert tuned["opt"]["lr"] in (1e-3, 1e-2) and tuned["opt"]["wd"] in (0.0, B.ADAMW_WD)
        best = min(list(tuned["tuning_final_loss"].values()) + list(tuned["tuning_final_loss_wd"].values()))
        chosen = (tuned["tuning_final_loss"][f"{tuned['opt']['lr']:.3g}"] if tuned["opt"]["wd"] == B.ADAMW_WD
                  else tuned["tuning_final_loss_wd"]["0"])
        assert chosen == best  # the lowest tuning loss of everything tried
        assert set(stored[name]["reference"]) == {"0", "1"} and stored[name]["reference"]["0"]["opt"] == tuned["opt"]
    tiny.clear()
    assert main(["bench", str(FIXTURE), "--suite", "tiny", "--seeds", "2", "--cache", str(cache), "--quiet",
                 "--json", str(tmp_path / "r.json"), "--plots", str(tmp_path / "plots")]) == 0
    assert len(tiny) == 4 and all("file" in it["opt"] for it in tiny)  # no tuning, AdamW's runs cached
    out = capsys.readouterr().out
    assert "IQM speedup over AdamW" in out and "iris" in out and "lm" in out
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["target"] == {"file": str(FIXTURE)} and not r["tuned_now"] and r["runs"] == 4
    for name, row in r["tasks"].items():
        assert len(row["runs"]) == 2 and row["speedups"] == [B.speedup(o, a) for o, a in zip(row["runs"], row["adamw_runs"])]
        assert row["normalised_loss"] == pytest.approx(sorted(row["normalised_losses"])[0] / 2 + sorted(row["normalised_losses"])[1] / 2)
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["iris.png", "lm.png", "summary.png"]
    tiny.clear()
    again = B.bench(str(FIXTURE), "tiny", seeds=[0, 1], cache=cache, progress=False)
    assert tiny == [] and again["tasks"]["lm"]["runs"] == r["tasks"]["lm"]["runs"]  # finished runs are cached too
    tiny.clear()
    B.bench("sgd_momentum", "tiny", seeds=[0], cache=cache, progress=False)
    assert len(tiny) == 2 * 2 + 2  # its own grid, then its runs; AdamW untouched
    assert "sgd_momentum" in json.loads(cache.read_text())["tasks"]["iris"]["tuned"]


@pytest.mark.parametrize("argv, message", [
    (["bench", "adamw", "--suite", "nope"], "unknown suite 'nope'; choose from small, heldout"),
    (["bench", "adam"], "'adam' is neither a file, a pretrained optimizer (mix1k5k-v6, mix1k5k-v5, mix1k5k-v4, mix1k-v3, mix1k-v2, mix1k-v1) nor a baseline; baselines: adamw, sgd_momentum"),
    (["bench", "missing.safetensors"], "missing.safetensors: no such file"),
])
def test_bad_arguments_are_one_line_errors_with_exit_code_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("metascale: error: ") and message in err and err.count("\n") == 1


def test_a_file_that_is_not_an_optimizer_is_refused_before_any_work(tmp_path, capsys, tiny):
    bad = tmp_path / "notes.safetensors"
    bad.write_text("hello")
    assert main(["bench", str(bad), "--suite", "tiny"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("metascale: error: ") and "not a readable safetensors file" in err and err.count("\n") == 1
    assert tiny == []


def test_a_missing_data_package_names_the_extra(monkeypatch, capsys, tiny):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a))
    assert main(["bench", "adamw", "--suite", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "needs the 'sklearn' package (family tabular): pip install -e '.[data]' in the metascale repository" in err and err.count("\n") == 1
    assert tiny == []


def test_suites_are_well_formed():
    from metascale.bench_suites import HELDOUT, SMALL
    assert len(HELDOUT) >= 12 and len({t.name for t in HELDOUT}) == len(HELDOUT)
    steps = {t.steps for t in HELDOUT}
    assert {1000, 5000, 10_000} <= steps and min(t.batch_size for t in HELDOUT) == 16
    assert max(t.batch_size for t in HELDOUT) == 512
    models = {m for t in HELDOUT for m in dict(t.table).get("models", ["transformer"])}
    assert models == {"mlp", "resmlp", "cnn", "gru", "transformer"}
    assert max(dict(t.table).get("depth", [0])[0] for t in HELDOUT) >= 14  # 15 linear layers: 5x the specs' 3
    for t in HELDOUT + SMALL:
        B.build_task(t, "test", 0)  # every table is a valid family config
    assert isinstance(HELDOUT[0], BenchTask)
