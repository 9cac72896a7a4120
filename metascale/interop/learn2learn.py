r"""learn2learn task datasets as metascale task samplers.

A learn2learn ``Taskset`` (or the older ``TaskDataset``), built the usual way from a
``MetaDataset`` and task transforms (``NWays``, ``KShots``, ``LoadData``, ...), becomes the task
sampler of :class:`~metascale.MetaTrainer` and :func:`metascale.evaluate.evaluate` through
:func:`learn2learn_spec`; the model factory and the loss come from the metascale side::

    import learn2learn as l2l, torch, metascale
    from metascale.interop.learn2learn import learn2learn_spec

    data = l2l.data.MetaDataset(torch.utils.data.TensorDataset(x, y))
    tasks = l2l.data.Taskset(data, [l2l.data.transforms.NWays(data, n=5),
                                    l2l.data.transforms.KShots(data, k=30),
                                    l2l.data.transforms.LoadData(data)])
    spec = learn2learn_spec(tasks, lambda: metascale.tasks.base.mlp((64, 32, 5)),
                            kind="classification", support=10, base="tasks/digits.toml")
    result = metascale.MetaTrainer(spec, seed=0).train()

**What a draw is.** Draw ``i`` of split ``s`` with seed ``seed`` samples one task description
with the taskset's own transforms and loads its data (``sample_task_description`` then
``get_task``, what ``taskset.sample()`` does) while Python's ``random``, numpy's global RNG and
torch's CPU RNG (the generators learn2learn's transforms draw from) are seeded with
``mix_seed(seed, s, i)``; their previous states are restored afterwards. So ``task(i)`` is the
same task on every call and every machine, in any order, as with
:class:`~metascale.tasks.TaskSampler`. A taskset with ``num_tasks = N > 0`` is a fixed pool:
draw ``i`` is pool member ``i mod N``, whose description is drawn from a seed of ``(seed, s,
i mod N)`` (the taskset's own cache, filled from the global RNG, is not used).

**Support and query.** Classification: labels are remapped to ``0 .. n-1`` in sorted order of
the original labels (a no-op after learn2learn's ``RemapLabels``); per class, the first
``support`` samples (in the task's order, which ``KShots`` shuffles) form the training pool and
the rest (at most ``query`` per class) the validation set, the split of learn2learn's
``partition_task``. Regression: the first ``support`` samples and the rest; 1-D targets
become ``(n, 1)``, the shape a ``Linear(.., 1)`` head predicts. The loss is metascale's:
cross-entropy or MSE (:meth:`metascale.tasks.base.Task.loss`).

**Meta-train and meta-test.** ``test=`` takes a second taskset (e.g. other classes or other
images); without it, test draws come from the training taskset on another seed stream: other
tasks, but the same data, so not held out.

Needs learn2learn (``bash scripts/install_learn2learn.sh``; the README's section "Using
learn2learn tasks" says why it is not a pip install).
"""
from __future__ import annotations

import contextlib
import dataclasses
import random
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import MissingExtraError
from ..spec import EXTERNAL, Spec, load_spec, spec_from_dict
from ..tasks.base import SPLITS, Task, mix_seed

KINDS = ("classification", "regression")
INSTALL = "bash scripts/install_learn2learn.sh"
_SALT, _POOL = 0x1212, 0x9001
_SPLIT_ID = {"train": 1, "test": 2}


def import_learn2learn():
    """``import learn2learn``, or :class:`MissingExtraError` naming the install command.

    The warning of torchvision 0.16.2 that its image extension did not load is silenced: the
    install leaves out torchvision's compiled parts on purpose, and learn2learn's core never
    reaches them.
    """
    import warnings
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Failed to load image Python extension")
            import learn2learn
    except ImportError as e:
        raise MissingExtraError(f"metascale.interop.learn2learn needs learn2learn ({e}); install it with "
                                f"`{INSTALL}` (a plain `pip install learn2learn` does not build on "
                                "Python 3.11 and would replace the CPU torch)") from None
    return learn2learn


@contextlib.contextmanager
def seeded_global_rngs(seed: int):
    """Seed Python's ``random``, numpy's global RNG and torch's CPU RNG with ``seed`` inside the
    block and restore their states after it."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % (1 << 32))
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def split_support_query(x: torch.Tensor, y: torch.Tensor, kind: str, support: int | None,
                        query: int | None = None) -> tuple[torch.Tensor, ...]:
    """``(x_train, y_train, x_val, y_val, labels)`` of one task's samples (see the module
    docstring); ``labels`` holds the original label of each class (classification) or is
    empty. ``support=None`` takes half of the samples (of the smallest class)."""
    if kind == "regression":
        n = x.shape[0]
        s = n // 2 if support is None else support
        if not 1 <= s < n:
            raise ValueError(f"support = {s} is not allowed for a regression task of {n} samples; "
                             f"expected 1 .. {n - 1}")
        y = y.reshape(n, 1) if y.dim() == 1 else y
        end = n if query is None else min(n, s + query)
        return x[:s], y[:s], x[s:end], y[s:end], torch.zeros(0)
    labels, y = torch.unique(y, sorted=True, return_inverse=True)
    members = [torch.nonzero(y == c).flatten() for c in range(labels.numel())]
    smallest = min(m.numel() for m in members)
    s = smallest // 2 if support is None else support
    if not 1 <= s < smallest:
        raise ValueError(f"support = {s} per class is not allowed: the smallest class of the task has "
                         f"{smallest} samples; expected 1 .. {smallest - 1} (the rest is the validation set)")
    train = torch.cat([m[:s] for m in members])
    val = torch.cat([m[s:] if query is None else m[s:s + query] for m in members])
    return x[train], y[train], x[val], y[val], labels


def describe_taskset(taskset: Any) -> str:
    """One line naming a taskset's class, data-set size and transforms (with ``n``/``k``)."""
    if taskset is None:
        return ""
    parts = []
    for t in getattr(taskset, "task_transforms", None) or []:
        args = [f"{a}={getattr(t, a)}" for a in ("n", "k") if isinstance(getattr(t, a, None), int)]
        parts.append(f"{type(t).__name__}({', '.join(args)})")
    data = getattr(taskset, "dataset", None)
    size = f"{len(data)} samples" if data is not None and hasattr(data, "__len__") else "?"
    return f"{type(taskset).__name__}({size}; {', '.join(parts)}; num_tasks={getattr(taskset, 'num_tasks', '?')})"


class Learn2LearnSampler:
    """Draws metascale :class:`~metascale.tasks.base.Task` objects from a learn2learn taskset,
    reproducibly by ``(seed, split, index)`` (the interface of
    :class:`~metascale.tasks.TaskSampler`).

    Args:
        taskset: a learn2learn ``Taskset``/``TaskDataset`` whose tasks load as ``(x, y, ...)``.
        model_factory: returns the (uninitialised) model; ``Task.make_model`` seeds it.
        kind: ``"classification"`` (cross-entropy, labels remapped) or ``"regression"`` (MSE).
        split: ``"train"`` or ``"test"``; enters the seed.
        seed: the sampler's seed.
        batch_size: inner minibatch size (``None``: the whole support set).
        support: support samples per class (classification) or in all (regression);
            ``None``: half.
        query: at most this many validation samples per class (classification) or in all.
        name: the ``family`` of the tasks.
    """

    def __init__(self, taskset: Any, model_factory: Callable[[], nn.Module], *, kind: str = "classification",
                 split: str = "train", seed: int = 0, batch_size: int | None = None, support: int | None = None,
                 query: int | None = None, name: str = "learn2learn"):
        import_learn2learn()
        if not (hasattr(taskset, "sample_task_description") and hasattr(taskset, "get_task")):
            raise TypeError(f"expected a learn2learn Taskset (l2l.data.Taskset or TaskDataset), got "
                            f"{type(taskset).__name__}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not callable(model_factory):
            raise TypeError("model_factory must be a callable returning an nn.Module")
        self.taskset, self.model_factory, self.kind, self.split = taskset, model_factory, kind, split
        self.seed, self.batch_size, self.support, self.query, self.name = int(seed), batch_size, support, query, name

    def draw(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int | None]:
        """The raw ``(x, y)`` of draw ``index`` as the taskset loads it, and its pool member
        (``None`` for an endless taskset)."""
        n_pool = int(getattr(self.taskset, "num_tasks", -1))
        member = index % n_pool if n_pool > 0 else None
        seed = (mix_seed(self.seed, _SALT, _SPLIT_ID[self.split], _POOL, member) if member is not None
                else mix_seed(self.seed, _SALT, _SPLIT_ID[self.split], index))
        with seeded_global_rngs(seed):
            data = self.taskset.get_task(self.taskset.sample_task_description())
        if not isinstance(data, Sequence) or len(data) < 2:
            raise ValueError(f"a learn2learn task must load as (x, y, ...); got {type(data).__name__}")
        x, y = (torch.as_tensor(v) for v in data[:2])
        return x, y, member

    def task(self, index: int) -> Task:
        """Draw number ``index`` of this sampler as a metascale task."""
        x, y, member = self.draw(index)
        if x.is_floating_point():
            x = x.to(torch.get_default_dtype())
        y = y.long() if self.kind == "classification" else y.to(torch.get_default_dtype())
        x_tr, y_tr, x_va, y_va, labels = split_support_query(x, y, self.kind, self.support, self.query)
        config = {"source": "learn2learn", "pool_member": member, "labels": labels.tolist(),
                  "n_train": int(x_tr.shape[0]), "n_val": int(x_va.shape[0])}
        return Task(family=self.name, split=self.split, index=index,
                    seed=mix_seed(self.seed, _SALT, _SPLIT_ID[self.split], index, 0x5EED), config=config,
                    kind=self.kind, x_train=x_tr, y_train=y_tr, x_val=x_va, y_val=y_va,
                    build_model=self.model_factory,
                    batch_size=x_tr.shape[0] if self.batch_size is None else int(self.batch_size))

    def tasks(self, n: int, start: int = 0) -> list[Task]:
        """Draws ``start, ..., start + n - 1``."""
        return [self.task(i) for i in range(start, start + n)]


@dataclasses.dataclass(frozen=True)
class Learn2LearnSource:
    """What a :class:`Learn2LearnSpec` draws from (not stored in exports; its
    :func:`describe_taskset` lines are)."""

    train: Any
    model_factory: Callable[[], nn.Module]
    kind: str = "classification"
    test: Any = None
    support: int | None = None
    query: int | None = None


@dataclasses.dataclass(frozen=True)
class Learn2LearnSpec(Spec):
    """A metascale :class:`~metascale.spec.Spec` whose tasks come from learn2learn tasksets.

    Its tables (``inner``, ``meta``, ``optimizer``, ``adaptive``, ``evaluate``) mean what they
    mean in a TOML spec (``inner.batch_size`` is the inner minibatch size); ``family`` is the
    JSON record of the tasksets written into exports (``family_name`` is ``"external"``), and
    :meth:`sampler` draws from ``source``. Build it with :func:`learn2learn_spec`; change a
    table with ``dataclasses.replace``.
    """

    source: Learn2LearnSource | None = dataclasses.field(default=None, compare=False)

    def sampler(self, split: str, seed: int) -> Learn2LearnSampler:
        """Sampler of ``split``: the ``test`` taskset for ``"test"`` when one was given, else the
        training taskset (on the split's own seed stream)."""
        src = self.source
        if src is None:
            raise ValueError(f"spec {self.name!r} has no learn2learn source (restored from an export?)")
        taskset = src.test if split == "test" and src.test is not None else src.train
        return Learn2LearnSampler(taskset, src.model_factory, kind=src.kind, split=split, seed=seed,
                                  batch_size=self.inner.batch_size, support=src.support, query=src.query,
                                  name=self.name)


def learn2learn_spec(train: Any, model_factory: Callable[[], nn.Module], *, kind: str = "classification",
                     support: int | None = None, query: int | None = None, test: Any = None,
                     base: Spec | str | Path | None = None, name: str = "learn2learn",
                     description: str = "") -> Learn2LearnSpec:
    """A :class:`Learn2LearnSpec` over learn2learn tasksets.

    Args:
        train: the meta-train taskset; ``test``: the meta-test taskset (optional, see the module
            docstring).
        model_factory, kind, support, query: as in :class:`Learn2LearnSampler`.
        base: a spec (or TOML path) whose ``inner``/``meta``/``optimizer``/``adaptive``/``evaluate``
            tables are taken over (its family is not used); ``None``: the defaults of every table.
    """
    Learn2LearnSampler(train, model_factory, kind=kind, support=support, query=query)  # validates
    if test is not None:
        Learn2LearnSampler(test, model_factory, kind=kind, split="test", support=support, query=query)
    if base is None:
        base = spec_from_dict({"family": {"name": EXTERNAL}}, name, "learn2learn spec")
    elif not isinstance(base, Spec):
        base = load_spec(base)
    record = {"source": "learn2learn", "kind": kind, "support": support, "query": query,
              "train": describe_taskset(train), "test": describe_taskset(test)}
    tables = {f.name: getattr(base, f.name) for f in dataclasses.fields(Spec)}
    tables.update(name=name, description=description or f"learn2learn tasks: {record['train']}",
                  family_name=EXTERNAL, family=record, path=None)
    return Learn2LearnSpec(**tables, source=Learn2LearnSource(train, model_factory, kind, test, support, query))
