r"""The adaptive rule over a sign-momentum direction (``--rule adaptive-sign``): the adaptive
rule's network (:mod:`metascale.optim.adaptive`) sets each layer's step size and rescaling
factor every step, and the step moves every coordinate by the same amount, in the direction of
the sign of its interpolated momentum, as Lion (Chen et al., 2023, "Symbolic Discovery of
Optimization Algorithms").

Per parameter of group ``g``, with gradient ``G``, one buffer ``b`` (``b_{-1} = 0``) and the
network's factors ``eta = eta_{g,t}``, ``s = s_{g,t}``:

.. math::

    c = \beta_1 b + (1-\beta_1) G, \qquad P \leftarrow P - \eta\, s\, \mathrm{sign}(c), \qquad
    b \leftarrow \beta_2 b + (1-\beta_2) G.

``sign(c)`` does not change when the loss is scaled, so the rescaling factor is folded into the
step size (as ``layerwise-adam`` folds ``1/s^2`` into Adam's second moment): ``eta * s`` is the
distance every coordinate moves. Untrained (the network at zero) the rule *is* Lion at
``lr = eta_0``, ``betas = (beta_1, beta_2)``; the frozen optimizer's decoupled weight decay,
``P <- P (1 - lr eta s wd)``, is Lion's.

Why a sign: it normalises every coordinate with one buffer of state (half of Adam's), so layers
whose coordinates have gradients of very different sizes (recurrent gates, embeddings, deep
stacks) take usable steps where a layer-wise heavy ball, normalised per layer, cannot.

Meta-gradients: ``sign`` has derivative zero, so backpropagation through the unroll carries
each step's direct effect on the parameters (``d/d eta``, ``d/d s``) and the loss's dependence
on later parameters, but not the buffer's effect on the direction. Evolution strategies see
the whole map.
"""
from __future__ import annotations

import dataclasses

import torch

from ..config import check
from .adaptive import AdaptiveConfig, AdaptiveRule, one_buffer_group
from .rule import GroupUpdate, GroupView

BUFFER = "momentum_buffer"


@dataclasses.dataclass(frozen=True)
class SignConfig(AdaptiveConfig):
    """Configuration of the sign-momentum adaptive rule (the ``[adaptive_sign]`` table): the
    adaptive rule's fields (:class:`~metascale.optim.adaptive.AdaptiveConfig`), with

    Attributes:
        init_lr: ``eta_0``, the distance every coordinate moves per step in the untrained rule
            (Lion's learning rate; a few times smaller than Adam's).
        momentum: ``beta_2``, the decay of the buffer.
        interpolation: ``beta_1``, the weight of the buffer against the gradient in the
            direction ``c``.
    """

    init_lr: float = dataclasses.field(default=3e-4, metadata=check("float", 1e-8, 100.0))
    momentum: float = dataclasses.field(default=0.99, metadata=check("float", 0.0, 0.999))
    interpolation: float = dataclasses.field(default=0.9, metadata=check("float", 0.0, 0.999))

    def validate(self) -> None:
        """Raise ``ValueError`` for inconsistent settings."""
        if self.nesterov:
            raise ValueError("nesterov does not apply to the sign rule: its direction already interpolates "
                             "buffer and gradient (interpolation = beta_1)")
        super().validate()


def sign_momentum(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor | None], *,
                  lr, beta1: float, beta2: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    r"""Out of place: ``(new_params, new_bufs)`` of the module doc's update at distance ``lr``
    (``eta * s``; a tensor carries gradients to it)."""
    new_p, new_b = [], []
    for p, g, b in zip(params, grads, bufs):
        c = (1 - beta1) * g if b is None else beta1 * b + (1 - beta1) * g
        new_p.append(p - lr * torch.sign(c))
        new_b.append((1 - beta2) * g if b is None else beta2 * b + (1 - beta2) * g)
    return new_p, new_b


def sign_momentum_(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor | None], *,
                   lr: float, beta1: float, beta2: float, foreach: bool = True) -> list[torch.Tensor]:
    """In place (parameters and buffers; new buffers created); returns the buffers. The foreach
    kernels when ``foreach``, a loop over tensors otherwise: the same arithmetic."""
    bufs = [torch.zeros_like(p) if b is None else b for p, b in zip(params, bufs)]
    if foreach:
        c = torch._foreach_mul(bufs, beta1)
        torch._foreach_add_(c, grads, alpha=1 - beta1)
        torch._foreach_sign_(c)
        torch._foreach_add_(params, c, alpha=-lr)
        torch._foreach_mul_(bufs, beta2)
        torch._foreach_add_(bufs, grads, alpha=1 - beta2)
    else:
        for p, g, b in zip(params, grads, bufs):
            p.add_(torch.mul(b, beta1).add_(g, alpha=1 - beta1).sign_(), alpha=-lr)
            b.mul_(beta2).add_(g, alpha=1 - beta2)
    return bufs


def sign_momentum_group(view: GroupView, step_size, scale, beta1: float, beta2: float,
                        inplace: bool) -> GroupUpdate:
    """:func:`sign_momentum` (out of place) or :func:`sign_momentum_` (in place) on one group's
    parameters that have a gradient, at distance ``view.lr * step_size * scale``; the step
    count advances by one (:func:`~metascale.optim.adaptive.one_buffer_group`)."""
    return one_buffer_group(
        view, BUFFER, step_size, scale, inplace,
        lambda live, ps, gs, bs, lr: sign_momentum_(ps, gs, bs, lr=lr, beta1=beta1, beta2=beta2, foreach=view.foreach),
        lambda live, ps, gs, bs, lr: sign_momentum(ps, gs, bs, lr=lr, beta1=beta1, beta2=beta2))


class AdaptiveSignRule(AdaptiveRule):
    """The adaptive rule's network over the sign-momentum direction (see the module doc)."""

    config_type = SignConfig
    table = "adaptive_sign"

    def __init__(self):
        super().__init__("adaptive-sign", with_momentum=True)
        self.summary = ("the adaptive rule's network sets each layer's step size and rescaling factor every step; "
                        "every coordinate moves by their product along the sign of its interpolated momentum "
                        "(Lion; spec table [adaptive_sign]); one momentum buffer per parameter")

    def config_from(self, config):
        return config

    def owns(self, config):
        return type(config) is SignConfig

    def update(self, view, step_size, scale, config, inplace, info):
        """:func:`sign_momentum_group` at the network's factors."""
        return sign_momentum_group(view, step_size, scale, config.interpolation, config.momentum, inplace)
