r"""The update kernels every rule is built on, in one place.

Each kernel exists in two forms, as in ``torch/optim/sgd.py``:

* **in place** (``name_``): the frozen optimizers' path, under ``no_grad``, with float
  hyperparameters; it picks among a per-tensor loop (``_single``), the ``torch._foreach_*``
  kernels (``_multi``) and, where one exists, torch's fused kernel (``_fused``);
* **out of place** (``name``): the differentiable path (``higher``, ``torch.func``), where the
  step sizes and scales are tensors that carry gradients back to the meta-parameters.

Both forms compute the same numbers; ``tests/test_kernels.py`` checks every path against the
out-of-place one and against ``torch.optim``.

**Heavy ball** (``mu`` momentum, ``s`` the gradient's scale, ``c`` the coefficient of a
gradient entering an existing buffer, ``d`` the buffer's decay; ``c = s`` and ``d = mu``
unless given):

.. math::

    \tilde g = s\,g, \qquad b \leftarrow \begin{cases}\tilde g & \text{new buffer}\\
    d\,b + c\,g & \text{else}\end{cases}, \qquad
    p \leftarrow p - \eta\,(\tilde g + \mu b \text{ if nesterov else } b),

and ``p -= eta * s * g`` without momentum. The learned rules use ``c = s``, ``d = mu`` (a loss
scale ``s`` on the group's gradient); :class:`~metascale.scaling.ScaledSGD` uses ``s = 1``,
``c = 1 - dampening``, ``d = mu * sigma_t / sigma_{t-1}``.

**Adam with the loss-scale fold** (the ``1/s^2`` fold of the second moment, which makes a
loss scale ``s`` a step-size multiplier for Adam as it is for SGD):

.. math::

    m \leftarrow \beta_1 m + (1-\beta_1)\,s g, \qquad
    v \leftarrow \beta_2 v + (1-\beta_2)\,(s g)^2 / s^2, \qquad
    p \leftarrow p(1 - \eta\lambda) - \eta\,\frac{m / (1-\beta_1^t)}{\sqrt{v / (1-\beta_2^t)} + \epsilon}

(``lambda``: decoupled weight decay, AdamW's). With ``s = 1`` this is ``torch.optim.Adam``
(``lambda = 0``) or ``torch.optim.AdamW``. The out-of-place square root has a zero gradient
where ``v = 0`` (the derivative of ``sqrt`` at 0 is infinite: torchopt #26, higher #125); its
value is the same.
"""
from __future__ import annotations

import math

import torch

Number = float | torch.Tensor


# --------------------------------------------------------------------------- heavy ball
def heavy_ball(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor | None], *,
               lr: Number, momentum: float, scale: Number = 1.0, nesterov: bool = False,
               ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Out of place: ``(new_params, new_bufs)`` (see the module doc; ``c = s``, ``d = mu``).
    A ``scale`` that is the float 1 costs no multiply."""
    unit = not isinstance(scale, torch.Tensor) and scale == 1
    new_p, new_b = [], []
    for p, g, b in zip(params, grads, bufs):
        g = g if unit else g * scale
        if momentum != 0:
            b = g if b is None else b * momentum + g
            d = g + b * momentum if nesterov else b
        else:
            d = g
        new_p.append(p - lr * d)
        new_b.append(b)
    return new_p, new_b


def heavy_ball_(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor | None], *,
                lr: float, momentum: float, scale: float = 1.0, coef: float | None = None,
                decay: float | None = None, nesterov: bool = False, foreach: bool = True,
                fused: bool = False) -> list[torch.Tensor | None]:
    """In place; returns the buffers (new ones created). ``fused`` takes torch's fused SGD
    kernel where it computes the same update (no Nesterov, ``c = s``, ``d = mu``): one pass over
    ``(p, g, b)`` instead of three."""
    c = scale if coef is None else coef
    d = momentum if decay is None else decay
    if momentum == 0:
        if foreach:
            torch._foreach_add_(params, grads, alpha=-lr * scale)
        else:
            for p, g in zip(params, grads):
                p.add_(g, alpha=-lr * scale)
        return list(bufs)
    if fused and foreach and not nesterov and c == scale and d == momentum:
        return _heavy_ball_fused(params, grads, bufs, lr=lr, momentum=momentum, scale=scale)
    bufs = list(bufs)
    fresh = [i for i, b in enumerate(bufs) if b is None]
    old = [i for i, b in enumerate(bufs) if b is not None]
    for i in fresh:
        bufs[i] = torch.mul(grads[i], scale)
    if old:
        ob, og = [bufs[i] for i in old], [grads[i] for i in old]
        if foreach:
            torch._foreach_mul_(ob, d)
            torch._foreach_add_(ob, og, alpha=c)
        else:
            for b, g in zip(ob, og):
                b.mul_(d).add_(g, alpha=c)
    if foreach:
        if nesterov:
            torch._foreach_add_(params, grads, alpha=-lr * scale)
            torch._foreach_add_(params, bufs, alpha=-lr * momentum)
        else:
            torch._foreach_add_(params, bufs, alpha=-lr)
    else:
        for p, g, b in zip(params, grads, bufs):
            if nesterov:
                p.add_(g, alpha=-lr * scale).add_(b, alpha=-lr * momentum)
            else:
                p.add_(b, alpha=-lr)
    return bufs


def _heavy_ball_fused(params, grads, bufs, *, lr: float, momentum: float, scale: float) -> list[torch.Tensor]:
    """torch's fused heavy-ball kernel computes ``b = mu b + (1 - dampening) g; p -= lr b``,
    which is the rule with ``dampening = 1 - s`` (``1 - (1 - s)`` equals ``s`` up to one
    rounding; exactly for ``s = 1``). A new buffer starts at 0, so its first step gives
    ``b = s g``."""
    bufs = [torch.zeros_like(p) if b is None else b for p, b in zip(params, bufs)]
    torch._fused_sgd_(params, grads, bufs, weight_decay=0.0, momentum=momentum, lr=lr, dampening=1.0 - scale,
                      nesterov=False, maximize=False, is_first_step=False)
    return bufs


# --------------------------------------------------------------------------- Adam with the 1/s^2 fold
def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(x)`` for ``x >= 0`` whose gradient at ``x = 0`` is 0 instead of infinite."""
    pos = x > 0
    return torch.where(pos, torch.where(pos, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


def adam(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor | None],
         exp_avg_sqs: list[torch.Tensor | None], *, step: int, lr: Number, scale: Number = 1.0, beta1: float,
         beta2: float, eps: float, weight_decay: float = 0.0,
         ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Out of place: ``(new_params, new_exp_avgs, new_exp_avg_sqs)`` at step ``step >= 1``
    (see the module doc; ``None`` moments start at zero)."""
    unit = not isinstance(scale, torch.Tensor) and scale == 1
    bc1, bc2_sqrt = 1 - beta1 ** step, math.sqrt(1 - beta2 ** step)
    new_p, new_m, new_v = [], [], []
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        gs = g if unit else g * scale
        m = (1 - beta1) * gs if m is None else beta1 * m + (1 - beta1) * gs
        g2 = g * g  # (s g)^2 / s^2
        v = (1 - beta2) * g2 if v is None else beta2 * v + (1 - beta2) * g2
        if weight_decay:
            p = p * (1 - lr * weight_decay)
        new_p.append(p - (lr / bc1) * m / (_safe_sqrt(v) / bc2_sqrt + eps))
        new_m.append(m)
        new_v.append(v)
    return new_p, new_m, new_v


def adam_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
          exp_avg_sqs: list[torch.Tensor], *, step: int, lr: float, scale: float = 1.0, beta1: float, beta2: float,
          eps: float, weight_decay: float = 0.0, foreach: bool = True) -> None:
    """In place on existing (zero-initialised) moments, at step ``step >= 1``; the operations
    and their order are ``torch.optim.Adam``'s (foreach or per tensor)."""
    bc1, bc2_sqrt = 1 - beta1 ** step, math.sqrt(1 - beta2 ** step)
    if foreach:
        if weight_decay:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        if scale == 1:
            torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        else:
            torch._foreach_mul_(exp_avgs, beta1)
            torch._foreach_add_(exp_avgs, grads, alpha=(1 - beta1) * scale)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denom, value=-lr / bc1)
        return
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        if weight_decay:
            p.mul_(1 - lr * weight_decay)
        if scale == 1:
            m.lerp_(g, 1 - beta1)
        else:
            m.mul_(beta1).add_(g, alpha=(1 - beta1) * scale)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        p.addcdiv_(m, (v.sqrt() / bc2_sqrt).add_(eps), value=-lr / bc1)
