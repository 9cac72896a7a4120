r"""What the real-data families (MNIST, MNIST-1D, tabular, character LM) share: the row split
between meta-train and meta-test draws, the classifier config fields, and the draw of one
task's training pool and validation set.

**Split.** Row ``i`` of a data set belongs to the meta-train half iff
``mix_seed(i, salt) % 2 == 0``, else to the meta-test half (``salt`` per data set). A
``"train"`` draw takes its training pool *and* its validation set from the meta-train half, a
``"test"`` draw from the meta-test half, so no example a meta-test task trains or validates on
is ever seen by a meta-train task. Every config records its split, so train and test draws
never share a config.

**A draw.** ``data_seed`` (sampled, in the config) permutes the split's rows; the first
``n_train`` form the training pool and the next ``n_val`` the validation set. With
``n_train_min > 0`` the pool size is itself drawn per task, log-uniformly,

.. math::

    n = \operatorname{round}\big(\exp u\big), \qquad u \sim U[\log n_{\min}, \log n_{\mathrm{train}}],

and recorded in the config (``"n_train"``): a fixed number of steps is then more epochs on a
smaller pool, so one spec holds runs that overfit and runs that do not.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib

import torch

from ..config import check
from ..errors import MissingExtraError, install_hint
from .base import ACTIVATIONS, generator, log_uniform, mix_seed, randint
from . import reparam
from .nets import MODELS

EXTRA_HINT = install_hint("data")


def require(module: str, family: str):
    """Import ``module`` for ``family``, or raise :class:`MissingExtraError` naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(f"the {family} family needs the {module.split('.')[0]!r} package: "
                                f"{EXTRA_HINT}") from None


@functools.lru_cache(maxsize=None)
def split_rows(n: int, salt: int) -> dict[str, torch.Tensor]:
    """Row indices ``{"train": ..., "test": ...}`` of an ``n``-row data set (module doc)."""
    side = torch.tensor([mix_seed(i, salt) % 2 for i in range(n)])
    return {"train": torch.nonzero(side == 0).flatten(), "test": torch.nonzero(side == 1).flatten()}


def draw_rows(n: int, salt: int, split: str, data_seed: int, n_train: int, n_val: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train_rows, val_rows)`` of one draw: the split's rows permuted by ``data_seed``,
    first ``n_train`` then the next ``n_val``. Raises ``ValueError`` if they do not fit."""
    rows = split_rows(n, salt)[split]
    if n_train + n_val > rows.numel():
        raise ValueError(f"n_train + n_val = {n_train + n_val} exceeds the {rows.numel()} rows of the {split} half")
    perm = rows[torch.randperm(rows.numel(), generator=generator(data_seed))]
    return perm[:n_train], perm[n_train:n_train + n_val]


def _ints(pair) -> tuple[int, int]:
    return int(pair[0]), int(pair[1])


def integer_ranges(config, keys) -> None:
    """Raise ``ValueError`` unless each ``[lo, hi]`` field in ``keys`` holds integers."""
    for key in keys:
        lo, hi = getattr(config, key)
        if lo != int(lo) or hi != int(hi):
            raise ValueError(f"{key} = {[lo, hi]} is not allowed; expected a pair of integers")


@dataclasses.dataclass(frozen=True)
class ClassifierFields:
    """Fields every real-data classification family shares.

    Attributes:
        models: architectures to sample from (:func:`metascale.tasks.nets.classifier`).
        width: hidden width (MLP), residual width, first-layer channels (CNN) or GRU units.
        depth: hidden layers (MLP), residual blocks, convolutions or stacked GRU layers.
        activation: nonlinearity (not used by the GRU).
        n_train, n_val: training-pool and validation-set sizes of one draw.
        n_train_min: 0 (default): every draw's pool has ``n_train`` examples; otherwise each
            draw's pool size is drawn log-uniformly in ``[n_train_min, n_train]`` (module doc).
        reparam: ``[lo, hi]`` of ``log10 c`` for the weight reparameterisation
            augmentation (:mod:`metascale.tasks.reparam`); ``[0, 0]``: none.
    """

    models: tuple = dataclasses.field(default=("mlp",), metadata=check("str_list", choices=MODELS))
    width: tuple = dataclasses.field(default=(32, 64), metadata=check("interval", 1, 4096))
    depth: tuple = dataclasses.field(default=(1, 2), metadata=check("interval", 1, 64))
    activation: str = dataclasses.field(default="relu", metadata=check("str", choices=tuple(ACTIVATIONS)))
    n_train: int = dataclasses.field(default=1000, metadata=check("int", 1, 100_000))
    n_val: int = dataclasses.field(default=500, metadata=check("int", 1, 100_000))
    n_train_min: int = dataclasses.field(default=0, metadata=check("int", 0, 100_000))
    reparam: tuple = dataclasses.field(default=(0.0, 0.0), metadata=check("interval", -3.0, 3.0))

    def validate(self) -> None:
        """Integer ranges must hold integers; ``n_train_min`` at most ``n_train``."""
        integer_ranges(self, ("width", "depth"))
        if self.n_train_min > self.n_train:
            raise ValueError(f"n_train_min = {self.n_train_min} is not allowed; expected at most n_train = "
                             f"{self.n_train} (0: every draw uses n_train examples)")


def sample_classifier(cfg: ClassifierFields, g: torch.Generator, split: str) -> dict:
    """The shared part of a classification config: split, model, width, depth, data seed (and
    the reparameterisation seed when ``cfg.reparam`` is not ``[0, 0]``, and the pool size
    ``n_train`` when ``cfg.n_train_min > 0``, drawn last so that specs without it draw as
    before)."""
    model = cfg.models[randint(g, 0, len(cfg.models) - 1)]
    config = {"split": split, "model": model, "width": randint(g, *_ints(cfg.width)),
              "depth": randint(g, *_ints(cfg.depth)), "data_seed": randint(g, 0, 2**31 - 1),
              **reparam.sample_seed(cfg.reparam, g)}
    if cfg.n_train_min > 0:
        config["n_train"] = int(round(log_uniform(g, cfg.n_train_min, cfg.n_train)))
    return config


def pool_rows(cfg: ClassifierFields, config: dict, n: int, salt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`draw_rows` for a sampled config: its own ``n_train`` when it has one (drawn,
    ``n_train_min > 0``), the spec's otherwise."""
    return draw_rows(n, salt, config["split"], config["data_seed"], config.get("n_train", cfg.n_train), cfg.n_val)
