"""Teacher-student regression: a random teacher MLP labels Gaussian inputs.

Per task we sample the input dimension ``d``, the teacher's width ``w``, depth ``L`` (hidden
layers) and activation. The teacher ``f`` has weights and biases ``~ N(0, 1/fan_in)``; inputs
are ``x ~ N(0, I_d)``; targets are the teacher's outputs standardised with the *training
pool's* mean and std, plus noise:

    y = (f(x) - mu_train) / sigma_train + noise_std * eps,   eps ~ N(0, 1)

(the same ``mu_train, sigma_train`` are applied to the validation set). The student is an MLP
``d-student_hidden-1``.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ..config import check
from .base import ACTIVATIONS, generator, mlp, randint

_ACTS = tuple(ACTIVATIONS)


@dataclasses.dataclass(frozen=True)
class TeacherMLPConfig:
    """Ranges of the teacher-student family. Integer ranges are ``interval`` pairs of ints."""

    input_dim: tuple = dataclasses.field(default=(4, 16), metadata=check("interval", 1, 1024))
    teacher_width: tuple = dataclasses.field(default=(16, 64), metadata=check("interval", 1, 4096))
    teacher_depth: tuple = dataclasses.field(default=(1, 3), metadata=check("interval", 0, 8))
    activations: tuple = dataclasses.field(default=("relu", "tanh", "gelu"), metadata=check("str_list", choices=_ACTS))
    noise_std: float = dataclasses.field(default=0.1, metadata=check("float", 0.0, 10.0))
    n_train: int = dataclasses.field(default=64, metadata=check("int", 1, 100_000))
    n_val: int = dataclasses.field(default=256, metadata=check("int", 1, 100_000))
    student_hidden: tuple = dataclasses.field(default=(32, 32), metadata=check("int_list", 1, 4096))
    student_activation: str = dataclasses.field(default="relu", metadata=check("str", choices=_ACTS))

    def validate(self) -> None:
        """Integer ranges must hold integers (``[4, 16]``, not ``[4.5, 16]``)."""
        for key in ("input_dim", "teacher_width", "teacher_depth"):
            lo, hi = getattr(self, key)
            if lo != int(lo) or hi != int(hi):
                raise ValueError(f"{key} = {[lo, hi]} is not allowed; expected a pair of integers")


@torch.no_grad()
def _normal_init_(model: nn.Module, g: torch.Generator) -> nn.Module:
    """Set every parameter to ``N(0, 1/fan_in)`` from ``g``, in parameter order (a bias uses
    the fan-in of the matrix before it)."""
    fan_in = 1
    for p in model.parameters():
        if p.dim() >= 2:
            fan_in = p[0].numel()
        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) / math.sqrt(fan_in))
    return model


class TeacherMLPFamily:
    """Regression on the outputs of random teacher MLPs of sampled width, depth and activation."""

    name = "teacher_mlp"
    description = "random teacher MLP regression (sampled width/depth/activation), MLP student"

    def __init__(self, cfg: TeacherMLPConfig):
        self.cfg = cfg

    def sample(self, g: torch.Generator, split: str) -> dict:
        """``input_dim``, ``teacher_width``, ``teacher_depth`` uniform over their integer ranges,
        ``activation`` uniform over ``activations``, and a ``teacher_seed`` for the weights."""
        c = self.cfg
        return {
            "input_dim": randint(g, int(c.input_dim[0]), int(c.input_dim[1])),
            "teacher_width": randint(g, int(c.teacher_width[0]), int(c.teacher_width[1])),
            "teacher_depth": randint(g, int(c.teacher_depth[0]), int(c.teacher_depth[1])),
            "activation": c.activations[randint(g, 0, len(c.activations) - 1)],
            "teacher_seed": randint(g, 0, 2**62),
        }

    def teacher(self, config: dict) -> nn.Sequential:
        """The task's teacher (float64), rebuilt deterministically from ``teacher_seed``."""
        d, w, depth = config["input_dim"], config["teacher_width"], config["teacher_depth"]
        net = mlp((d, *[w] * depth, 1), config["activation"]).to(torch.float64)
        return _normal_init_(net, generator(config["teacher_seed"]))

    @torch.no_grad()
    def build(self, config: dict, g: torch.Generator, batch_size: int) -> dict:
        """Inputs ``x ~ N(0, I)``; targets standardised with training-pool statistics plus
        ``noise_std`` Gaussian noise (see the module docstring); data in float32."""
        c, d = self.cfg, config["input_dim"]
        f = self.teacher(config)
        x_tr = torch.randn(c.n_train, d, generator=g, dtype=torch.float64)
        x_va = torch.randn(c.n_val, d, generator=g, dtype=torch.float64)
        t_tr, t_va = f(x_tr), f(x_va)
        mu, sigma = t_tr.mean(), t_tr.std(correction=0).clamp_min(1e-8)

        def target(t: torch.Tensor) -> torch.Tensor:
            return (t - mu) / sigma + c.noise_std * torch.randn(t.shape, generator=g, dtype=torch.float64)

        y_tr, y_va = target(t_tr), target(t_va)
        sizes, act = (d, *c.student_hidden, 1), c.student_activation
        return dict(kind="regression", x_train=x_tr.float(), y_train=y_tr.float(),
                    x_val=x_va.float(), y_val=y_va.float(), build_model=lambda: mlp(sizes, act))
