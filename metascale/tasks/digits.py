"""Few-shot classification on scikit-learn's bundled 8x8 handwritten digits (offline).

A task is an ``n_ways``-class problem on a subset of the ten digits. Class subsets are
partitioned between meta-train and meta-test: subset ``S`` (in ``itertools.combinations``
order) is test-only when ``mix_seed(*S, 0xD1617) % 5 == 0`` (about 20% of subsets), so
meta-test tasks are always on class combinations never seen in meta-training. Within a task,
``n_train_per_class`` and ``n_val_per_class`` disjoint images are drawn per class; labels are
the positions of the digits in the subset (``0 .. n_ways-1``). Features are pixels / 16
(float32, in [0, 1]); the model is an MLP ``64-hidden-n_ways``.

Needs scikit-learn (the ``digits`` extra: ``pip install -e '.[digits]'`` in the repository, or ``bash scripts/setup.sh``), imported only when data is needed.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools

import torch

from ..config import check
from ..errors import MissingExtraError, install_hint
from .base import ACTIVATIONS, mix_seed, mlp, randint

N_DIGITS = 10
MIN_CLASS_SIZE = 174  # images of the rarest digit (8) in sklearn's digits data set
_SPLIT_SALT = 0xD1617


@dataclasses.dataclass(frozen=True)
class DigitsConfig:
    """Task shape of the digits family."""

    n_ways: int = dataclasses.field(default=5, metadata=check("int", 2, 9))
    n_train_per_class: int = dataclasses.field(default=10, metadata=check("int", 1, MIN_CLASS_SIZE - 1))
    n_val_per_class: int = dataclasses.field(default=20, metadata=check("int", 1, MIN_CLASS_SIZE - 1))
    hidden: tuple = dataclasses.field(default=(32,), metadata=check("int_list", 1, 4096))
    activation: str = dataclasses.field(default="relu", metadata=check("str", choices=tuple(ACTIVATIONS)))

    def validate(self) -> None:
        """Train and validation images per class must fit in the rarest class."""
        if self.n_train_per_class + self.n_val_per_class > MIN_CLASS_SIZE:
            raise ValueError(f"n_train_per_class + n_val_per_class = "
                             f"{self.n_train_per_class + self.n_val_per_class} is not allowed; "
                             f"expected at most {MIN_CLASS_SIZE} (images of the rarest digit)")


@functools.lru_cache(maxsize=1)
def load() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 digits as ``(x, y)``: ``x`` float32 ``(1797, 64)`` = pixels / 16, ``y`` long.

    Raises:
        MissingExtraError: scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise MissingExtraError(f"the digits family needs scikit-learn: {install_hint('digits')}") from None
    data = load_digits()
    return torch.tensor(data.data / 16.0, dtype=torch.float32), torch.tensor(data.target, dtype=torch.long)


@functools.lru_cache(maxsize=None)
def class_subsets(n_ways: int) -> dict[str, tuple[tuple[int, ...], ...]]:
    """All ``C(10, n_ways)`` class subsets (lexicographic), partitioned into ``"train"`` and
    ``"test"``.

    ``S`` is a test subset iff ``mix_seed(*S, 0xD1617) % 5 == 0``. Should that leave a split
    empty, the subsets are ranked by that hash and the lowest ``max(1, C // 5)`` go to test.
    """
    subsets = list(itertools.combinations(range(N_DIGITS), n_ways))
    key = {s: mix_seed(*s, _SPLIT_SALT) for s in subsets}
    test = {s for s in subsets if key[s] % 5 == 0}
    if not test or len(test) == len(subsets):
        test = set(sorted(subsets, key=key.__getitem__)[: max(1, len(subsets) // 5)])
    return {"train": tuple(s for s in subsets if s not in test), "test": tuple(s for s in subsets if s in test)}


class DigitsFamily:
    """``n_ways``-class few-shot tasks on 8x8 digits, with disjoint meta-train/test subsets."""

    name = "digits"
    description = "8x8 handwritten digits (scikit-learn), n-way class subsets split train/test, MLP"

    def __init__(self, cfg: DigitsConfig):
        self.cfg = cfg

    def sample(self, g: torch.Generator, split: str) -> dict:
        """A class subset uniform among ``split``'s subsets, then per class (in subset order)
        a random permutation of its images: the first ``n_train_per_class`` go to
        ``train_images`` and the next ``n_val_per_class`` to ``val_images`` (data-set indices)."""
        c = self.cfg
        subsets = class_subsets(c.n_ways)[split]
        classes = subsets[randint(g, 0, len(subsets) - 1)]
        _, y = load()
        train, val = [], []
        for digit in classes:
            idx = torch.nonzero(y == digit).flatten()
            idx = idx[torch.randperm(idx.numel(), generator=g)]
            train += idx[: c.n_train_per_class].tolist()
            val += idx[c.n_train_per_class: c.n_train_per_class + c.n_val_per_class].tolist()
        return {"classes": list(classes), "train_images": train, "val_images": val}

    def build(self, config: dict, g: torch.Generator, batch_size: int) -> dict:
        """Gather the chosen images; label ``i`` is digit ``classes[i]``."""
        x, y = load()
        relabel = torch.full((N_DIGITS,), -1, dtype=torch.long)
        relabel[torch.tensor(config["classes"])] = torch.arange(len(config["classes"]))
        tr, va = torch.tensor(config["train_images"]), torch.tensor(config["val_images"])
        sizes, act = (x.shape[1], *self.cfg.hidden, len(config["classes"])), self.cfg.activation
        return dict(kind="classification", x_train=x[tr], y_train=relabel[y[tr]], x_val=x[va],
                    y_val=relabel[y[va]], build_model=lambda: mlp(sizes, act))
