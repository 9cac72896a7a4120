"""Meta-training guards of the ``[meta]`` table: per-task meta-gradient clipping
(``task_clip``) and selection of the best meta-parameters on fixed meta-train draws
(``select_every``); and the adaptive rule's offset table, which meta-trains at ``lr``."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from metascale.meta import MetaTrainer
from metascale.meta.checkpoint import read_checkpoint
from metascale.meta.trainer import clip_task

from test_checkpoint import records, small_spec


def spec_with(**meta):
    spec = small_spec()
    return dataclasses.replace(spec, meta=dataclasses.replace(spec.meta, **meta))


def run(spec, steps, rule="adaptive-momentum", **kw):
    return MetaTrainer(spec, seed=0, device="cpu", progress=False, meta_steps=steps, rule=rule).train(**kw)


def test_clip_task_is_the_formula():
    g = torch.tensor([3.0, 4.0], dtype=torch.float64)  # norm 5
    assert torch.equal(clip_task(g, 0.0), g) and torch.equal(clip_task(g, 5.0), g) and torch.equal(clip_task(g, 9.0), g)
    assert torch.allclose(clip_task(g, 1.0), torch.tensor([0.6, 0.8], dtype=torch.float64), rtol=0, atol=1e-15)
    assert clip_task(torch.zeros(3), 1.0).abs().sum() == 0


def test_task_clip_bounds_every_task_before_the_mean(monkeypatch):
    """The gradient Adam sees is the mean of the per-task gradients each clipped to
    ``task_clip`` (then the global clip): one task 1e4 times larger does not set the step."""
    big, small = torch.tensor([1e4, 0.0]), torch.tensor([0.0, -0.5])
    rows = iter([big, small])
    seen = []

    def fake_row(self, task, meta, rule, loss_fn, params, inner=None):
        g = next(rows).double()
        n = sum(v.numel() for v in params)
        flat = torch.zeros(n, dtype=torch.float64)
        flat[:2] = g
        return torch.cat([torch.tensor([1.0, 0.0], dtype=torch.float64), flat])

    real_step = torch.optim.Adam.step

    def spy(self, *a, **k):
        seen.append(torch.cat([p.grad.reshape(-1) for g in self.param_groups for p in g["params"]]).clone())
        return real_step(self, *a, **k)
    monkeypatch.setattr(MetaTrainer, "_task_row", fake_row)
    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    run(spec_with(task_clip=1.0, clip=0.0, batch_size=2, select_every=0), 1, rule="layerwise")
    assert torch.allclose(seen[0][:2], torch.tensor([0.5, -0.25]), rtol=0, atol=1e-7)
    assert seen[0][2:].abs().sum() == 0


def test_selection_exports_the_best_measured_meta_parameters(tmp_path):
    """Selection every meta-step: the export is bitwise the meta-parameters after the meta-step
    with the lowest selection loss (a run stopped there), and the metrics record each measure."""
    spec = spec_with(select_every=1, select_tasks=3)
    res = run(spec, 4, metrics_path=tmp_path / "m.jsonl")
    sel = [r["selection_loss"] for r in records(tmp_path / "m.jsonl")]
    assert all(isinstance(x, float) and math.isfinite(x) for x in sel)
    best = min(range(4), key=lambda i: (sel[i], i)) + 1
    assert res.summary["selected_meta_step"] == best and res.summary["selection_loss"] == sel[best - 1]
    stopped = run(spec, best)
    assert all(torch.equal(res.meta[k], stopped.meta[k]) for k in res.meta)
    # selection does not disturb training: the last meta-parameters are those of a plain run
    plain = run(spec_with(), 4)
    last = run(spec_with(select_every=1, select_tasks=3), 4)
    assert last.summary["final_meta_loss_avg_last_10pct"] == plain.summary["final_meta_loss_avg_last_10pct"]


def test_selection_measures_every_n_and_the_last(tmp_path):
    """Every ``select_every`` meta-steps in ``metrics.jsonl``; the last meta-parameters (step 5,
    not a multiple) are measured after the loop, so a checkpoint never holds a measure that a
    longer run would not make."""
    spec = spec_with(select_every=2, select_tasks=2)
    res = run(spec, 5, metrics_path=tmp_path / "m.jsonl")
    sel = {r["meta_step"] + 1: r["selection_loss"] for r in records(tmp_path / "m.jsonl")
           if r["selection_loss"] is not None}
    assert sorted(sel) == [2, 4]
    if res.summary["selected_meta_step"] == 5:
        assert res.summary["selection_loss"] < min(sel.values())
    else:
        assert res.summary["selection_loss"] == min(sel.values())


def test_selection_survives_a_resume(tmp_path):
    """The best-so-far snapshot is in the checkpoint: a resumed run selects exactly as an
    uninterrupted one, also when the resume asks for more meta-steps than the first run."""
    spec = spec_with(select_every=2, select_tasks=2)
    ref = run(spec, 5)
    run(spec, 3, metrics_path=tmp_path / "r" / "m.jsonl", checkpoint_path=tmp_path / "r" / "ck.safetensors",
        checkpoint_every=1)
    ck = read_checkpoint(tmp_path / "r" / "ck.safetensors")
    assert ck.best is not None and ck.best[0] == 2 and sorted(ck.best[2]) == sorted(ck.meta)
    res = run(spec, 5, metrics_path=tmp_path / "r" / "m.jsonl", checkpoint_path=tmp_path / "r" / "ck.safetensors",
              checkpoint_every=1, resume=True)
    assert res.summary["selected_meta_step"] == ref.summary["selected_meta_step"]
    assert all(torch.equal(res.meta[k], ref.meta[k]) for k in ref.meta)


def test_spec_reads_the_guards(tmp_path):
    from metascale.spec import load_spec
    from test_checkpoint import SPEC
    path = tmp_path / "s.toml"
    path.write_text(SPEC.replace("[meta]\n", "[meta]\ntask_clip = 2.0\nselect_every = 5\nselect_tasks = 4\n"))
    meta = load_spec(path).meta
    assert (meta.task_clip, meta.select_every, meta.select_tasks) == (2.0, 5, 4)
    path.write_text(SPEC.replace("[meta]\n", "[meta]\nselect_every = -1\n"))
    with pytest.raises(Exception, match="select_every"):
        load_spec(path)


def test_offset_table_meta_trains_at_lr():
    """The adaptive rule's offset table and output offsets move at ``lr`` (like the static
    rule's log step sizes), the weights that read the statistics at ``net_lr``: Adam's first
    step moves every entry with a gradient by about its step size."""
    spec = spec_with()
    init, one = run(spec, 0), run(spec, 1)
    moved = {k: float((one.meta[k] - init.meta[k]).abs().max()) for k in init.meta}
    # the table covers the meta-training horizon K (table_steps unset: it follows from K)
    assert init.meta["table"].shape == (2, 2, 3, spec.inner.horizon) and init.meta["table"].abs().sum() == 0
    for k in ("table", "b2"):
        assert moved[k] == pytest.approx(spec.meta.lr, rel=1e-3), k
    for k in ("w2", "wl"):
        assert moved[k] == pytest.approx(spec.meta.net_lr, rel=1e-3), k
    assert moved["w1"] == moved["b1"] == 0  # no gradient yet: W_2 starts at zero


def test_selection_is_off_when_a_loss_is_learned(tmp_path):
    """The selection snapshot holds the optimizer's meta-parameters only, so it is not used
    with a learned loss: optimizer and loss always come from the same (last) meta-step."""
    res = MetaTrainer(spec_with(select_every=1, select_tasks=2), seed=0, device="cpu", progress=False, meta_steps=2,
                      learn="both").train(tmp_path / "m.jsonl")
    assert "selected_meta_step" not in res.summary
    assert all(r["selection_loss"] is None for r in records(tmp_path / "m.jsonl"))
