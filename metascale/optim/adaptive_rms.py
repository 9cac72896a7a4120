r"""The adaptive rule over a per-coordinate normalised direction (``--rule adaptive-rms``): the
adaptive rule's network (:mod:`metascale.optim.adaptive`) sets each layer's step size and
rescaling factor every step, and the step divides every coordinate's gradient by its running
root mean square, as RMSprop, or Adam without its first moment.

Per parameter of group ``g``, at the group's step ``t``, with gradient ``G``, one buffer ``v``
(``v_{-1} = 0``) and the network's factors ``eta = eta_{g,t}``, ``s = s_{g,t}``:

.. math::

    v \leftarrow \beta_2 v + (1-\beta_2) G^2, \qquad
    P \leftarrow P - \eta\, s\, \frac{G}{\sqrt{v / (1-\beta_2^{t+1})} + \epsilon}.

A loss scaled by ``s`` scales ``v`` by ``s^2``, so the direction does not change; as in
``layerwise-adam`` (which folds ``1/s^2`` into the second moment) the rescaling factor is a step
size: ``eta * s`` is the step in units of the coordinates' gradient RMS. Untrained (the network
at zero) the rule *is* ``torch.optim.Adam(lr=eta_0, betas=(0, beta_2), eps=eps)``; with the
frozen optimizer's decoupled weight decay, ``P <- P (1 - lr eta s wd)`` after the update.

``mup_width = n`` (0: off) adds the per-layer normalisation of muP for Adam-type updates, as
muLO (Therien et al., 2024) uses for width transfer: every matrix after the model's first layer
takes its step times ``n / fan_in`` (``fan_in``: a weight's numbers per output unit), the
first layer's matrices and every vector unscaled. At width ``n`` the rule is unchanged; a layer
``k`` times wider moves each weight ``k`` times less, so its output changes by about the same.

Why: it normalises every coordinate with one buffer of state (half of Adam's), so layers whose
coordinates have gradients of very different sizes (recurrent gates, embeddings, deep stacks)
take usable steps where a heavy ball normalised per layer cannot. The learned schedule and the
network supply what Adam's momentum and a tuned learning rate would.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..config import check
from .adaptive import AdaptiveConfig, AdaptiveRule, one_buffer_group
from .kernels import _safe_sqrt, state_like
from .rule import GroupUpdate, GroupView

BUFFER = "exp_avg_sq"


@dataclasses.dataclass(frozen=True)
class RmsConfig(AdaptiveConfig):
    """Configuration of the normalised adaptive rule (the ``[adaptive_rms]`` table): the
    adaptive rule's fields (:class:`~metascale.optim.adaptive.AdaptiveConfig`; ``momentum``
    must be 0: this rule keeps no momentum), with

    Attributes:
        init_lr: ``eta_0``, Adam's learning rate of the untrained rule.
        beta2: decay of the per-coordinate mean square gradient ``v``.
        eps: added to the bias-corrected root mean square.
        mup_width: the base width ``n`` of the muP normalisation (module doc); 0: off.
    """

    init_lr: float = dataclasses.field(default=1e-3, metadata=check("float", 1e-8, 100.0))
    momentum: float = dataclasses.field(default=0.0, metadata=check("float", 0.0, 0.999))
    beta2: float = dataclasses.field(default=0.999, metadata=check("float", 0.0, 0.999999))
    eps: float = dataclasses.field(default=1e-8, metadata=check("float", 1e-30, 1.0))
    mup_width: int = dataclasses.field(default=0, metadata=check("int", 0, 1_000_000))

    def validate(self) -> None:
        """Raise ``ValueError`` for inconsistent settings."""
        if self.momentum != 0 or self.nesterov:
            raise ValueError("the rms rule keeps no momentum (its one buffer is the mean square gradient): "
                             "momentum must be 0 and nesterov false")
        super().validate()


def mup_multipliers(params: list[torch.Tensor], info, width: int) -> list[float] | None:
    """The muP step multipliers ``width / fan_in`` of a group's tensors (module doc): ``None``
    (all 1) when off, for vectors and for the model's first layer."""
    if width == 0 or info.role != "matrix" or info.layer == 0:
        return None
    return [width * p.shape[0] / p.numel() for p in params]


def rms_step(params: list[torch.Tensor], grads: list[torch.Tensor], sqs: list[torch.Tensor | None], *, lr,
             beta2: float, eps: float, step: int, mult: list[float] | None = None,
             ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    r"""Out of place: ``(new_params, new_buffers)`` of the module doc's update at step ``step``
    (0-based) and step size ``lr`` (``eta * s``; a tensor carries gradients to it), times
    ``mult[i]`` for tensor ``i`` when given."""
    root_correction = math.sqrt(1 - beta2 ** (step + 1))
    new_p, new_v = [], []
    for i, (p, g, v) in enumerate(zip(params, grads, sqs)):
        v = (1 - beta2) * g * g if v is None else beta2 * v + (1 - beta2) * g * g
        denom = _safe_sqrt(v) / root_correction + eps  # d sqrt/dv is 0, not infinite, where G has been 0
        new_p.append(p - (lr if mult is None else lr * mult[i]) * (g / denom))
        new_v.append(v)
    return new_p, new_v


def rms_step_(params: list[torch.Tensor], grads: list[torch.Tensor], sqs: list[torch.Tensor | None], *, lr: float,
              beta2: float, eps: float, step: int, foreach: bool = True,
              mult: list[float] | None = None) -> list[torch.Tensor]:
    """In place (parameters and buffers; new buffers created); returns the buffers. The
    arithmetic of ``torch.optim.Adam``'s single-tensor path at ``beta1 = 0``: foreach kernels when
    ``foreach``, a loop over tensors otherwise. Buffers of float16/bfloat16 parameters are float32
    (:func:`~metascale.optim.kernels.state_like`: ``(1 - beta2) G^2`` and ``eps`` vanish in
    float16); the gradients are widened to them and the update is computed there and rounded
    once."""
    root_correction = math.sqrt(1 - beta2 ** (step + 1))
    sqs = [state_like(p) if v is None else v for p, v in zip(params, sqs)]
    if any(v.dtype != g.dtype for v, g in zip(sqs, grads)):
        grads = [g.to(v.dtype) for g, v in zip(grads, sqs)]
    if foreach:
        torch._foreach_mul_(sqs, beta2)
        torch._foreach_addcmul_(sqs, grads, grads, value=1 - beta2)
        denom = torch._foreach_sqrt(sqs)
        torch._foreach_div_(denom, root_correction)
        torch._foreach_add_(denom, eps)
        if mult is None:
            torch._foreach_addcdiv_(params, grads, denom, value=-lr)
        else:
            torch._foreach_addcdiv_(params, grads, denom, [-lr * m for m in mult])
    else:
        for i, (p, g, v) in enumerate(zip(params, grads, sqs)):
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            p.addcdiv_(g, (v.sqrt() / root_correction).add_(eps), value=-lr if mult is None else -lr * mult[i])
    return sqs


def rms_group(view: GroupView, step_size, scale, beta2: float, eps: float, inplace: bool,
              mult: list[float] | None = None) -> GroupUpdate:
    """:func:`rms_step` (out of place) or :func:`rms_step_` (in place) on one group's
    parameters that have a gradient, at step size ``view.lr * step_size * scale`` (times
    ``mult``, per parameter, when given); the step count advances by one
    (:func:`~metascale.optim.adaptive.one_buffer_group`)."""
    t = view.state.step
    of = lambda live: None if mult is None else [mult[i] for i in live]
    return one_buffer_group(
        view, BUFFER, step_size, scale, inplace,
        lambda live, ps, gs, vs, lr: rms_step_(ps, gs, vs, lr=lr, beta2=beta2, eps=eps, step=t,
                                               foreach=view.foreach, mult=of(live)),
        lambda live, ps, gs, vs, lr: rms_step(ps, gs, vs, lr=lr, beta2=beta2, eps=eps, step=t, mult=of(live)))


class AdaptiveRmsRule(AdaptiveRule):
    """The adaptive rule's network over the normalised direction (see the module doc)."""

    config_type = RmsConfig
    table = "adaptive_rms"

    def __init__(self):
        super().__init__("adaptive-rms", with_momentum=False)
        self.buffers = (BUFFER,)
        self.state_text = "one buffer (the mean square gradient)"
        self.summary = ("the adaptive rule's network sets each layer's step size and rescaling factor every step, "
                        "over the gradient divided by its per-coordinate running RMS (RMSprop, Adam without "
                        "momentum; spec table [adaptive_rms]); one buffer per parameter")

    def config_from(self, config):
        return config

    def owns(self, config):
        return type(config) is RmsConfig

    def update(self, view, step_size, scale, config, inplace, info):
        """:func:`rms_group` at the network's factors (and the muP multipliers, when on)."""
        return rms_group(view, step_size, scale, config.beta2, config.eps, inplace,
                         mup_multipliers(view.params, info, config.mup_width))
