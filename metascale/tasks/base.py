"""Tasks, task families and the seeded sampler that draws them.

A *family* samples a task configuration from an explicit ``torch.Generator`` and builds a
:class:`Task` from it (learned_optimization's ``TaskFamily.sample(key) -> cfg``,
``task_fn(cfg) -> Task``). A :class:`TaskSampler` turns ``(family, split, seed, index)`` into
one task, the same on every machine: all randomness comes from CPU generators seeded by
:func:`mix_seed`, never from the global RNG.

Splits: draw ``i`` of split ``"train"`` and of split ``"test"`` use disjoint seed streams
(the split id enters the seed), and families with a discrete component (digits class
subsets) also partition that component, so meta-train and meta-test draws never overlap.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import nn

SPLITS = ("train", "test")
_MASK64 = (1 << 64) - 1


def mix_seed(*parts: int) -> int:
    """Mix integers into one 63-bit seed (splitmix64 finaliser applied per part).

    Deterministic across machines and Python versions (no ``hash()``), and distinct inputs
    give distinct streams with overwhelming probability.
    """
    z = 0x9E3779B97F4A7C15
    for p in parts:
        z = (z + (int(p) & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z ^= z >> 31
    return z & ((1 << 63) - 1)


def generator(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed``."""
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


def uniform(g: torch.Generator, lo: float, hi: float) -> float:
    """One draw from U[lo, hi] as a Python float."""
    return lo + (hi - lo) * torch.rand((), generator=g, dtype=torch.float64).item()


def log_uniform(g: torch.Generator, lo: float, hi: float) -> float:
    """One draw from a log-uniform distribution on [lo, hi] (lo > 0)."""
    return math.exp(uniform(g, math.log(lo), math.log(hi)))


def randint(g: torch.Generator, lo: int, hi: int) -> int:
    """One integer draw from {lo, ..., hi} (inclusive)."""
    return int(torch.randint(lo, hi + 1, (), generator=g).item())


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU, "elu": nn.ELU,
}


def mlp(sizes: Sequence[int], activation: str = "relu") -> nn.Sequential:
    """``Linear(sizes[0], sizes[1]) -> act -> ... -> Linear(sizes[-2], sizes[-1])``."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


@torch.no_grad()
def seeded_init_(model: nn.Module, g: torch.Generator) -> nn.Module:
    """Re-initialise every parameter of ``model`` from generator ``g``, in parameter order.

    Matrices (and higher-rank tensors) get PyTorch's default ``nn.Linear`` init,
    ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``; a vector following a matrix (its bias) uses that
    matrix's fan-in; a vector with no preceding matrix gets ``U(-1, 1)``. Names are never
    used. Buffers are untouched.
    """
    fan_in = None
    for p in model.parameters():
        if p.dim() >= 2:
            fan_in = p[0].numel()
        bound = 1.0 / math.sqrt(fan_in) if fan_in else 1.0
        p.copy_(torch.empty(p.shape, dtype=torch.float64).uniform_(-bound, bound, generator=g))
    return model


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error, ``mean((pred - target)^2)``."""
    return (pred - target).pow(2).mean()


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of integer class targets."""
    return nn.functional.cross_entropy(logits, target)


@dataclasses.dataclass
class Task:
    """One inner training problem: data, a model factory and the true loss.

    Attributes:
        family: family name (``"sine"``, ...).
        split: ``"train"`` (meta-train draw) or ``"test"`` (meta-test draw).
        index: draw index within the split.
        seed: the task's seed; model init and minibatch order derive from it.
        config: the sampled configuration (JSON-able).
        kind: ``"regression"`` (MSE, float targets), ``"classification"`` (cross-entropy,
            integer targets) or ``"sequence"`` (cross-entropy per position: logits
            ``(N, classes, positions)``, integer targets ``(N, positions)``).
        x_train, y_train: the training pool; :meth:`train_batch` samples from it.
        x_val, y_val: the validation set (disjoint from the training pool).
        build_model: returns the (uninitialised) architecture; :meth:`make_model` seeds it.
        batch_size: inner minibatch size (the whole pool when it is at least the pool size).
        init_hook: called (under ``torch.no_grad``) on the model right after the seeded init,
            e.g. to store a reparameterised weight as ``p / c``
            (:mod:`metascale.tasks.reparam`); ``None``: nothing.
    """

    family: str
    split: str
    index: int
    seed: int
    config: dict
    kind: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    build_model: Callable[[], nn.Module]
    batch_size: int
    init_hook: Callable[[nn.Module], None] | None = None

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The task's true loss: MSE for regression, cross-entropy otherwise."""
        return mse(pred, target) if self.kind == "regression" else cross_entropy(pred, target)

    def make_model(self, init_seed: int | None = None, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> nn.Module:
        """A freshly initialised model; the same ``init_seed`` gives the same weights.

        ``init_seed`` defaults to one derived from the task seed.
        """
        model = self.build_model()
        seeded_init_(model, generator(mix_seed(self.seed, 0xC0FFEE) if init_seed is None else init_seed))
        if self.init_hook is not None:
            with torch.no_grad():
                self.init_hook(model)
        return model.to(device=device, dtype=dtype or torch.get_default_dtype())

    def train_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The training minibatch for inner step ``step`` (deterministic in task seed and step)."""
        n = self.x_train.shape[0]
        if self.batch_size >= n:
            return self.x_train, self.y_train
        idx = torch.randperm(n, generator=generator(mix_seed(self.seed, 0xBA7C4, step)))[: self.batch_size]
        idx = idx.to(self.x_train.device)
        return self.x_train[idx], self.y_train[idx]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Task":
        """A copy with data on ``device``; float data cast to ``dtype`` (targets of
        classification tasks stay integer)."""
        def mv(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else None)
        return dataclasses.replace(self, x_train=mv(self.x_train), y_train=mv(self.y_train),
                                   x_val=mv(self.x_val), y_val=mv(self.y_val))


class TaskFamily(Protocol):
    """What a family provides. ``cfg`` is the family's dataclass config (from the spec)."""

    name: str

    def sample(self, g: torch.Generator, split: str) -> dict:
        """Sample a JSON-able task configuration for ``split`` from generator ``g``."""

    def build(self, config: dict, g: torch.Generator, batch_size: int) -> dict:
        """Build the task's data and model factory from ``config``; returns the keyword
        arguments of :class:`Task` other than family/split/index/seed/config/batch_size."""


_SPLIT_ID = {"train": 0x7A11, "test": 0x7E57}


class TaskSampler:
    """Draws tasks of one family and one split, reproducibly.

    ``TaskSampler(family, "train", seed=0, batch_size=10).task(i)`` is the same task on every
    machine. ``"train"`` and ``"test"`` samplers with the same seed never share a draw.
    """

    def __init__(self, family: TaskFamily, split: str, seed: int, batch_size: int):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.family, self.split, self.seed, self.batch_size = family, split, int(seed), int(batch_size)

    def task(self, index: int) -> Task:
        """Draw number ``index`` of this sampler."""
        seed = mix_seed(self.seed, _SPLIT_ID[self.split], index)
        g = generator(seed)
        config = self.family.sample(g, self.split)
        parts = self.family.build(config, g, self.batch_size)
        return Task(family=self.family.name, split=self.split, index=index, seed=seed,
                    config=config, batch_size=self.batch_size, **parts)

    def tasks(self, n: int, start: int = 0) -> list[Task]:
        """Draws ``start, ..., start + n - 1``."""
        return [self.task(i) for i in range(start, start + n)]
