r"""Learnable losses: an ML3-style loss network and a learned adaptive loss scale.

Both start as the task's own loss *exactly* (their last layer is zero-initialised) and are
meta-trained through the inner loop; the meta-objective is always the task's true loss on
validation data, never the learned loss.

* :class:`ML3Loss` (Bechtle et al., "Meta-Learning via Learned Loss"):

  .. math:: \ell_\phi(\hat y, y, \tau) = \ell_{\text{task}}(\hat y, y) + \sigma^2 \operatorname{mean}_i\, h_\phi(u_i)

  with ``h_phi`` a small MLP (tanh hidden layer, zero-initialised output) applied to
  per-element features ``u_i``: for regression ``(y_hat/sigma, y/sigma, (y_hat - y)/sigma, tau)``
  per output; for classification ``(log softmax_c, onehot_c, tau)`` per sample and class (any
  number of classes), summed over classes (``sigma = 1``). ``tau = t / K`` is the fraction of
  the inner run done.
* :class:`AdaptiveScaleLoss`, the bridge to loss scaling:

  .. math:: \ell_\phi = L\,\exp\big(f_\phi(\log (L/\sigma^2), \tau)\big), \qquad L = \ell_{\text{task}}(\hat y, y)

  Because the factor depends on the parameters only through the scalar ``L``, its gradient is
  the task gradient times a scalar,
  :math:`\nabla \ell_\phi = e^{f}\,(1 + \partial f/\partial \log L)\,\nabla L`: a learned
  step size that adapts to the loss value and the progress of training (no stop-gradient, so
  meta-gradients through the loss value are exact).

``sigma`` (``LossConfig.scale_free``, the default) is the root mean square of the batch's
regression targets, without gradient: the network sees predictions, targets and the loss in
units of the targets' own scale, so a loss meta-trained on targets of one size reads the same
inputs on targets of any other size, and the whole loss scales by ``c^2`` when targets and
predictions are measured in units ``1/c`` (as MSE does; tested). With ``scale_free = False``
(``sigma = 1``; files written before the option) the network sees raw values.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..config import check

KINDS = ("ml3", "adaptive_scale")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The ``[loss]`` table: which learned loss, its hidden width, whether it sees ``t/K``, and
    whether regression inputs are measured in units of the targets' scale (module doc)."""

    kind: str = dataclasses.field(default="ml3", metadata=check("str", choices=KINDS))
    hidden: int = dataclasses.field(default=32, metadata=check("int", 1, 4096))
    step_fraction: bool = dataclasses.field(default=True, metadata=check("bool"))
    scale_free: bool = dataclasses.field(default=True, metadata=check("bool"))


def _target_scale(target: torch.Tensor) -> torch.Tensor:
    """``sigma = sqrt(mean(y^2))`` of the batch's regression targets (no gradient; floored)."""
    return target.detach().pow(2).mean().sqrt().clamp_min(1e-6)


def _base(task_kind: str, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if task_kind == "regression":
        return (pred - target).pow(2).mean()
    return nn.functional.cross_entropy(pred, target)


def _head(n_in: int, hidden: int) -> nn.Sequential:
    """``Linear(n_in, hidden) -> tanh -> Linear(hidden, 1)`` with a zero output layer."""
    net = nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, 1))
    nn.init.zeros_(net[2].weight)
    nn.init.zeros_(net[2].bias)
    return net


def _init_hidden_(net: nn.Sequential, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = net[0].weight
        w.copy_(torch.randn(w.shape, generator=g) / w.shape[1] ** 0.5)
        net[0].bias.zero_()


class ML3Loss(nn.Module):
    """ML3-style learned loss for a ``"regression"`` or ``"classification"`` task (module doc)."""

    def __init__(self, task_kind: str, config: LossConfig = LossConfig(), seed: int = 0):
        super().__init__()
        if task_kind not in ("regression", "classification"):
            raise ValueError(f"task_kind must be 'regression' or 'classification', got {task_kind!r}")
        self.task_kind, self.config = task_kind, config
        n_in = (3 if task_kind == "regression" else 2) + int(config.step_fraction)
        self.net = _head(n_in, config.hidden)
        _init_hidden_(self.net, seed)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, step_fraction: float = 0.0) -> torch.Tensor:
        """The learned loss of a batch (a scalar)."""
        base = _base(self.task_kind, pred, target)
        if self.task_kind == "regression":
            sigma = _target_scale(target) if self.config.scale_free else None
            u, v = (pred, target) if sigma is None else (pred / sigma, target / sigma)
            feats = [u, v.expand_as(u), u - v]
        else:
            logp = torch.log_softmax(pred, dim=-1)
            onehot = nn.functional.one_hot(target, pred.shape[-1]).to(pred.dtype)
            feats = [logp, onehot]
        if self.config.step_fraction:
            feats.append(torch.full_like(pred, float(step_fraction)))
        h = self.net(torch.stack(feats, dim=-1)).squeeze(-1)
        residual = h.mean() if self.task_kind == "regression" else h.sum(-1).mean()
        if self.task_kind == "regression" and self.config.scale_free:
            residual = sigma.pow(2) * residual
        return base + residual


class AdaptiveScaleLoss(nn.Module):
    """Task loss times a learned factor ``exp(f(log loss, t/K))`` (module doc)."""

    def __init__(self, task_kind: str, config: LossConfig = LossConfig(kind="adaptive_scale"), seed: int = 0):
        super().__init__()
        if task_kind not in ("regression", "classification"):
            raise ValueError(f"task_kind must be 'regression' or 'classification', got {task_kind!r}")
        self.task_kind, self.config = task_kind, config
        self.net = _head(1 + int(config.step_fraction), config.hidden)
        _init_hidden_(self.net, seed)

    def log_scale(self, loss_value: torch.Tensor, step_fraction: float = 0.0) -> torch.Tensor:
        """``f(log loss, t/K)``: the log of the factor applied to the task loss."""
        x = [torch.log(loss_value.clamp_min(1e-12)).reshape(1)]
        if self.config.step_fraction:
            x.append(torch.full_like(x[0], float(step_fraction)))
        return self.net(torch.cat(x)).squeeze(-1)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, step_fraction: float = 0.0) -> torch.Tensor:
        """The scaled loss of a batch (a scalar)."""
        base = _base(self.task_kind, pred, target)
        seen = base / _target_scale(target).pow(2) if self.task_kind == "regression" and self.config.scale_free else base
        return base * torch.exp(self.log_scale(seen, step_fraction))


def make_loss(task_kind: str, config: LossConfig, seed: int = 0) -> nn.Module:
    """The learned loss named by ``config.kind`` for a task of ``task_kind``."""
    cls = ML3Loss if config.kind == "ml3" else AdaptiveScaleLoss
    return cls(task_kind, config, seed)
