"""Noisy quadratics with sampled conditioning, as linear least squares.

A task draws a condition number ``kappa`` (log-uniform) and a noise level ``s`` (uniform).
Inputs have covariance ``Sigma = Q diag(lambda) Q^T`` with eigenvalues log-spaced from 1 down
to ``1/kappa``,

    lambda_i = kappa^(-i / (dim - 1)),   i = 0, ..., dim - 1,

and ``Q`` a random orthogonal matrix; targets are ``y = x^T w* + s * eps`` with
``w* ~ N(0, I/dim)`` and ``eps ~ N(0, 1)``. The model is ``Linear(dim, 1, bias=False)``, so the
expected loss ``(w - w*)^T Sigma (w - w*) + s^2`` is a quadratic whose Hessian ``2 Sigma`` has
condition number ``kappa``.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..config import check
from .base import log_uniform, uniform


@dataclasses.dataclass(frozen=True)
class QuadraticConfig:
    """Dimension and ranges of the quadratic family."""

    dim: int = dataclasses.field(default=20, metadata=check("int", 1, 4096))
    condition: tuple = dataclasses.field(default=(1.0, 1000.0), metadata=check("interval", 1.0, 1e8))
    noise_std: tuple = dataclasses.field(default=(0.0, 0.5), metadata=check("interval", 0.0, 100.0))
    n_train: int = dataclasses.field(default=100, metadata=check("int", 1, 100_000))
    n_val: int = dataclasses.field(default=200, metadata=check("int", 1, 100_000))


def random_orthogonal(n: int, g: torch.Generator) -> torch.Tensor:
    """A Haar-random ``n x n`` orthogonal matrix (float64): ``Q`` of ``QR = A``, ``A`` Gaussian,
    with columns multiplied by ``sign(diag(R))`` so that the factorisation is unique."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    sign = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(torch.float64)
    return q * sign


def eigenvalues(dim: int, kappa: float) -> torch.Tensor:
    """``lambda_i = kappa^(-i/(dim-1))``: log-spaced from 1 to ``1/kappa`` (``[1]`` if dim is 1)."""
    if dim == 1:
        return torch.ones(1, dtype=torch.float64)
    return torch.tensor(float(kappa), dtype=torch.float64) ** -torch.linspace(0, 1, dim, dtype=torch.float64)


class QuadraticFamily:
    """Least-squares regression with input covariance of sampled condition number."""

    name = "quadratic"
    description = "noisy quadratics (linear least squares) with sampled condition number"

    def __init__(self, cfg: QuadraticConfig):
        self.cfg = cfg

    def sample(self, g: torch.Generator, split: str) -> dict:
        """``condition`` log-uniform in its range, ``noise_std`` uniform in its range."""
        return {"condition": log_uniform(g, *self.cfg.condition), "noise_std": uniform(g, *self.cfg.noise_std)}

    def build(self, config: dict, g: torch.Generator, batch_size: int) -> dict:
        """Rows ``x = z diag(sqrt(lambda)) Q^T`` (``z ~ N(0, I)``, so ``Cov x = Sigma``) and
        ``y = x w* + s eps``; data in float32."""
        c = self.cfg
        q = random_orthogonal(c.dim, g)
        root = q * eigenvalues(c.dim, config["condition"]).sqrt()  # Q diag(sqrt(lambda))
        w_star = torch.randn(c.dim, 1, generator=g, dtype=torch.float64) / c.dim ** 0.5

        def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            x = torch.randn(n, c.dim, generator=g, dtype=torch.float64) @ root.T
            y = x @ w_star + config["noise_std"] * torch.randn(n, 1, generator=g, dtype=torch.float64)
            return x.float(), y.float()

        x_tr, y_tr = draw(c.n_train)
        x_va, y_va = draw(c.n_val)
        dim = c.dim
        return dict(kind="regression", x_train=x_tr, y_train=y_tr, x_val=x_va, y_val=y_va,
                    build_model=lambda: nn.Sequential(nn.Linear(dim, 1, bias=False)))
