"""Gaussian-mixture classification with a sampled number of classes, dimension and separation.

A task draws ``k`` classes, a dimension ``d`` and a separation ``s``. Class means are

    m_c = s * u_c / sqrt(2 d),   u_c ~ N(0, I_d),

so that ``E ||m_a - m_b||^2 = s^2``: ``s`` is the root-mean-square distance between two class
means, in units of the within-class standard deviation. Points are ``x = m_y + N(0, I_d)``
with balanced labels (``n // k`` or ``n // k + 1`` points per class), in shuffled order. The
model is an MLP ``d-hidden-k``.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..config import check
from .base import ACTIVATIONS, mlp, randint, uniform


@dataclasses.dataclass(frozen=True)
class GaussianMixtureConfig:
    """Ranges of the Gaussian-mixture family. Integer ranges are ``interval`` pairs of ints."""

    n_classes: tuple = dataclasses.field(default=(2, 5), metadata=check("interval", 2, 100))
    dim: tuple = dataclasses.field(default=(2, 16), metadata=check("interval", 1, 1024))
    separation: tuple = dataclasses.field(default=(1.0, 4.0), metadata=check("interval", 0.0, 100.0))
    n_train: int = dataclasses.field(default=100, metadata=check("int", 1, 100_000))
    n_val: int = dataclasses.field(default=200, metadata=check("int", 1, 100_000))
    hidden: tuple = dataclasses.field(default=(32,), metadata=check("int_list", 1, 4096))
    activation: str = dataclasses.field(default="relu", metadata=check("str", choices=tuple(ACTIVATIONS)))

    def validate(self) -> None:
        """Integer ranges must hold integers (``[2, 5]``, not ``[2.5, 5]``)."""
        for key in ("n_classes", "dim"):
            lo, hi = getattr(self, key)
            if lo != int(lo) or hi != int(hi):
                raise ValueError(f"{key} = {[lo, hi]} is not allowed; expected a pair of integers")


class GaussianMixtureFamily:
    """Classification of points drawn from isotropic Gaussians around random class means."""

    name = "gaussian_mixture"
    description = "Gaussian-mixture classification (sampled classes/dimension/separation), MLP"

    def __init__(self, cfg: GaussianMixtureConfig):
        self.cfg = cfg

    def sample(self, g: torch.Generator, split: str) -> dict:
        """``n_classes`` and ``dim`` uniform over their integer ranges, ``separation`` uniform."""
        c = self.cfg
        return {
            "n_classes": randint(g, int(c.n_classes[0]), int(c.n_classes[1])),
            "dim": randint(g, int(c.dim[0]), int(c.dim[1])),
            "separation": uniform(g, *c.separation),
        }

    def build(self, config: dict, g: torch.Generator, batch_size: int) -> dict:
        """Means ``m_c = s u_c / sqrt(2d)``; points ``m_y + N(0, I)``; labels balanced and
        shuffled; x float32, y long."""
        k, d = config["n_classes"], config["dim"]
        means = config["separation"] * torch.randn(k, d, generator=g, dtype=torch.float64) / math.sqrt(2 * d)

        def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            y = (torch.arange(n) % k)[torch.randperm(n, generator=g)]
            x = means[y] + torch.randn(n, d, generator=g, dtype=torch.float64)
            return x.float(), y

        x_tr, y_tr = draw(self.cfg.n_train)
        x_va, y_va = draw(self.cfg.n_val)
        sizes, act = (d, *self.cfg.hidden, k), self.cfg.activation
        return dict(kind="classification", x_train=x_tr, y_train=y_tr, x_val=x_va, y_val=y_va,
                    build_model=lambda: mlp(sizes, act))
