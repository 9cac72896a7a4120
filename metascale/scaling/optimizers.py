r"""Scaled optimizers: SGD, Adam/AdamW, RMSprop and Adagrad that consume gradients of ``s * L``.

Every optimizer here receives gradients that carry a known factor

.. math:: \hat g_t = \sigma_t\, g_t, \qquad \sigma_t = s_t \cdot S_t,

where ``s_t`` is the group's ``scale`` (a loss scale the user applied, global or per group, it
may change every step) and ``S_t`` the ``torch.amp.GradScaler`` scale when the optimizer is
stepped through a GradScaler (1 otherwise). It then takes the step that ``torch.optim``'s
optimizer would take on the *unscaled* gradient ``g_t`` with learning rate

* ``mode="step"``: ``lr * s_t`` (the loss scale *is* a step-size multiplier), or
* ``mode="invariant"``: ``lr`` (the scale is compensated: same trajectory as unscaled training,
  eps included; this is how GradScaler-scaled gradients are consumed without an unscale pass).

Nothing is divided out of the gradients: ``1/sigma`` folds into the scalar constants of the
existing ``torch._foreach_*`` kernels, so no extra pass over the parameters is made:

* SGD: ``p -= (lr_eff / sigma) * b_hat``; weight decay adds ``sigma * wd * p``.
* Adam/AdamW: ``v~ += (1 - b2) / (b2^k sigma^2) * g_hat^2`` (the ``value`` of one ``addcmul``)
  and ``m~ += (1 - b1) / (b1^k sigma) * g_hat``: undecayed moments in unscaled units, so
  ``eps`` keeps its meaning; decay, bias corrections and ``1/sigma`` fold into the step
  constants (:func:`adam_update_`).
* RMSprop: as Adam for ``v``; when centered, ``grad_avg`` is kept scaled and enters as ``grad_avg^2 / sigma^2``.
* Adagrad: ``sum += g_hat^2 / sigma^2``; step constant ``clr_eff / sigma``.

**Momentum with a time-varying scale.** Buffers that accumulate gradients (SGD's ``b``,
RMSprop's momentum and centered average) are kept in *scaled* units, ``b_hat_t = sigma_t b_t``. When
``sigma`` changes from ``sigma_{t-1}`` to ``sigma_t`` the decay constant absorbs the ratio,

.. math:: \hat b_t = \mu \frac{\sigma_t}{\sigma_{t-1}} \hat b_{t-1} + \hat g_t,

which keeps ``b_hat_t = sigma_t b_t`` exactly, so a change of ``s`` mid-run behaves like a
change of learning rate mid-run (``lr_t = lr * s_t``), again without an extra pass.

**GradScaler.** The classes set ``_step_supports_amp_scaling = True``: ``scaler.step(opt)``
runs GradScaler's inf/NaN check (no unscale), hands the scale and the ``found_inf`` flag to
the optimizer, which skips the step when an inf/NaN was found and otherwise folds the scale as
above; ``scaler.update()`` does its usual growth/backoff. After a manual ``scaler.unscale_(opt)``
(e.g. for gradient clipping) the gradients are unscaled and no scale is folded.

Memory: the same state as the ``torch.optim`` counterpart plus two floats per parameter state
(step count, last ``sigma``).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from ..optim.kernels import adagrad_update_, adam_update_, rmsprop_update_, sgd_update_

MODES = ("step", "invariant")


def _check_scale(value: float, what: str) -> float:
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{what} must be a finite number > 0, got {value!r}")
    return v


# --------------------------------------------------------------------------- optimizer classes
class _ScaledOptimizer(torch.optim.Optimizer):
    """Shared front end: per-group ``scale`` and ``mode``, GradScaler hand-off, foreach or
    per-tensor application of the rule, the sigma bookkeeping for buffer corrections."""

    _step_supports_amp_scaling = True

    def __init__(self, params, defaults: dict, scale: float, mode: str, foreach: bool | None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        _check_scale(scale, "scale")
        if defaults["lr"] < 0:
            raise ValueError(f"invalid learning rate {defaults['lr']}")
        defaults.update(scale=scale, mode=mode, foreach=foreach)
        super().__init__(params, defaults)

    def _group_update(self, group: dict, params: list, grads: list, states: list, *, lr_eff: float,
                      sigma: float, ratio: float, step: int) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """One step on gradients that carry ``group["scale"]`` (times the GradScaler scale when
        stepped through ``scaler.step``); skipped when GradScaler found an inf/NaN."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and float(found_inf) != 0:
            return loss
        amp = getattr(self, "grad_scale", None)
        amp = 1.0 if amp is None else float(amp)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            s = _check_scale(group["scale"], "param group 'scale'")
            sigma = s * amp
            lr_eff = group["lr"] * s if group["mode"] == "step" else group["lr"]
            states = [self.state[p] for p in params]
            prev = states[0].get("sigma")
            step = int(states[0].get("step", 0)) + 1
            ratio = 1.0 if prev is None else sigma / prev
            grads = [p.grad for p in params]
            foreach = group["foreach"] if group["foreach"] is not None else True
            if foreach:
                self._group_update(group, params, grads, states, lr_eff=lr_eff, sigma=sigma, ratio=ratio, step=step)
            else:
                for p, g, st in zip(params, grads, states):
                    self._group_update(group, [p], [g], [st], lr_eff=lr_eff, sigma=sigma, ratio=ratio, step=step)
            for st in states:
                st["step"] = float(step)
                st["sigma"] = sigma
        return loss


class ScaledSGD(_ScaledOptimizer):
    r"""SGD that consumes gradients of ``scale * loss`` (see the module doc).

    ``ScaledSGD(params, lr, scale=s)`` fed gradients of ``s * L`` follows
    ``torch.optim.SGD(params, lr * s)`` (``mode="step"``) or ``torch.optim.SGD(params, lr)``
    (``mode="invariant"``) on ``L``; ``momentum``, ``dampening``, ``nesterov`` and (coupled)
    ``weight_decay`` as in ``torch.optim.SGD``. State: one momentum buffer per parameter.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, scale: float = 1.0, mode: str = "step",
                 foreach: bool | None = None):
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov), scale, mode, foreach)

    def _group_update(self, group, params, grads, states, *, lr_eff, sigma, ratio, step):
        bufs = [st.get("momentum_buffer") for st in states]
        bufs = sgd_update_(params, grads, bufs, lr_eff=lr_eff, sigma=sigma, ratio=ratio, momentum=group["momentum"],
                           dampening=group["dampening"], nesterov=group["nesterov"],
                           weight_decay=group["weight_decay"], first=step == 1)
        if group["momentum"]:
            for st, b in zip(states, bufs):
                st["momentum_buffer"] = b


class ScaledAdam(_ScaledOptimizer):
    r"""Adam (``decoupled=False``) or AdamW (``decoupled=True``) that consumes gradients of
    ``scale * loss``: the second moment receives ``g_hat^2 / sigma^2`` so that ``scale`` is a
    step-size multiplier (``mode="step"``: follows ``torch.optim.Adam/AdamW(lr * s)``) or fully
    compensated (``mode="invariant"``: follows ``torch.optim.Adam/AdamW(lr)``), ``eps`` keeping
    its meaning. State: two buffers per parameter, as ``torch.optim.Adam``.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, decoupled: bool = False, scale: float = 1.0,
                 mode: str = "step", foreach: bool | None = None):
        if not (0.5 <= betas[0] < 1 and 0.5 <= betas[1] < 1):
            raise ValueError(f"betas must lie in [0.5, 1) (the undecayed-moment kernels divide by beta^k), got {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      decoupled=decoupled), scale, mode, foreach)

    def _group_update(self, group, params, grads, states, *, lr_eff, sigma, ratio, step):
        for st, p in zip(states, params):
            if "exp_avg_undecayed" not in st:
                st["exp_avg_undecayed"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq_undecayed"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["ref_step"] = 0.0
        b1, b2 = group["betas"]
        ref = adam_update_(params, grads, [st["exp_avg_undecayed"] for st in states],
                           [st["exp_avg_sq_undecayed"] for st in states], step=step, ref_step=int(states[0]["ref_step"]),
                           lr_eff=lr_eff, sigma=sigma, beta1=b1, beta2=b2, eps=group["eps"],
                           weight_decay=group["weight_decay"], decoupled=group["decoupled"])
        for st in states:
            st["ref_step"] = float(ref)

    def moments(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(exp_avg, exp_avg_sq)`` of parameter ``p`` in ``torch.optim.Adam``'s units (new tensors)."""
        st = self.state[p]
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        b1, b2 = group["betas"]
        k = st["step"] - st["ref_step"]
        return st["exp_avg_undecayed"] * b1 ** k, st["exp_avg_sq_undecayed"] * b2 ** k


def ScaledAdamW(params: Iterable, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                weight_decay: float = 1e-2, **kwargs) -> ScaledAdam:
    """:class:`ScaledAdam` with decoupled weight decay (``torch.optim.AdamW`` semantics)."""
    return ScaledAdam(params, lr, betas, eps, weight_decay, decoupled=True, **kwargs)


class ScaledRMSprop(_ScaledOptimizer):
    r"""RMSprop that consumes gradients of ``scale * loss`` (``torch.optim.RMSprop`` semantics:
    ``alpha``, ``eps``, ``weight_decay``, ``momentum``, ``centered``); the square average
    receives ``g_hat^2 / sigma^2``. State as ``torch.optim.RMSprop``.
    """

    def __init__(self, params: Iterable, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.0, centered: bool = False, *, scale: float = 1.0,
                 mode: str = "step", foreach: bool | None = None):
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                                      centered=centered), scale, mode, foreach)

    def _group_update(self, group, params, grads, states, *, lr_eff, sigma, ratio, step):
        for st, p in zip(states, params):
            if "square_avg" not in st:
                st["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["momentum"]:
                    st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["centered"]:
                    st["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        rmsprop_update_(params, grads, [st["square_avg"] for st in states],
                        [st.get("grad_avg") for st in states], [st.get("momentum_buffer") for st in states],
                        lr_eff=lr_eff, sigma=sigma, ratio=ratio, alpha=group["alpha"], eps=group["eps"],
                        weight_decay=group["weight_decay"], momentum=group["momentum"], centered=group["centered"])


class ScaledAdagrad(_ScaledOptimizer):
    r"""Adagrad that consumes gradients of ``scale * loss`` (``torch.optim.Adagrad`` semantics:
    ``lr_decay``, ``weight_decay``, ``initial_accumulator_value``, ``eps``); the sum of squares
    receives ``g_hat^2 / sigma^2``. State as ``torch.optim.Adagrad``.
    """

    def __init__(self, params: Iterable, lr: float = 1e-2, lr_decay: float = 0.0, weight_decay: float = 0.0,
                 initial_accumulator_value: float = 0.0, eps: float = 1e-10, *, scale: float = 1.0,
                 mode: str = "step", foreach: bool | None = None):
        super().__init__(params, dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps,
                                      initial_accumulator_value=initial_accumulator_value), scale, mode, foreach)

    def _group_update(self, group, params, grads, states, *, lr_eff, sigma, ratio, step):
        for st, p in zip(states, params):
            if "sum" not in st:
                st["sum"] = torch.full_like(p, group["initial_accumulator_value"], memory_format=torch.preserve_format)
        adagrad_update_(params, grads, [st["sum"] for st in states], step=step, lr_eff=lr_eff, sigma=sigma,
                        lr_decay=group["lr_decay"], eps=group["eps"], weight_decay=group["weight_decay"])
