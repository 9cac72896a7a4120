"""metascale.parallel and the --threads/--jobs flags: meta-training on 2 local processes
(``--jobs 2``, the torch.distributed path) equals one process bit for bit, ``evaluate --jobs 2``
equals ``--jobs 1`` exactly, and the launcher stops every rank when one fails."""
from __future__ import annotations

import json
import os
import time

import pytest
import torch
from safetensors.torch import load_file

from metascale import parallel
from metascale.cli import main

SPEC = """description = "tiny --jobs check"
[family]
name = "sine"
hidden = [8]
[inner]
steps = 4
[meta]
batch_size = 5
steps = 3
[evaluate]
tasks = 5
tune_tasks = 3
lr_min = 0.001
lr_max = 1.0
"""


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(SPEC)
    return path


def meta_train(tmp_path, spec, out, *extra):
    code = main(["meta-train", "--spec", str(spec), "--out", str(tmp_path / out), "--quiet", "--device", "cpu",
                 "--threads", "1", *extra])
    assert code == 0
    return (load_file(str(tmp_path / out / "optimizer.safetensors")),
            [json.loads(l) for l in (tmp_path / out / "metrics.jsonl").read_text().splitlines()])


@pytest.mark.parametrize("rule", ["layerwise", "adaptive-momentum"])
def test_meta_train_jobs2_equals_one_process(tmp_path, spec, rule):
    a, la = meta_train(tmp_path, spec, "one", "--jobs", "1", "--rule", rule)
    b, lb = meta_train(tmp_path, spec, "two", "--jobs", "2", "--rule", rule)  # ranks take tasks 0,2,4 and 1,3
    assert set(a) == set(b) and len(a) >= 2
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bitwise
    assert [r["meta_loss"] for r in la] == [r["meta_loss"] for r in lb]
    assert [r["tasks_ok"] for r in lb] == [5, 5, 5]
    # the meta-parameters moved from their start, so equality is not trivially that of the init
    c, _ = meta_train(tmp_path, spec, "zero", "--jobs", "1", "--rule", rule, "--meta-steps", "0")
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_selection_measure_split_over_ranks_equals_one_process(tmp_path):
    """--jobs 2 splits the selection draws (5 here: ranks take 0,2,4 and 1,3) and gathers them in
    task order: the measure of every meta-step equals one process's, bit for bit."""
    spec = tmp_path / "select.toml"
    spec.write_text(SPEC.replace("steps = 3\n", "steps = 3\nselect_every = 1\nselect_tasks = 5\n"))
    a, la = meta_train(tmp_path, spec, "one", "--jobs", "1")
    b, lb = meta_train(tmp_path, spec, "two", "--jobs", "2")
    assert [r["selection_loss"] for r in la] == [r["selection_loss"] for r in lb]
    assert len(lb) == 3 and all(isinstance(r["selection_loss"], float) for r in lb)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_evaluate_jobs2_equals_jobs1(tmp_path, spec):
    meta_train(tmp_path, spec, "opt", "--jobs", "1", "--meta-steps", "2")
    opt = tmp_path / "opt" / "optimizer.safetensors"
    outs = []
    for jobs in ("1", "2"):
        path = tmp_path / f"eval{jobs}.json"
        assert main(["evaluate", str(opt), "--spec", str(spec), "--quiet", "--device", "cpu", "--threads", "1",
                     "--jobs", jobs, "--compare", str(opt), "--baselines", "sgd,adam", "--json", str(path)]) == 0
        outs.append(json.loads(path.read_text()))
    assert outs[0] == outs[1]  # every curve, tuned lr and tuning score, exactly
    rows = outs[0]["optimizers"]
    assert set(rows) == {"sgd", "adam", "learned", "learned_layerwise"}
    assert len(rows["adam"]["tuning_median_final_loss"]) == 7  # the grid 1e-3 .. 1 at 2 per decade
    assert rows["learned"]["final_losses"] == rows["learned_layerwise"]["final_losses"]


def test_evaluate_jobs_refuses_unpicklable_factories(spec):
    from metascale.evaluate import evaluate
    from metascale.spec import load_spec
    with pytest.raises(ValueError, match="picklable"):
        evaluate({"x": lambda p, lr: torch.optim.SGD(p, lr=lr)}, load_spec(spec), jobs=2, progress=False)


def _square(x: int) -> int:
    return x * x + torch.get_num_threads() * 100


def test_map_jobs_order_and_worker_threads():
    assert parallel.map_jobs(_square, range(7), jobs=2, threads=1) == [x * x + 100 for x in range(7)]
    with parallel.Workers(2, threads=1) as w:
        assert w.map(_square, [3, 1]) == [109, 101]
        assert w.map(_square, []) == []
    assert parallel.map_jobs(_square, [2, 3], jobs=2, threads=2) == [204, 209]  # the workers' thread count


def _rank_fn(fail_rank: int) -> int:
    import torch.distributed as dist
    dist.init_process_group("gloo")
    assert dist.get_world_size() == 2 and torch.get_num_threads() == 1
    if dist.get_rank() == fail_rank:
        return 3
    dist.barrier()  # the other rank waits here for a peer that never comes
    return 0


def test_launch_stops_all_ranks_when_one_fails():
    t0 = time.monotonic()
    assert parallel.launch(_rank_fn, (1,), 2, threads=1) == 3
    assert time.monotonic() - t0 < 60  # not gloo's 30-minute collective timeout


def test_resolve_defaults(monkeypatch):
    monkeypatch.delenv("METASCALE_JOBS", raising=False)
    monkeypatch.setattr(parallel, "usable_cpus", lambda: 4)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.3, 0.0, 0.0))
    assert parallel.resolve(None, None, "cpu") == (1, 4)  # one process per idle core
    monkeypatch.setattr(os, "getloadavg", lambda: (1.6, 0.0, 0.0))
    assert parallel.resolve(None, None, "cpu") == (1, 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 0.0, 0.0))
    assert parallel.resolve(None, None, "cpu") == (1, 1)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert parallel.resolve(None, None, "cpu", limit=1) == (1, 1)
    assert parallel.resolve(None, None, "cuda:0") == (None, 1)
    assert parallel.resolve(3, 4, "cpu", limit=2) == (3, 2)
    monkeypatch.setenv("METASCALE_JOBS", "5")
    assert parallel.resolve(None, None, "cpu") == (1, 5)
    monkeypatch.setenv("METASCALE_JOBS", "0")
    with pytest.raises(ValueError, match="METASCALE_JOBS"):
        parallel.resolve(None, None, "cpu")


def test_jobs_under_torchrun_refused(tmp_path, spec, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["meta-train", "--spec", str(spec), "--out", str(tmp_path / "x"), "--quiet", "--device", "cpu",
                 "--jobs", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torchrun" in err[0] and err[0].startswith("metascale: error: --jobs 2")


def test_cli_threads_flag(tmp_path, spec):
    n = torch.get_num_threads()
    try:
        meta_train(tmp_path, spec, "t2", "--jobs", "1", "--threads", "2", "--meta-steps", "1")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(n)
    with pytest.raises(SystemExit):
        main(["meta-train", "--spec", str(spec), "--out", str(tmp_path / "y"), "--threads", "0"])
