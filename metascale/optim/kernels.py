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

**The scaled optimizers' kernels** (:mod:`metascale.scaling`): SGD through the heavy-ball
kernel, and Adam (moments stored undecayed, five passes), RMSprop and Adagrad, each consuming
gradients that carry a known loss scale ``sigma``; their math is in their docstrings and in
docs/loss-scaling.md.
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
    kernel where it computes the same update (no Nesterov, ``c = s``, ``d = mu``; parameters of
    one full-precision dtype, not under ``torch.compile``: :func:`fused_ok`): one pass over
    ``(p, g, b)`` instead of three. Elsewhere the foreach (or per-tensor) kernels run; they take
    every scalar (``lr``, ``lr * s``, ``c``, ``d``) as a float64 Python number and compute in the
    tensors' ``opmath`` type (float32 for float16/bfloat16)."""
    c = scale if coef is None else coef
    d = momentum if decay is None else decay
    if momentum == 0:
        if foreach:
            torch._foreach_add_(params, grads, alpha=-lr * scale)
        else:
            for p, g in zip(params, grads):
                p.add_(g, alpha=-lr * scale)
        return list(bufs)
    if fused and foreach and not nesterov and c == scale and d == momentum and fused_ok(params) \
            and _laid_out_alike(params, grads, bufs):
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


FUSED_DTYPES = (torch.float32, torch.float64)


def fused_ok(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused SGD kernel may run on ``params``: one dtype among
    :data:`FUSED_DTYPES`, and not while ``torch.compile`` traces (``aten::_fused_sgd_`` has no
    fake kernel). In torch 2.13 the CPU kernel with momentum drops the parameter update of the
    float16/bfloat16 elements in its vectorised body (only a tail shorter than one vector
    moves: tests/test_precision.py), so low-precision parameters take the foreach kernels."""
    if not params or torch.compiler.is_compiling():
        return False
    dtype = params[0].dtype
    return dtype in FUSED_DTYPES and all(p.dtype == dtype for p in params)


def _laid_out_alike(params, grads, bufs) -> bool:
    """Whether every gradient and buffer has its parameter's shape, strides, dtype and device:
    torch's fused kernel trusts its inputs' sizes (a smaller buffer is written past its end)
    and layouts. The other paths check shapes themselves (``RuntimeError``)."""
    for p, g, b in zip(params, grads, bufs):
        for t in (g, b):
            if t is not None and (t.shape != p.shape or t.stride() != p.stride() or t.dtype != p.dtype
                                  or t.device != p.device):
                return False
    return True


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
def state_like(param: torch.Tensor) -> torch.Tensor:
    """A zero buffer for a moment of ``param``: float32 for float16/bfloat16 parameters (Adam's
    ``(1 - beta2) g^2`` of a gradient of 1e-3 is 1e-9, zero in float16, and ``eps = 1e-8`` is
    zero there too: the step would be ``m / 0``), else ``param``'s dtype."""
    low = param.dtype in (torch.float16, torch.bfloat16)
    return torch.zeros_like(param, dtype=torch.float32 if low else param.dtype)


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
    """In place on existing (zero-initialised, :func:`state_like`) moments, at step ``step >= 1``;
    the operations and their order are ``torch.optim.Adam``'s (foreach or per tensor). Moments
    wider than their parameters (float32 for float16/bfloat16) get the gradients in their dtype,
    and the parameter update is computed in it and rounded once."""
    bc1, bc2_sqrt = 1 - beta1 ** step, math.sqrt(1 - beta2 ** step)
    if any(m.dtype != g.dtype for m, g in zip(exp_avgs, grads)):
        grads = [g.to(m.dtype) for g, m in zip(grads, exp_avgs)]
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


# --------------------------------------------------------------------------- the scaled optimizers' kernels
# Each updates one group in place with torch._foreach_* kernels. Arguments: the tensors, then
# scalars: lr_eff (lr * s in step mode, lr in invariant mode), sigma (the factor the gradients
# carry), ratio = sigma_t / sigma_{t-1} (1 on the first step), and the hyperparameters.

def sgd_update_(params, grads, bufs, *, lr_eff, sigma, ratio, momentum, dampening, nesterov,
                weight_decay, first: bool, foreach: bool = True) -> list[torch.Tensor]:
    r"""Scaled SGD (torch.optim.SGD semantics on ``g = g_hat / sigma``): the heavy-ball kernel
    (:func:`heavy_ball_`) with step ``eta / sigma``, a buffer decay ``mu * sigma_t / sigma_{t-1}``
    and ``1 - tau`` on gradients entering an existing buffer.

    .. math::
        \hat d = \hat g + \sigma\lambda p,\quad
        \hat b = \mu \tfrac{\sigma_t}{\sigma_{t-1}} \hat b + (1-\tau)\hat d \;(\hat b_0 = \hat d),\quad
        p \leftarrow p - \tfrac{\eta}{\sigma}\,(\hat d + \mu \hat b \text{ if nesterov else } \hat b)

    Returns the momentum buffers (created on the first step).
    """
    if weight_decay:
        grads = torch._foreach_add(grads, params, alpha=sigma * weight_decay)
    return heavy_ball_(params, grads, [None] * len(params) if first else bufs, lr=lr_eff / sigma,
                       momentum=momentum, coef=1 - dampening, decay=momentum * ratio, nesterov=nesterov,
                       foreach=foreach)


def adam_update_(params, grads, exp_avgs, exp_avg_sqs, *, step, ref_step, lr_eff, sigma, beta1, beta2,
                 eps, weight_decay, decoupled) -> int:
    r"""Scaled Adam / AdamW (torch.optim semantics on ``g = g_hat / sigma``) in five passes.

    The moments are stored *undecayed* relative to a reference step ``t0``
    (``m_t = beta1^(t-t0) m~``, ``v_t = beta2^(t-t0) v~``), so each moment update is a single
    kernel whose constant absorbs the decay, the scale and ``1 - beta``:

    .. math::
        \tilde m \mathrel{+}= \frac{1-\beta_1}{\beta_1^{k}\,\sigma}\,\hat g,\qquad
        \tilde v \mathrel{+}= \frac{1-\beta_2}{\beta_2^{k}\,\sigma^2}\,\hat g^2,\qquad k = t - t_0,

    and the parameter update folds the bias corrections and the decay back in:

    .. math::
        p \leftarrow p - \eta\,\frac{\beta_1^{k}\sqrt{1-\beta_2^t}}{(1-\beta_1^t)\,\beta_2^{k/2}}\,
        \frac{\tilde m}{\sqrt{\tilde v} + \epsilon\sqrt{1-\beta_2^t}\,\beta_2^{-k/2}}

    which is algebraically torch's ``p - lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)``. The
    moments are in unscaled units, so a scale that changes between steps needs no buffer
    correction. When ``beta^-k`` passes ``2^16`` the moments are renormalised (one extra pass,
    about every ``11 / (1 - beta1)`` steps) and ``t0`` moves to ``t - 1``. Passes per step: two
    moment kernels, ``sqrt``, ``+ eps``, ``addcdiv`` (torch's foreach Adam: seven, plus
    GradScaler's unscale). Weight decay as in torch: coupled adds ``sigma * wd * p`` to
    ``g_hat``; decoupled multiplies ``p`` by ``1 - lr_eff * wd``.

    Returns the (possibly moved) reference step ``t0``.
    """
    if weight_decay:
        if decoupled:
            torch._foreach_mul_(params, 1 - lr_eff * weight_decay)
        else:
            grads = torch._foreach_add(grads, params, alpha=sigma * weight_decay)
    if beta1 ** (step - ref_step) < 2.0 ** -16 or beta2 ** (step - ref_step) < 2.0 ** -16:
        k_prev = step - 1 - ref_step
        torch._foreach_mul_(exp_avgs, beta1 ** k_prev)
        torch._foreach_mul_(exp_avg_sqs, beta2 ** k_prev)
        ref_step = step - 1
    k = step - ref_step
    d1, d2 = beta1 ** k, beta2 ** k
    torch._foreach_add_(exp_avgs, grads, alpha=(1 - beta1) / (d1 * sigma))
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=(1 - beta2) / (d2 * sigma * sigma))
    bc1, bc2_sqrt = 1 - beta1 ** step, math.sqrt(1 - beta2 ** step)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denom, eps * bc2_sqrt / math.sqrt(d2))
    torch._foreach_addcdiv_(params, exp_avgs, denom, value=-lr_eff * d1 * bc2_sqrt / (bc1 * math.sqrt(d2)))
    return ref_step


def rmsprop_update_(params, grads, square_avgs, grad_avgs, bufs, *, lr_eff, sigma, ratio, alpha, eps,
                    weight_decay, momentum, centered) -> None:
    r"""Scaled RMSprop (torch.optim.RMSprop semantics on ``g = g_hat / sigma``).

    .. math::
        v \leftarrow \alpha v + \tfrac{1-\alpha}{\sigma^2}\hat g^2,\quad
        \hat{\bar g} \leftarrow \alpha \tfrac{\sigma_t}{\sigma_{t-1}} \hat{\bar g} + (1-\alpha)\hat g \text{ (centered)},\quad
        a = \sqrt{v - \hat{\bar g}^2/\sigma^2} + \epsilon,\quad
        \hat b \leftarrow \mu \tfrac{\sigma_t}{\sigma_{t-1}}\hat b + \hat g / a,\quad
        p \leftarrow p - \tfrac{\eta}{\sigma}\hat b \;(\text{or } \tfrac{\eta}{\sigma}\hat g / a \text{ without momentum})
    """
    if weight_decay:
        grads = torch._foreach_add(grads, params, alpha=sigma * weight_decay)
    torch._foreach_mul_(square_avgs, alpha)
    torch._foreach_addcmul_(square_avgs, grads, grads, value=(1 - alpha) / (sigma * sigma))
    if centered:  # grad_avg kept in scaled units, like the momentum buffers
        if ratio != 1.0:
            torch._foreach_mul_(grad_avgs, ratio)
        torch._foreach_lerp_(grad_avgs, grads, 1 - alpha)
        avg = torch._foreach_addcmul(square_avgs, grad_avgs, grad_avgs, value=-1 / (sigma * sigma))
        torch._foreach_sqrt_(avg)
    else:
        avg = torch._foreach_sqrt(square_avgs)
    torch._foreach_add_(avg, eps)
    if momentum:
        torch._foreach_mul_(bufs, momentum * ratio)
        torch._foreach_addcdiv_(bufs, grads, avg)
        torch._foreach_add_(params, bufs, alpha=-lr_eff / sigma)
    else:
        torch._foreach_addcdiv_(params, grads, avg, value=-lr_eff / sigma)


def adagrad_update_(params, grads, state_sums, *, step, lr_eff, sigma, lr_decay, eps, weight_decay) -> None:
    r"""Scaled Adagrad (torch.optim.Adagrad semantics on ``g = g_hat / sigma``).

    .. math::
        S \leftarrow S + \hat g^2/\sigma^2,\quad
        p \leftarrow p - \frac{\eta}{\sigma\,(1 + (t-1)\,\delta)}\,\frac{\hat g}{\sqrt{S} + \epsilon}
    """
    if weight_decay:
        grads = torch._foreach_add(grads, params, alpha=sigma * weight_decay)
    torch._foreach_addcmul_(state_sums, grads, grads, value=1 / (sigma * sigma))
    std = torch._foreach_sqrt(state_sums)
    torch._foreach_add_(std, eps)
    clr = lr_eff / (1 + (step - 1) * lr_decay)
    torch._foreach_addcdiv_(params, grads, std, value=-clr / sigma)
