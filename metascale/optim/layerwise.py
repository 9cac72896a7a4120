r"""The layer-wise learnable optimizer: a log step size and a log rescaling factor per
parameter group (role x depth anchor), optionally one per inner step, with momentum.

The update of one group at step ``t`` (``eta_t`` the step size, ``s_t`` the rescaling
factor, i.e. the loss scale applied to this group's gradient, ``mu`` the momentum):

.. math::

    \tilde g_t = s_t\, g_t, \qquad
    b_t = \mu\, b_{t-1} + \tilde g_t \;(b_0 = \tilde g_0), \qquad
    p_{t+1} = p_t - \eta_t \,(\tilde g_t + \mu b_t \text{ if nesterov else } b_t).

With ``mu = 0`` this is SGD with step ``eta_t * s_t``: the rescaling factor *is* a step size
(training on ``s * loss`` with step ``eta`` is training on ``loss`` with step ``eta * s``).
With momentum and a time-varying schedule they differ: ``s_t`` weighs what enters the
momentum buffer, ``eta_t`` how far the current step goes. With constant ``s`` and ``eta`` the
rule equals ``torch.optim.SGD(lr=eta * s, momentum=mu, nesterov=...)`` exactly.

Memory: one momentum buffer per parameter when ``mu > 0`` (none otherwise) plus
``2 * S`` floats per group; the meta-parameters are ``2 * 2 * depth_bins * S`` numbers.

One pure update function, :func:`layerwise_update`, serves both front ends: the frozen
:class:`LayerwiseOptimizer` (in place, ``torch._foreach_*`` kernels, floats) and the
differentiable :class:`DifferentiableLayerwise` registered with ``higher`` (out of place,
tensor step sizes that carry gradients).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Sequence

import higher
import torch

from ..config import check
from .groups import ROLES, GroupInfo, anchor_weights, group_parameters

Number = float | torch.Tensor


@dataclasses.dataclass(frozen=True)
class LayerwiseConfig:
    """Configuration of the layer-wise rule (the ``[optimizer]`` table of a spec).

    Attributes:
        init_lr: step size the meta-parameters start from (unit meta-parameters: step size
            ``init_lr``, rescaling factor 1).
        momentum: heavy-ball momentum ``mu`` (fixed, not learned).
        nesterov: Nesterov momentum.
        per_step: learn one step size and rescaling factor per inner step (a per-layer
            schedule of length ``horizon``); otherwise one per group.
        depth_bins: number of depth anchors ``B`` (see :mod:`metascale.optim.groups`).
    """

    init_lr: float = dataclasses.field(default=0.01, metadata=check("float", 1e-8, 100.0))
    momentum: float = dataclasses.field(default=0.9, metadata=check("float", 0.0, 0.999))
    nesterov: bool = dataclasses.field(default=False, metadata=check("bool"))
    per_step: bool = dataclasses.field(default=True, metadata=check("bool"))
    depth_bins: int = dataclasses.field(default=3, metadata=check("int", 1, 64))

    def validate(self) -> None:
        """Raise ``ValueError`` for inconsistent settings."""
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov = true needs momentum > 0")


# --------------------------------------------------------------------------- the update rule
def layerwise_update(params: list[torch.Tensor], grads: list[torch.Tensor | None],
                     bufs: list[torch.Tensor | None], *, step_size: Number, scale: Number,
                     momentum: float, nesterov: bool, inplace: bool, foreach: bool = False,
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    r"""One step of the layer-wise rule on one group (see the module doc for the math).

    Args:
        params, grads, bufs: parameters, their gradients (``None``: parameter skipped) and
            momentum buffers (``None``: not yet created).
        step_size, scale: ``eta_t`` and ``s_t``; floats on the frozen path, tensors (that may
            require grad) on the differentiable path.
        inplace: update ``params``/``bufs`` in place (frozen path, under ``no_grad``) or return
            new tensors and leave the inputs untouched (differentiable path).
        foreach: with ``inplace``, use the fused ``torch._foreach_*`` kernels; the scale folds
            into their scalar ``alpha`` so it costs no extra pass over the parameters.

    Returns:
        ``(new_params, new_bufs)``, aligned with the inputs.
    """
    live = [i for i, g in enumerate(grads) if g is not None]
    new_p, new_b = list(params), list(bufs)
    if not live:
        return new_p, new_b
    mu = momentum
    if not inplace:
        unit = not isinstance(scale, torch.Tensor) and scale == 1  # skip a multiply-by-one pass
        for i in live:
            p, g, b = params[i], grads[i] if unit else grads[i] * scale, bufs[i]
            if mu != 0:
                b = g if b is None else b * mu + g
                d = g + b * mu if nesterov else b
                new_b[i] = b
            else:
                d = g
            new_p[i] = p - step_size * d
        return new_p, new_b

    eta, s = float(step_size), float(scale)
    ps, gs = [params[i] for i in live], [grads[i] for i in live]
    if mu == 0:
        if foreach:
            torch._foreach_add_(ps, gs, alpha=-eta * s)
        else:
            for p, g in zip(ps, gs):
                p.add_(g, alpha=-eta * s)
        return new_p, new_b
    if foreach and not nesterov and hasattr(torch, "_fused_sgd_"):
        # one pass over (p, g, b) instead of three: torch's fused heavy-ball kernel computes
        # b = mu b + (1 - dampening) g; p -= lr b, which is the rule with dampening = 1 - s
        # (1 - (1 - s) equals s up to one rounding; exactly for s = 1). A new buffer starts at
        # 0, so the first step gives b = s g as below. benchmarks/step_cost.py: 1.49x -> 1.19x
        # SGD momentum's step for the adaptive-momentum rule on a quiet machine, 1.08x on a busy one.
        for i in live:
            if new_b[i] is None:
                new_b[i] = torch.zeros_like(params[i])
        torch._fused_sgd_(ps, gs, [new_b[i] for i in live], weight_decay=0.0, momentum=mu, lr=eta,
                          dampening=1.0 - s, nesterov=False, maximize=False, is_first_step=False)
        return new_p, new_b
    fresh = [k for k, i in enumerate(live) if bufs[i] is None]
    old = [k for k, i in enumerate(live) if bufs[i] is not None]
    for k in fresh:
        new_b[live[k]] = torch.mul(gs[k], s)
    if old:
        ob, og = [bufs[live[k]] for k in old], [gs[k] for k in old]
        if foreach:
            torch._foreach_mul_(ob, mu)
            torch._foreach_add_(ob, og, alpha=s)
        else:
            for b, g in zip(ob, og):
                b.mul_(mu).add_(g, alpha=s)
    bs = [new_b[i] for i in live]
    if foreach:
        if nesterov:
            torch._foreach_add_(ps, gs, alpha=-eta * s)
            torch._foreach_add_(ps, bs, alpha=-eta * mu)
        else:
            torch._foreach_add_(ps, bs, alpha=-eta)
    else:
        for p, g, b in zip(ps, gs, bs):
            if nesterov:
                p.add_(g, alpha=-eta * s).add_(b, alpha=-eta * mu)
            else:
                p.add_(b, alpha=-eta)
    return new_p, new_b


def _at(schedule: Sequence[Number] | torch.Tensor, t: int) -> Number:
    """Entry ``t`` of a schedule, holding the last entry past its horizon."""
    return schedule[min(t, len(schedule) - 1)]


# --------------------------------------------------------------------------- meta-parameters
META_NAMES = ("log_step_size", "log_scale")


def init_meta(config: LayerwiseConfig, horizon: int, dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Unit meta-parameters: ``log_step_size = log(init_lr)``, ``log_scale = 0``.

    Shapes: ``(len(ROLES), depth_bins, S)`` with ``S = horizon`` if ``per_step`` else 1.
    """
    s = horizon if config.per_step else 1
    shape = (len(ROLES), config.depth_bins, s)
    return {"log_step_size": torch.full(shape, math.log(config.init_lr), dtype=dtype, device=device),
            "log_scale": torch.zeros(shape, dtype=dtype, device=device)}


def group_schedules(meta: dict[str, torch.Tensor], info: GroupInfo) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Step-size and rescaling-factor schedules (each of shape ``(S,)``) of one group:

    .. math:: \eta_{g,t} = \exp\big(\textstyle\sum_b w_b(d_g)\, \theta^{\eta}_{r_g, b, t}\big),
              \quad s_{g,t} = \exp\big(\textstyle\sum_b w_b(d_g)\, \theta^{s}_{r_g, b, t}\big)

    with ``w(d)`` the anchor weights of the group's relative depth and ``r_g`` its role.
    Differentiable in ``meta``.
    """
    r = ROLES.index(info.role)
    bins = meta["log_step_size"].shape[1]
    w = torch.tensor(anchor_weights(info.depth, bins), dtype=meta["log_step_size"].dtype,
                     device=meta["log_step_size"].device)
    eta = torch.exp(torch.einsum("b,bs->s", w, meta["log_step_size"][r]))
    scale = torch.exp(torch.einsum("b,bs->s", w, meta["log_scale"][r]))
    return eta, scale


# --------------------------------------------------------------------------- frozen optimizer
class LayerwiseOptimizer(torch.optim.Optimizer):
    r"""The frozen layer-wise optimizer: a drop-in ``torch.optim.Optimizer``.

    Build it from meta-parameters (usually via :func:`metascale.load_optimizer`)::

        opt = LayerwiseOptimizer(model.parameters(), meta, momentum=0.9)

    Parameters are grouped by role and relative depth (:mod:`metascale.optim.groups`); each
    group carries its step-size and rescaling-factor schedules (tuples of floats). ``lr`` is a
    global multiplier (default 1) so ``torch.optim.lr_scheduler`` works on top. Past the
    learned horizon the last step's values are held.

    State: ``momentum_buffer`` per parameter when ``momentum > 0`` and a step count. After
    each step every group holds the step size and rescaling factor it used in
    ``group["last_step_size"]`` and ``group["last_scale"]`` (floats; for reports and logging).
    """

    def __init__(self, params: Iterable[torch.Tensor], meta: dict[str, torch.Tensor], *,
                 momentum: float = 0.0, nesterov: bool = False, lr: float = 1.0,
                 foreach: bool | None = None):
        groups = []
        meta = {k: v.detach().double().cpu() for k, v in meta.items()}
        for info, ps in group_parameters(params):
            eta, scale = group_schedules(meta, info)
            groups.append({"params": ps, "step_sizes": tuple(eta.tolist()), "scales": tuple(scale.tolist()),
                           "role": info.role, "layer": info.layer, "num_layers": info.num_layers})
        defaults = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "foreach": foreach}
        super().__init__(groups, defaults)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("foreach", None)
            group.setdefault("nesterov", False)

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimisation step (``closure`` re-evaluates the loss, as in torch.optim)."""
        loss = run_closure(closure)
        for group, params in live_groups(self):
            states = [self.state[p] for p in params]
            t = states[0].get("step", 0)
            foreach = group["foreach"]
            if foreach is None:
                foreach = True  # the foreach/fused kernels, also for one tensor (benchmarks/step_cost.py)
            eta, s_t = group["lr"] * _at(group["step_sizes"], t), _at(group["scales"], t)
            _, bufs = layerwise_update(
                params, [p.grad for p in params], [s.get("momentum_buffer") for s in states],
                step_size=eta, scale=s_t, momentum=group["momentum"], nesterov=group["nesterov"],
                inplace=True, foreach=foreach)
            group["last_step_size"], group["last_scale"] = eta, s_t  # what the step used (reports)
            for s, b in zip(states, bufs):
                s["step"] = t + 1
                if b is not None:
                    s["momentum_buffer"] = b
        return loss


def run_closure(closure) -> torch.Tensor | None:
    """The loss of ``closure`` evaluated with gradients on (``None`` without one), as
    ``torch.optim`` optimizers do at the start of ``step``."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def live_groups(optimizer: torch.optim.Optimizer) -> list[tuple[dict, list[torch.Tensor]]]:
    """``(group, parameters with a gradient)`` of every group that has one; raises
    ``RuntimeError`` for sparse gradients (the frozen metascale optimizers are dense)."""
    live = []
    for group in optimizer.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        if any(p.grad.is_sparse for p in params):
            raise RuntimeError(f"{type(optimizer).__name__} does not support sparse gradients")
        if params:
            live.append((group, params))
    return live


# --------------------------------------------------------------------------- higher twin
class DifferentiableLayerwise(higher.optim.DifferentiableOptimizer):
    """``higher``'s differentiable twin of :class:`LayerwiseOptimizer`.

    Registered with ``higher.register_optim`` when this module is imported, so
    ``higher.innerloop_ctx(model, LayerwiseOptimizer(...), override={"step_sizes": [...],
    "scales": [...]})`` runs the same :func:`layerwise_update` out of place, with per-group
    schedule tensors that carry gradients back to the meta-parameters.
    """

    def _update(self, grouped_grads, **kwargs) -> None:
        for gi, (group, grads) in enumerate(zip(self.param_groups, grouped_grads)):
            states = [self.state[gi][pi] for pi in range(len(group["params"]))]
            t = states[0].get("step", 0)
            new_p, new_b = layerwise_update(
                group["params"], list(grads), [s.get("momentum_buffer") for s in states],
                step_size=group["lr"] * _at(group["step_sizes"], t), scale=_at(group["scales"], t),
                momentum=group["momentum"], nesterov=group["nesterov"], inplace=False)
            group["params"] = new_p
            for s, b, g in zip(states, new_b, grads):
                if g is not None:
                    s["step"] = t + 1
                if b is not None:
                    s["momentum_buffer"] = b


higher.register_optim(LayerwiseOptimizer, DifferentiableLayerwise)


def differentiable_override(optimizer: LayerwiseOptimizer, meta: dict[str, torch.Tensor]) -> dict:
    """The ``override`` dict for ``higher.innerloop_ctx``: per-group schedule tensors computed
    from ``meta`` (which may require grad).

    Where only the product ``eta * s`` matters (no momentum, or a constant ``s``: the buffer of
    one unroll is then ``s`` times that of step ``eta * s``), the product is passed as the step
    size and the scale as the number 1, which saves a pass over the gradients and keeps autograd
    from storing every inner gradient for ``d/ds``; the values are the same."""
    etas, scales = [], []
    for group in optimizer.param_groups:
        info = GroupInfo(group["role"], group["layer"], group["num_layers"])
        eta, scale, _ = folded_schedules(meta, info, group["momentum"])
        etas.append(eta)
        scales.append(scale)
    return {"step_sizes": etas, "scales": scales}


def folded_schedules(meta: dict[str, torch.Tensor], info: GroupInfo, momentum: float):
    """:func:`group_schedules` for a differentiable unroll, with ``eta * s`` folded into the
    step size where only the product matters (``momentum == 0`` or a constant ``s``).

    Returns ``(step_sizes, scales, s)``: folded, ``scales`` is ``(1.0,)`` and ``s`` the folded
    constant (a momentum buffer ``b`` of the unfolded rule is ``s`` times the folded one);
    otherwise ``s`` is ``None``."""
    eta, scale = group_schedules(meta, info)
    if momentum == 0 or len(scale) == 1:
        return eta * scale, (1.0,), scale[0]
    return eta, scale, None
