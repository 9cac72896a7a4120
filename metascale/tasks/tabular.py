"""Tabular classification on scikit-learn's bundled data sets (offline): iris (150 rows, 4
features, 3 classes), wine (178, 13, 3), breast_cancer (569, 30, 2), digits (1,797, 64, 10).

A draw picks one of the configured data sets; its rows are split between meta-train and
meta-test draws as :mod:`metascale.tasks.realdata` describes, and the draw's half is
permuted by its ``data_seed``: the last ``round(val_fraction * n)`` rows are the validation
set, the rest the training pool. Features are standardised with the training pool's mean and
standard deviation (``(x - mu) / sd``, ``sd`` of 0 taken as 1), the same ``mu, sd`` applied to
the validation set. Models: MLP or residual MLP (:func:`metascale.tasks.nets.classifier`).

Needs scikit-learn (the ``data`` extra: ``pip install -e '.[data]'`` in the repository, or ``bash scripts/setup.sh``), imported only when data is needed.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from ..config import check
from .base import ACTIVATIONS, randint
from . import reparam
from .nets import classifier
from .realdata import _ints, draw_rows, integer_ranges, require, split_rows

DATASETS = ("iris", "wine", "breast_cancer", "digits")
_SALT = {"iris": 0x1415, "wine": 0x3173, "breast_cancer": 0xB7CA, "digits": 0xD167}


@dataclasses.dataclass(frozen=True)
class TabularConfig:
    """Tabular family.

    Attributes:
        datasets: scikit-learn data sets to draw from.
        models: ``mlp`` and/or ``resmlp``.
        width, depth: hidden width and hidden layers (MLP) / residual blocks.
        activation: nonlinearity.
        val_fraction: share of the draw's half that is held out for validation.
        reparam: ``[lo, hi]`` of ``log10 c`` for the weight reparameterisation
            augmentation (:mod:`metascale.tasks.reparam`); ``[0, 0]``: none.
    """

    datasets: tuple = dataclasses.field(default=DATASETS, metadata=check("str_list", choices=DATASETS))
    models: tuple = dataclasses.field(default=("mlp",), metadata=check("str_list", choices=("mlp", "resmlp")))
    width: tuple = dataclasses.field(default=(16, 64), metadata=check("interval", 1, 4096))
    depth: tuple = dataclasses.field(default=(1, 2), metadata=check("interval", 1, 64))
    activation: str = dataclasses.field(default="relu", metadata=check("str", choices=tuple(ACTIVATIONS)))
    val_fraction: float = dataclasses.field(default=0.3, metadata=check("float", 0.05, 0.95))
    reparam: tuple = dataclasses.field(default=(0.0, 0.0), metadata=check("interval", -3.0, 3.0))

    def validate(self) -> None:
        """Integer ranges must hold integers."""
        integer_ranges(self, ("width", "depth"))


@functools.lru_cache(maxsize=None)
def load(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Data set ``name`` as ``(x, y)``: raw features float64 ``(n, d)``, labels long ``(n,)``.

    Raises:
        MissingExtraError: scikit-learn is not installed.
    """
    datasets = require("sklearn.datasets", "tabular")
    d = getattr(datasets, f"load_{name}")()
    return torch.tensor(d.data, dtype=torch.float64), torch.tensor(d.target, dtype=torch.long)


class TabularFamily:
    """Classification of a scikit-learn data set with a sampled MLP."""

    name = "tabular"
    description = "scikit-learn's bundled tables (iris, wine, breast_cancer, digits), standardised, MLP"

    def __init__(self, cfg: TabularConfig):
        self.cfg = cfg

    def sample(self, g: torch.Generator, split: str) -> dict:
        """Split, data set, model, width, depth and data seed."""
        c = self.cfg
        return {"split": split, "dataset": c.datasets[randint(g, 0, len(c.datasets) - 1)],
                "model": c.models[randint(g, 0, len(c.models) - 1)], "width": randint(g, *_ints(c.width)),
                "depth": randint(g, *_ints(c.depth)), "data_seed": randint(g, 0, 2**31 - 1),
                **reparam.sample_seed(c.reparam, g)}

    def build(self, config: dict, g: torch.Generator, batch_size: int) -> dict:
        """Standardised features of the draw's rows; labels as the data set gives them."""
        name = config["dataset"]
        x, y = load(name)
        rows = split_rows(x.shape[0], _SALT[name])[config["split"]].numel()
        n_val = round(self.cfg.val_fraction * rows)
        tr, va = draw_rows(x.shape[0], _SALT[name], config["split"], config["data_seed"], rows - n_val, n_val)
        mu, sd = x[tr].mean(0), x[tr].std(0, correction=0)
        sd = torch.where(sd > 0, sd, torch.ones_like(sd))
        xs = ((x - mu) / sd).float()
        n_classes = int(y.max()) + 1
        build, hook = reparam.wrap(lambda: classifier(config["model"], (x.shape[1],), n_classes, config["width"],
                                                      config["depth"], self.cfg.activation),
                                   self.cfg.reparam, config.get("reparam_seed"))
        return dict(kind="classification", x_train=xs[tr], y_train=y[tr], x_val=xs[va], y_val=y[va],
                    build_model=build, init_hook=hook)
