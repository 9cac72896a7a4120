"""Task families: reproducibility, split disjointness, shapes, and the config validator."""
from __future__ import annotations

import itertools
import json
import math
import sys

import pytest
import torch

from metascale.config import from_table
from metascale.errors import MissingExtraError, SpecError
from metascale.tasks import FAMILIES, TaskSampler
from metascale.tasks import digits as digits_mod
from metascale.tasks.quadratic import random_orthogonal
from metascale.tasks.teacher_mlp import TeacherMLPConfig

BATCH = 5  # smaller than every family's training pool below

# One line per family: (name, spec table for its config). Adding a family adds one line.
CASES = [
    ("sine", {}),
    ("teacher_mlp", {"n_train": 32, "n_val": 64}),
    ("quadratic", {"n_train": 40, "n_val": 80}),
    ("gaussian_mixture", {"n_train": 40, "n_val": 80}),
    ("digits", {}),
    ("mnist", {"models": ["mlp", "cnn", "resmlp"], "width": [4, 8], "n_train": 100, "n_val": 100}),
    ("mnist_1d", {"models": ["mlp", "cnn", "gru", "resmlp"], "width": [4, 8], "n_train": 100, "n_val": 100}),
    ("tabular", {"datasets": ["iris", "wine", "breast_cancer"], "width": [4, 8]}),
    ("char_lm", {"seq_len": 8, "d_model": [8, 16], "layers": [1, 2], "n_train": 40, "n_val": 20}),
    ("mixture", {"members": ["sine", "gaussian_mixture"], "weights": [1, 1],
                 "configs": {"gaussian_mixture": {"n_train": 40, "n_val": 80}}}),
]
NAMES = [name for name, _ in CASES]


def sampler(name: str, split: str = "train", seed: int = 0, table: dict | None = None) -> TaskSampler:
    """A fresh sampler of family ``name``; ``table`` (default: the CASES row) is its spec table."""
    family_cls, config_cls = FAMILIES[name]
    cfg = from_table(config_cls, dict(CASES)[name] if table is None else table, f"{name} [family]")
    return TaskSampler(family_cls(cfg), split, seed=seed, batch_size=BATCH)


def key(config: dict) -> str:
    """A config as canonical JSON (hashable, and fails if the config is not JSON-able)."""
    return json.dumps(config, sort_keys=True)


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, same dtype and shape."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_table_covers_every_family():
    assert sorted(NAMES) == sorted(FAMILIES)


@pytest.mark.parametrize("name", NAMES)
def test_same_draw_is_bitwise_identical(name):
    a, b = sampler(name).task(3), sampler(name).task(3)
    assert a.seed == b.seed and key(a.config) == key(b.config)
    json.loads(key(a.config))  # JSON-able
    for field in ("x_train", "y_train", "x_val", "y_val"):
        assert same_tensor(getattr(a, field), getattr(b, field)), field
    pa, pb = list(a.make_model().parameters()), list(b.make_model().parameters())
    assert len(pa) == len(pb) > 0 and all(same_tensor(p, q) for p, q in zip(pa, pb))
    for step in (0, 7):
        xa, ya = a.train_batch(step)
        xb, yb = b.train_batch(step)
        assert same_tensor(xa, xb) and same_tensor(ya, yb)


@pytest.mark.parametrize("name", NAMES)
def test_different_indices_differ(name):
    s = sampler(name)
    a, b = s.task(0), s.task(1)
    assert a.seed != b.seed and key(a.config) != key(b.config)
    assert a.x_train.shape != b.x_train.shape or not torch.equal(a.x_train, b.x_train)
    p0 = next(a.make_model().parameters())
    p1 = next(b.make_model().parameters())
    assert p0.shape != p1.shape or not torch.equal(p0, p1)


@pytest.mark.parametrize("name", NAMES)
def test_train_and_test_draws_never_share_a_config(name):
    train = {key(t.config) for t in sampler(name, "train", seed=11).tasks(50)}
    test = {key(t.config) for t in sampler(name, "test", seed=11).tasks(50)}
    assert len(train) == len(test) == 50
    assert not train & test


@pytest.mark.parametrize("name", NAMES)
def test_shapes_dtypes_and_initial_loss(name):
    task = sampler(name).task(0)
    model = task.make_model()
    for x, y in ((task.x_train, task.y_train), (task.x_val, task.y_val)):
        want = torch.long if task.kind == "sequence" else torch.float32  # token ids
        assert x.dtype == want and x.dim() == 2 and y.shape[0] == x.shape[0] > BATCH
        out = model(x)
        if task.kind == "regression":
            assert y.dtype == torch.float32 and y.shape == (x.shape[0], 1) == out.shape
        elif task.kind == "sequence":  # a class per position: logits (N, classes, positions)
            assert y.dtype == torch.long and y.shape == x.shape and out.shape == (x.shape[0], out.shape[1], x.shape[1])
            assert 0 <= y.min() and y.max() < out.shape[1]
        else:
            assert task.kind == "classification"
            n_classes = out.shape[1]
            assert y.dtype == torch.long and y.shape == (x.shape[0],) and out.shape == (x.shape[0], n_classes)
            assert set(y.tolist()) == set(range(n_classes))  # every class present, none out of range
        assert torch.isfinite(out).all()
    assert task.x_train.shape[1] == task.x_val.shape[1]
    loss = task.loss(model(task.x_val), task.y_val)
    assert loss.dim() == 0 and math.isfinite(loss.item()) and loss.item() > 0


@pytest.mark.parametrize("name", NAMES)
def test_train_batch_is_a_deterministic_minibatch_of_the_pool(name):
    task = sampler(name).task(2)
    x, y = task.train_batch(4)
    assert x.shape[0] == y.shape[0] == BATCH
    x2, y2 = task.train_batch(4)
    assert same_tensor(x, x2) and same_tensor(y, y2)
    assert (x[:, None, :] == task.x_train[None]).all(-1).any(1).all()  # rows come from the pool
    assert not torch.equal(torch.cat([task.train_batch(s)[0] for s in range(4)]),
                           torch.cat([x] * 4))  # steps see different batches


@pytest.mark.parametrize("name", NAMES)
def test_to_float64_keeps_integer_targets(name):
    task = sampler(name).task(0).to(dtype=torch.float64)
    assert task.x_train.dtype == task.x_val.dtype == (torch.long if task.kind == "sequence" else torch.float64)
    want = torch.long if task.kind in ("classification", "sequence") else torch.float64
    assert task.y_train.dtype == task.y_val.dtype == want
    out = task.make_model(dtype=torch.float64)(task.x_val)
    assert math.isfinite(task.loss(out, task.y_val).item())


# --- family specifics -------------------------------------------------------------------------

def test_teacher_targets_standardised_on_training_pool_and_rebuildable():
    s = sampler("teacher_mlp", table={"noise_std": 0.0, "n_train": 200, "n_val": 50})
    task = s.task(0)
    y = task.y_train.double()
    assert abs(y.mean().item()) < 1e-5 and abs(y.std(correction=0).item() - 1) < 1e-5
    c = task.config
    assert set(c) == {"input_dim", "teacher_width", "teacher_depth", "activation", "teacher_seed"}
    assert 4 <= c["input_dim"] <= 16 and 16 <= c["teacher_width"] <= 64 and 1 <= c["teacher_depth"] <= 3
    teacher = s.family.teacher(c)
    t1, t2 = teacher(task.x_val.double()), s.family.teacher(c)(task.x_val.double())
    assert torch.equal(t1, t2)
    corr = torch.corrcoef(torch.stack([t1.flatten(), task.y_val.double().flatten()]))[0, 1]
    assert corr > 0.9999  # val targets are an affine map of the teacher output (noise 0)


def test_quadratic_conditioning_and_noise_free_fit():
    s = sampler("quadratic", table={"dim": 4, "condition": [50.0, 50.0], "noise_std": [0.0, 0.0],
                                   "n_train": 20_000, "n_val": 10})
    task = s.task(0)
    x = task.x_train.double()
    eig = torch.linalg.eigvalsh(x.T @ x / x.shape[0])
    assert abs(eig.max().item() - 1) < 0.05 and abs(eig.max().item() / eig.min().item() / 50 - 1) < 0.1
    w = torch.linalg.lstsq(x, task.y_train.double()).solution
    assert (x @ w - task.y_train.double()).abs().max() < 1e-4  # y = x w* exactly, up to float32
    q = random_orthogonal(6, torch.Generator().manual_seed(0))
    assert torch.allclose(q.T @ q, torch.eye(6, dtype=torch.float64), atol=1e-12)


def test_gaussian_mixture_is_balanced_and_in_range():
    for t in sampler("gaussian_mixture").tasks(10):
        k = t.config["n_classes"]
        assert 2 <= k <= 5 and 2 <= t.config["dim"] <= 16 and 1.0 <= t.config["separation"] <= 4.0
        counts = torch.bincount(t.y_train, minlength=k)
        assert counts.max() - counts.min() <= 1 and t.x_train.shape[1] == t.config["dim"]


def test_digits_meta_train_and_meta_test_class_subsets_are_disjoint():
    train = {tuple(t.config["classes"]) for t in sampler("digits", "train", seed=5).tasks(200)}
    test = {tuple(t.config["classes"]) for t in sampler("digits", "test", seed=5).tasks(200)}
    assert train and test and not train & test
    for n_ways in range(2, 10):
        split = digits_mod.class_subsets(n_ways)
        assert split["train"] and split["test"] and not set(split["train"]) & set(split["test"])
        assert sorted(split["train"] + split["test"]) == list(itertools.combinations(range(10), n_ways))


def test_digits_train_and_val_images_are_disjoint_and_labelled_in_subset_order():
    x_all, y_all = digits_mod.load()
    for t in sampler("digits").tasks(5):
        tr, va, classes = t.config["train_images"], t.config["val_images"], t.config["classes"]
        assert len(tr) == len(set(tr)) == 5 * 10 and len(va) == len(set(va)) == 5 * 20
        assert not set(tr) & set(va)
        assert torch.equal(t.x_train, x_all[tr]) and torch.equal(t.x_val, x_all[va])
        assert [classes[i] for i in t.y_train.tolist()] == y_all[tr].tolist()
        assert [classes[i] for i in t.y_val.tolist()] == y_all[va].tolist()
        assert 0.0 <= t.x_train.min() and t.x_train.max() <= 1.0


def test_digits_without_sklearn_raises_missing_extra(monkeypatch):
    digits_mod.load.cache_clear()
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(MissingExtraError, match=r"pip install -e '\.\[digits\]'"):
        sampler("digits").task(0)
    monkeypatch.undo()
    digits_mod.load.cache_clear()
    assert sampler("digits").task(0).x_train.shape == (50, 64)


# --- config validation --------------------------------------------------------------------------

def test_from_table_rejects_unknown_key_naming_it_and_the_allowed_keys():
    with pytest.raises(SpecError) as e:
        from_table(digits_mod.DigitsConfig, {"n_way": 3}, "tasks/digits.toml [family]")
    msg = str(e.value)
    assert "tasks/digits.toml [family]" in msg and "'n_way'" in msg
    assert "n_ways, n_train_per_class, n_val_per_class, hidden, activation" in msg


@pytest.mark.parametrize("table, expected", [
    ({"n_ways": 10}, "n_ways = 10 is not allowed; expected an integer in [2, 9]"),
    ({"n_ways": 1}, "n_ways = 1 is not allowed; expected an integer in [2, 9]"),
    ({"n_ways": 3.0}, "n_ways = 3.0 is not allowed"),
    ({"n_train_per_class": 100, "n_val_per_class": 100}, "expected at most 174"),
])
def test_from_table_rejects_out_of_range_digits_values(table, expected):
    with pytest.raises(SpecError, match="^w: ") as e:
        from_table(digits_mod.DigitsConfig, table, "w")
    assert expected in str(e.value)


@pytest.mark.parametrize("table, expected", [
    ({"teacher_depth": [1, 9]},
     "teacher_depth = [1, 9] is not allowed; expected a pair [lo, hi] with 0 <= lo <= hi <= 8"),
    ({"input_dim": [8, 4]}, "input_dim = [8, 4] is not allowed"),
    ({"input_dim": [4.5, 8]}, "input_dim = [4.5, 8.0] is not allowed; expected a pair of integers"),
    ({"activations": ["relu", "swish"]}, "activations = ['relu', 'swish'] is not allowed; expected a non-empty list"),
    ({"activations": []}, "activations = [] is not allowed"),
    ({"noise_std": -0.1}, "noise_std = -0.1 is not allowed; expected a number in [0.0, 10.0]"),
])
def test_from_table_rejects_out_of_range_teacher_values(table, expected):
    with pytest.raises(SpecError) as e:
        from_table(TeacherMLPConfig, table, "w")
    assert expected in str(e.value)


def test_from_table_accepts_lists_and_converts_them():
    cfg = from_table(TeacherMLPConfig, {"activations": ["tanh"], "input_dim": [3, 3], "student_hidden": [8]}, "w")
    assert cfg.activations == ("tanh",) and cfg.input_dim == (3.0, 3.0) and cfg.student_hidden == (8,)
    tasks = TaskSampler(FAMILIES["teacher_mlp"][0](cfg), "train", seed=0, batch_size=4).tasks(5)
    assert {t.config["activation"] for t in tasks} == {"tanh"} and {t.x_train.shape[1] for t in tasks} == {3}
