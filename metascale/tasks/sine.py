"""Sine-wave regression, the MAML protocol (Finn et al. 2017).

A task is ``y = A sin(x - phi)`` with amplitude ``A ~ U[0.1, 5]``, phase ``phi ~ U[0, pi]``
and inputs ``x ~ U[-5, 5]``; the model is an MLP 1-40-40-1 with ReLU. Training pool and
validation set are independent draws of ``x``.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..config import check
from .base import mlp, uniform


@dataclasses.dataclass(frozen=True)
class SineConfig:
    """Ranges of the sine family (the MAML protocol by default)."""

    amplitude: tuple = dataclasses.field(default=(0.1, 5.0), metadata=check("interval", 1e-3, 100.0))
    phase: tuple = dataclasses.field(default=(0.0, math.pi), metadata=check("interval", -10.0, 10.0))
    x_range: tuple = dataclasses.field(default=(-5.0, 5.0), metadata=check("interval", -100.0, 100.0))
    n_train: int = dataclasses.field(default=10, metadata=check("int", 1, 100_000))
    n_val: int = dataclasses.field(default=100, metadata=check("int", 1, 100_000))
    hidden: tuple = dataclasses.field(default=(40, 40), metadata=check("int_list", 1, 4096))
    activation: str = dataclasses.field(default="relu", metadata=check("str", choices=("relu", "tanh", "gelu", "elu", "sigmoid")))


class SineFamily:
    """Sine-wave regression tasks; ``description`` is shown by ``metascale tasks``."""

    name = "sine"
    description = "sine-wave regression (MAML protocol), MLP student"

    def __init__(self, cfg: SineConfig):
        self.cfg = cfg

    def sample(self, g: torch.Generator, split: str) -> dict:
        """``{"amplitude": A, "phase": phi}`` drawn uniformly from the configured ranges."""
        return {"amplitude": uniform(g, *self.cfg.amplitude), "phase": uniform(g, *self.cfg.phase)}

    def build(self, config: dict, g: torch.Generator, batch_size: int) -> dict:
        """Inputs ``x ~ U[x_range]``, targets ``A sin(x - phi)``; MLP ``1-hidden-1``."""
        lo, hi = self.cfg.x_range
        a, phi = config["amplitude"], config["phase"]

        def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            x = lo + (hi - lo) * torch.rand(n, 1, generator=g)
            return x, a * torch.sin(x - phi)

        x_tr, y_tr = draw(self.cfg.n_train)
        x_va, y_va = draw(self.cfg.n_val)
        sizes = (1, *self.cfg.hidden, 1)
        act = self.cfg.activation
        return dict(kind="regression", x_train=x_tr, y_train=y_tr, x_val=x_va, y_val=y_va,
                    build_model=lambda: mlp(sizes, act))
