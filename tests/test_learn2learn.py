"""learn2learn tasksets as metascale task samplers (metascale.interop.learn2learn).

These tests need learn2learn, which scripts/setup.sh installs (scripts/install_learn2learn.sh);
they fail, never skip, without it: CI must exercise the adapter for real.
"""
from __future__ import annotations

import dataclasses
import math
import random
import sys

import numpy as np
import pytest
import torch

import metascale
from metascale.errors import MissingExtraError, SpecError
from metascale.evaluate import evaluate
from metascale.export import read_optimizer
from metascale.interop.learn2learn import (Learn2LearnSampler, import_learn2learn, learn2learn_spec,
                                           split_support_query)
from metascale.optim import RULES
from metascale.spec import EXTERNAL, spec_from_dict
from metascale.tasks.base import mlp
from metascale.tasks.digits import load

l2l = import_learn2learn()  # MissingExtraError here names the install command


def digits_taskset(ways: int = 5, shots: int = 6, num_tasks: int = -1, images=slice(None)):
    """An N-way taskset over sklearn's digits, built the learn2learn way."""
    x, y = load()
    data = l2l.data.MetaDataset(torch.utils.data.TensorDataset(x[images], y[images]))
    tf = l2l.data.transforms
    return l2l.data.Taskset(data, [tf.NWays(data, n=ways), tf.KShots(data, k=shots), tf.LoadData(data)],
                            num_tasks=num_tasks)


def sine_taskset(functions: int = 20, points: int = 12, seed: int = 0):
    """A regression taskset: ``functions`` sine waves of ``points`` samples each; a task is one
    wave (NWays(1) over the wave ids, KShots over its points)."""
    g = torch.Generator().manual_seed(seed)
    amp, phase = 0.1 + 4.9 * torch.rand(functions, 1, generator=g), math.pi * torch.rand(functions, 1, generator=g)
    x = -5 + 10 * torch.rand(functions, points, generator=g)
    y = amp * torch.sin(x - phase)
    data = l2l.data.MetaDataset(torch.utils.data.TensorDataset(x.reshape(-1, 1), y.reshape(-1)),
                                indices_to_labels={i: i // points for i in range(functions * points)})
    tf = l2l.data.transforms
    return l2l.data.Taskset(data, [tf.NWays(data, n=1), tf.KShots(data, k=points), tf.LoadData(data)])


def digits_model():
    return mlp((64, 16, 5))


def small_spec(**kw):
    spec = learn2learn_spec(digits_taskset(**kw), digits_model, support=3, test=digits_taskset(images=slice(1000, None)),
                            base="tasks/digits.toml")
    return dataclasses.replace(spec, inner=dataclasses.replace(spec.inner, steps=4, batch_size=10),
                               meta=dataclasses.replace(spec.meta, steps=3, batch_size=2))


def test_missing_learn2learn_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "learn2learn", None)  # `import learn2learn` raises ImportError
    with pytest.raises(MissingExtraError, match="scripts/install_learn2learn.sh"):
        import_learn2learn()


def test_task_shapes_and_label_remapping():
    s = Learn2LearnSampler(digits_taskset(shots=6), digits_model, support=2, seed=3, batch_size=4)
    t = s.task(0)
    assert (t.x_train.shape, t.x_val.shape) == ((10, 64), (20, 64))
    assert t.x_train.dtype == torch.float32 and t.y_train.dtype == torch.long
    assert torch.equal(t.y_train, torch.arange(5).repeat_interleave(2))
    assert torch.equal(t.y_val, torch.arange(5).repeat_interleave(4))
    labels = t.config["labels"]
    assert labels == sorted(set(labels)) and len(labels) == 5 and all(0 <= c <= 9 for c in labels)
    # each remapped label names the original digit of its image
    x, y = load()
    for xs, ys in ((t.x_train, t.y_train), (t.x_val, t.y_val)):
        rows = (xs[:, None, :] == x[None]).all(-1).float().argmax(1)
        assert torch.equal(y[rows], torch.tensor(labels)[ys])
    assert t.kind == "classification" and t.batch_size == 4 and t.train_batch(0)[0].shape == (4, 64)
    assert t.loss(torch.zeros(3, 5), torch.tensor([0, 1, 2])).item() == pytest.approx(math.log(5), abs=1e-6)


def test_split_equals_learn2learns_partition_task():
    """Support/query per class is learn2learn's own partition_task, labels mapped back."""
    s = Learn2LearnSampler(digits_taskset(shots=7), digits_model, support=3, seed=1)
    for i in range(3):
        x, y, _ = s.draw(i)
        (xs, ys), (xq, yq) = l2l.data.partition_task(x, y, shots=3)
        x_tr, y_tr, x_va, y_va, labels = split_support_query(x, y, "classification", 3)
        assert torch.equal(x_tr, xs) and torch.equal(labels[y_tr], ys)
        assert torch.equal(x_va, xq) and torch.equal(labels[y_va], yq)


def test_draws_are_reproducible_by_index_and_leave_global_rngs_alone():
    a = Learn2LearnSampler(digits_taskset(), digits_model, seed=7)
    b = Learn2LearnSampler(digits_taskset(), digits_model, seed=7)
    forward = [a.task(i) for i in (0, 1, 2)]
    backward = [b.task(i) for i in (2, 1, 0)][::-1]
    for s, t in zip(forward, backward):
        assert torch.equal(s.x_train, t.x_train) and torch.equal(s.y_val, t.y_val) and s.seed == t.seed
        assert s.config == t.config
    assert not torch.equal(forward[0].x_train, forward[1].x_train)
    other = Learn2LearnSampler(digits_taskset(), digits_model, seed=8).task(0)
    test = Learn2LearnSampler(digits_taskset(), digits_model, seed=7, split="test").task(0)
    assert not torch.equal(other.x_train, forward[0].x_train) and not torch.equal(test.x_train, forward[0].x_train)
    # Python's, numpy's and torch's global generators continue as if no task had been drawn
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    a.task(5)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected
    # the same model init for the same draw
    m1, m2 = a.task(1).make_model(), b.task(1).make_model()
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))


def test_fixed_pool_taskset_cycles_through_its_members():
    s = Learn2LearnSampler(digits_taskset(num_tasks=4), digits_model, seed=0)
    t1, t5, t2 = s.task(1), s.task(5), s.task(2)
    assert t1.config["pool_member"] == t5.config["pool_member"] == 1
    assert torch.equal(t1.x_train, t5.x_train) and not torch.equal(t1.x_train, t2.x_train)
    assert t1.seed != t5.seed  # another draw of the member: another init and minibatch order


def test_regression_tasks():
    s = Learn2LearnSampler(sine_taskset(), lambda: mlp((1, 8, 1)), kind="regression", support=5, query=4)
    t = s.task(0)
    assert (t.x_train.shape, t.y_train.shape, t.x_val.shape, t.y_val.shape) == ((5, 1), (5, 1), (4, 1), (4, 1))
    x, y, _ = s.draw(0)
    assert torch.equal(t.x_train, x[:5]) and torch.equal(t.y_val[:, 0], y[5:9])
    assert t.loss(torch.zeros(2, 1), torch.ones(2, 1)).item() == 1.0


def test_bad_input_is_rejected():
    with pytest.raises(TypeError, match="learn2learn Taskset"):
        Learn2LearnSampler([(torch.zeros(3), torch.zeros(3))], digits_model)
    with pytest.raises(ValueError, match="kind"):
        Learn2LearnSampler(digits_taskset(), digits_model, kind="ranking")
    with pytest.raises(ValueError, match="support = 6 per class"):
        Learn2LearnSampler(digits_taskset(shots=6), digits_model, support=6).task(0)


def test_meta_train_export_and_load_end_to_end(tmp_path):
    spec = small_spec()
    first = metascale.MetaTrainer(spec, seed=0, device="cpu", progress=False).train(tmp_path / "metrics.jsonl")
    again = metascale.MetaTrainer(spec, seed=0, device="cpu", progress=False).train()
    assert all(torch.equal(first.meta[k], again.meta[k]) for k in first.meta)
    assert first.summary["skipped_tasks"] == 0 and math.isfinite(first.summary["first_meta_loss"])
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    # three Adam steps of 0.03 on the log step sizes: the largest move is close to 3 x 0.03
    moved = (first.meta["log_step_size"] - RULES[first.summary["rule"]].init_meta(first.rule, spec.inner.horizon)["log_step_size"]).abs().max()
    assert 0.06 < moved <= 0.09 + 1e-6
    path = metascale.save_optimizer(tmp_path / "o.safetensors", first.meta, first.rule, spec.to_dict(), first.summary)
    exported = read_optimizer(path)
    assert exported.spec["family"]["name"] == EXTERNAL and exported.spec["family"]["source"] == "learn2learn"
    assert "NWays(n=5)" in exported.spec["family"]["train"]
    task = spec.sampler("test", 0).task(0)
    model = task.make_model()
    opt = metascale.load_optimizer(path, model.parameters())
    val = lambda: float(task.loss(model(task.x_val), task.y_val).detach())
    before = val()
    for step in range(4):
        x, y = task.train_batch(step)
        opt.zero_grad()
        task.loss(model(x), y).backward()
        opt.step()
    assert val() < before
    # a spec restored from the export records the tasks but cannot draw them
    restored = spec_from_dict(exported.spec, "restored", "test")
    with pytest.raises(SpecError, match="metascale.interop"):
        restored.sampler("train", 0)


def test_evaluate_accepts_the_spec():
    """Baselines tuned on meta-train draws of the training taskset, run on the test taskset."""
    spec = small_spec()
    spec = dataclasses.replace(spec, evaluate=dataclasses.replace(spec.evaluate, tasks=2, tune_tasks=2, lr_min=0.01,
                                                                  lr_max=1.0, points_per_decade=1))
    out = evaluate({}, spec, device="cpu", progress=False)
    assert out["tasks"] == 2 and out["steps"] == 4
    assert all(math.isfinite(r["median_final_loss"]) for r in out["optimizers"].values())
