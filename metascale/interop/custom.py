r"""Bring your own task: meta-train and evaluate on your model, your data and your loss, with no
edit to the package and no registry.

Three functions of yours make a task distribution::

    def model() -> nn.Module: ...                         # the architecture (metascale seeds its init)
    def data(g: torch.Generator, split: str):             # one task's data, drawn from g only
        return x_train, y_train, x_val, y_val
    def loss(pred, target) -> torch.Tensor: ...           # optional: MSE / cross-entropy by kind

    spec = metascale.custom_spec(model, data, loss=loss, kind="regression", base="tasks/sine.toml")
    result = metascale.MetaTrainer(spec, seed=0).train()
    path = metascale.save_optimizer("runs/mine/optimizer.safetensors", result.meta, result.rule,
                                    spec.to_dict(), result.summary)
    from metascale.evaluate import FileOptimizer, evaluate, format_table
    print(format_table(evaluate({"learned": FileOptimizer(str(path))}, spec)))

**What a draw is.** Draw ``i`` of split ``s`` calls ``data(g, s)`` with a ``torch.Generator``
seeded from ``(seed, s, i)`` (:class:`~metascale.tasks.base.TaskSampler`'s seeding), so a
``data`` that draws only from ``g`` gives the same task on every call and every machine.
``split`` is ``"train"`` (meta-training, and the draws evaluation tunes the baselines' learning
rates on) or ``"test"`` (held-out evaluation): return data from disjoint pools (e.g. other rows
of your dataset) to measure on tasks meta-training never saw. The inner loop trains on
minibatches of ``inner.batch_size`` rows of ``(x_train, y_train)`` and the meta-objective and
evaluation read the loss on ``(x_val, y_val)``.

**The loss** is ``loss(pred, target)`` (a scalar, differentiable in ``pred``); without one,
MSE for ``kind = "regression"`` and cross-entropy for ``"classification"`` (integer targets;
evaluation also reports accuracy). ``kind`` also picks the input of a learned loss.

**The spec.** ``base`` (a spec or a TOML path) gives the ``[inner]``, ``[meta]``,
``[evaluate]`` and rule tables; its family is not used. The export stores the spec with
``family = {"name": "external", "source": "custom", ...}`` (the names of your functions), a
record: ``metascale evaluate FILE`` without ``--spec`` cannot draw such tasks; evaluate from
Python with the same spec. :func:`metascale.evaluate.evaluate` pickles the spec (also with one
job): define ``model``, ``data`` and ``loss`` at module level, as for a ``DataLoader``'s workers.

For a family with a ``[family]`` table of its own, configurable from TOML and the command line,
write a family class and name it by import path in the spec (``[family] name =
"package.module:Name"``; docs/user-guide.md section 4).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..spec import EXTERNAL, Spec, load_spec, spec_from_dict
from ..tasks.base import Task, TaskSampler

KINDS = ("regression", "classification")


def _name(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


@dataclasses.dataclass
class CustomTask(Task):
    """A :class:`~metascale.tasks.base.Task` whose true loss is the user's ``loss_fn`` (the
    task kind's loss when ``None``)."""

    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return super().loss(pred, target) if self.loss_fn is None else self.loss_fn(pred, target)


@dataclasses.dataclass(frozen=True)
class CustomSource:
    """The user's functions behind a :class:`CustomSpec` (not stored in exports; their names are)."""

    model: Callable[[], nn.Module]
    data: Callable[[torch.Generator, str], tuple]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    kind: str = "regression"


class CustomFamily:
    """The :class:`~metascale.tasks.base.TaskFamily` of a :class:`CustomSource`: the
    configuration of a draw is its split; the data are ``source.data(g, split)``."""

    def __init__(self, source: CustomSource, name: str):
        self.source, self.name = source, name

    def sample(self, g: torch.Generator, split: str) -> dict:
        return {"source": "custom", "split": split}

    def build(self, config: dict, g: torch.Generator, batch_size: int) -> dict:
        out = self.source.data(g, config["split"])
        if not (isinstance(out, (tuple, list)) and len(out) == 4 and all(isinstance(t, torch.Tensor) for t in out)):
            raise TypeError(f"{_name(self.source.data)} must return (x_train, y_train, x_val, y_val) tensors")
        x_tr, y_tr, x_va, y_va = out
        if x_tr.shape[0] != y_tr.shape[0] or x_va.shape[0] != y_va.shape[0] or x_tr.shape[0] == 0:
            raise ValueError(f"{_name(self.source.data)}: inputs and targets must have the same number of rows "
                             f"(and at least one training row), got {x_tr.shape[0]}/{y_tr.shape[0]} and "
                             f"{x_va.shape[0]}/{y_va.shape[0]}")
        return {"kind": self.source.kind, "x_train": x_tr, "y_train": y_tr, "x_val": x_va, "y_val": y_va,
                "build_model": self.source.model}


class CustomSampler(TaskSampler):
    """:class:`~metascale.tasks.base.TaskSampler` over a :class:`CustomFamily`, drawing
    :class:`CustomTask` objects (the user's loss attached)."""

    def task(self, index: int) -> CustomTask:
        t = super().task(index)
        return CustomTask(**{f.name: getattr(t, f.name) for f in dataclasses.fields(Task)},
                          loss_fn=self.family.source.loss)


@dataclasses.dataclass(frozen=True)
class CustomSpec(Spec):
    """A :class:`~metascale.spec.Spec` whose tasks come from the user's functions
    (:func:`custom_spec`); its tables mean what they mean in a TOML spec."""

    source: CustomSource | None = dataclasses.field(default=None, compare=False)

    def make_family(self) -> CustomFamily:
        if self.source is None:
            raise ValueError(f"spec {self.name!r} has no source of tasks (restored from an export?): build it "
                             "again with metascale.custom_spec")
        return CustomFamily(self.source, self.name)

    def sampler(self, split: str, seed: int) -> CustomSampler:
        return CustomSampler(self.make_family(), split, seed, self.inner.batch_size)


def custom_spec(model: Callable[[], nn.Module], data: Callable[[torch.Generator, str], tuple], *,
                loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None, kind: str = "regression",
                base: Spec | str | Path | None = None, name: str = "custom", description: str = "") -> CustomSpec:
    """A spec over your own model, data and loss (see the module doc).

    Args:
        model: returns the (uninitialised) model; each inner run gets a seeded fresh init.
        data: ``data(g, split) -> (x_train, y_train, x_val, y_val)``, drawing only from ``g``.
        loss: ``loss(pred, target)``, a scalar; ``None``: MSE (regression) or cross-entropy.
        kind: ``"regression"`` or ``"classification"``.
        base: spec (or TOML path) whose ``inner``/``meta``/``evaluate``/rule tables are used;
            ``None``: every table's defaults.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    for what, fn in (("model", model), ("data", data)):
        if not callable(fn):
            raise TypeError(f"{what} must be callable")
    if loss is not None and not callable(loss):
        raise TypeError("loss must be callable or None")
    if base is None:
        base = spec_from_dict({"family": {"name": EXTERNAL}}, name, "custom spec")
    elif not isinstance(base, Spec):
        base = load_spec(base)
    record = {"source": "custom", "kind": kind, "model": _name(model), "data": _name(data),
              "loss": None if loss is None else _name(loss)}
    tables = {f.name: getattr(base, f.name) for f in dataclasses.fields(Spec)}
    tables.update(name=name, description=description or f"custom tasks: {record['data']}", family_name=EXTERNAL,
                  family=record, path=None)
    spec = CustomSpec(**tables, source=CustomSource(model, data, loss, kind))
    spec.sampler("train", 0).task(0)  # fail now on a data function that returns the wrong thing
    return spec
