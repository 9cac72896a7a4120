r"""The layer-wise learnable optimizer (``--rule layerwise``): a log step size and a log
rescaling factor per parameter group (role x depth anchor), optionally one per inner step,
with heavy-ball momentum.

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

The schedules of a group at relative depth ``d`` and role ``r`` interpolate the anchors
(:func:`~metascale.optim.groups.anchor_weights` ``w``) in log space:

.. math:: \eta_{g,t} = \exp\big(\textstyle\sum_b w_b(d)\, \theta^{\eta}_{r, b, t}\big), \quad
          s_{g,t} = \exp\big(\textstyle\sum_b w_b(d)\, \theta^{s}_{r, b, t}\big),

and past the learned horizon the last step's values are held.

Memory: one momentum buffer per parameter when ``mu > 0`` (none otherwise); the
meta-parameters are ``2 * 2 * depth_bins * S`` numbers (``S = K`` with ``per_step``, else 1).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch

from ..config import check
from .groups import ROLES, GroupInfo, anchor_weights
from .kernels import heavy_ball, heavy_ball_
from .rule import GroupState, GroupUpdate, GroupView, Rule

META_NAMES = ("log_step_size", "log_scale")


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


def at(schedule, t: int):
    """Entry ``t`` of a schedule, holding the last entry past its horizon."""
    return schedule[min(t, len(schedule) - 1)]


def group_schedules(meta: dict[str, torch.Tensor], info: GroupInfo, names: Sequence[str] = META_NAMES,
                    ) -> tuple[torch.Tensor, ...]:
    r"""The ``(S,)`` schedules ``exp(sum_b w_b(d) theta[r, b, :])`` of one group, one per name
    in ``names`` (tensors of shape ``(roles, depth_bins, S)``; differentiable in ``meta``)."""
    first = meta[names[0]]
    w = torch.tensor(anchor_weights(info.depth, first.shape[1]), dtype=first.dtype, device=first.device)
    r = ROLES.index(info.role)
    return tuple(torch.exp(torch.einsum("b,bs->s", w, meta[k][r])) for k in names)


def batched_schedules(meta: dict[str, torch.Tensor], infos: Sequence[GroupInfo], names: Sequence[str] = META_NAMES,
                      ) -> tuple[torch.Tensor, ...]:
    """:func:`group_schedules` of every group at once: one ``(G, S)`` tensor per name (the
    differentiable path, where per-group small ops would dominate a tiny model's step)."""
    first = meta[names[0]]
    w = torch.tensor([anchor_weights(i.depth, first.shape[1]) for i in infos], dtype=first.dtype,
                     device=first.device)
    roles = torch.tensor([ROLES.index(i.role) for i in infos], device=first.device)
    return tuple(torch.exp((w[:, :, None] * meta[k][roles]).sum(1)) for k in names)


def schedule_shapes(per_step: bool, depth_bins: int, horizon: int, names: Sequence[str] = META_NAMES,
                    ) -> dict[str, tuple[int, int, int]]:
    """``(roles, depth_bins, S)`` for every name, ``S = horizon`` if ``per_step`` else 1."""
    return {k: (len(ROLES), depth_bins, horizon if per_step else 1) for k in names}


def schedule_lines(meta: dict[str, torch.Tensor], horizon: int) -> list[str]:
    """``metascale info`` lines: the effective step ``eta * s`` per role and depth anchor."""
    bins = meta["log_step_size"].shape[1]
    lines = [f"learned schedules over {horizon} step(s) (step size eta, rescaling factor s; effective eta*s):"]
    for r, role in enumerate(ROLES):
        for b in range(bins):
            eta, s = torch.exp(meta["log_step_size"][r, b]), torch.exp(meta["log_scale"][r, b])
            eff = (eta * s).tolist()
            show = ", ".join(f"{x:.3g}" for x in eff[:8]) + (", ..." if len(eff) > 8 else "")
            depth = b / (bins - 1) if bins > 1 else 0.0
            lines.append(f"  {role:<6} depth {depth:.2f}: eta*s = [{show}]  (mean eta {eta.mean():.3g}, "
                         f"mean s {s.mean():.3g})")
    return lines


def learned_schedules(meta: dict[str, torch.Tensor]) -> dict:
    """Step size and rescaling factor per role, ``[anchor][step]`` nested lists."""
    return {role: {"step_size": torch.exp(meta["log_step_size"][r]).tolist(),
                   "scale": torch.exp(meta["log_scale"][r]).tolist()} for r, role in enumerate(ROLES)}


def overflow(meta: dict[str, torch.Tensor], names: Sequence[str] = META_NAMES) -> str | None:
    """The first name whose ``exp`` is not finite, as a message (``None``: all finite); also the
    effective step ``exp(log_step_size + log_scale)`` (each factor finite, their product not:
    ``p - inf * g`` is NaN on the first step)."""
    for k in names:
        if not torch.isfinite(torch.exp(meta[k].float())).all():  # as a float32 factor
            return f"exp({k}) overflows"
    if len(names) == 2 and not torch.isfinite(torch.exp(meta[names[0]].double() + meta[names[1]].double()).float()).all():
        return f"the effective step exp({names[0]} + {names[1]}) overflows float32"
    return None


@dataclasses.dataclass
class _Bound:
    """Per-group schedules ``(eta, s)`` and, on the differentiable path, the constant ``s``
    folded into ``eta`` (``None`` when not folded)."""

    config: LayerwiseConfig
    schedules: list[tuple]
    folded: list[torch.Tensor | None]


class ScheduleRule(Rule):
    """What every rule with learned (role, depth anchor, step) schedules of a log step size and
    a log rescaling factor shares: the meta-parameters (unit at ``config.init_lr``, shapes from
    ``config.per_step`` and ``config.depth_bins``), their checks and their description. A
    subclass adds its config, state and step."""

    def meta_shapes(self, config, horizon):
        return schedule_shapes(config.per_step, config.depth_bins, horizon)

    def init_meta(self, config, horizon, *, seed=0, dtype=torch.float32, device=None):
        """Unit meta-parameters: ``log_step_size = log(init_lr)``, ``log_scale = 0``."""
        shapes = self.meta_shapes(config, horizon)
        return {"log_step_size": torch.full(shapes["log_step_size"], math.log(config.init_lr), dtype=dtype,
                                            device=device),
                "log_scale": torch.zeros(shapes["log_scale"], dtype=dtype, device=device)}

    def horizon_of(self, meta, config):
        return int(meta["log_step_size"].shape[-1]) if config.per_step else None

    def check_meta(self, meta, config):
        return overflow(meta)

    def anchor_axes(self, meta):
        return {k: (0, 1) for k in META_NAMES}

    def learned(self, meta):
        return learned_schedules(meta)

    def describe(self, meta, config, horizon):
        return schedule_lines(meta, meta["log_step_size"].shape[-1])


class LayerwiseRule(ScheduleRule):
    """The layer-wise rule (see the module doc)."""

    name = "layerwise"
    config_type = LayerwiseConfig
    table = "optimizer"
    buffers = ("momentum_buffer",)
    summary = ("a learned step size and rescaling factor per layer and inner step (spec table [optimizer]); "
               "one momentum buffer per parameter")

    def bind(self, meta, config, infos, *, differentiable):
        """Frozen: the schedules as float tuples. Differentiable: tensors; where only the product
        ``eta * s`` matters (no momentum, or a constant ``s``: the buffer of one unroll is then
        ``s`` times that of step ``eta * s``) the product is the step size and the scale the
        number 1, which saves a pass over the gradients and keeps autograd from storing every
        inner gradient for ``d/ds``; buffers are then kept divided by ``s`` (:meth:`enter`)."""
        if not differentiable:
            meta = {k: v.detach().double().cpu() for k, v in meta.items()}
            scheds = [tuple(tuple(x.tolist()) for x in group_schedules(meta, i)) for i in infos]
            return _Bound(config, scheds, [None] * len(infos))
        eta, scale = batched_schedules(meta, infos)
        scheds, folded = [], []
        for e, sc in zip(eta.unbind(), scale.unbind()):  # per group: tuples of 0-dim tensors, indexed per step for free
            if config.momentum == 0 or sc.shape[0] == 1:
                scheds.append(((e * sc).unbind(), (1.0,)))
                folded.append(sc[0] if config.momentum != 0 else None)
            else:
                scheds.append((e.unbind(), sc.unbind()))
                folded.append(None)
        return _Bound(config, scheds, folded)

    def enter(self, bound, state, index):
        s = bound.folded[index]
        if s is None or not state.buffers:
            return state
        return dataclasses.replace(state, buffers={k: [None if b is None else b / s for b in v]
                                                   for k, v in state.buffers.items()})

    def leave(self, bound, state, index):
        s = bound.folded[index]
        if s is None or not state.buffers:
            return state
        return dataclasses.replace(state, buffers={k: [None if b is None else b * s for b in v]
                                                   for k, v in state.buffers.items()})

    def step(self, bound, views, *, total_steps, inplace):
        cfg = bound.config
        return [heavy_ball_group(v, *(at(x, v.state.step) for x in bound.schedules[v.index]), cfg.momentum,
                                 cfg.nesterov, inplace) for v in views]


def heavy_ball_group(view: GroupView, step_size, scale, momentum: float, nesterov: bool, inplace: bool) -> GroupUpdate:
    """The heavy-ball kernel on one group's parameters that have a gradient, at step size
    ``view.lr * step_size`` and gradient scale ``scale``; the step count advances by one."""
    eta = step_size if isinstance(view.lr, float) and view.lr == 1.0 else view.lr * step_size
    bufs = view.state.buffers.get("momentum_buffer") or [None] * len(view.params)
    complete = all(g is not None for g in view.grads)
    live = range(len(view.params)) if complete else [i for i, g in enumerate(view.grads) if g is not None]
    ps, gs, bs = ((view.params, view.grads, bufs) if complete else
                  ([view.params[i] for i in live], [view.grads[i] for i in live], [bufs[i] for i in live]))
    if inplace:
        new_b = heavy_ball_(ps, gs, bs, lr=float(eta), momentum=momentum, scale=float(scale), nesterov=nesterov,
                            foreach=view.foreach, fused=True)
        new_p = view.params
    else:
        live_p, new_b = heavy_ball(ps, gs, bs, lr=eta, momentum=momentum, scale=scale, nesterov=nesterov)
        new_p = live_p if complete else list(view.params)
        if not complete:
            for i, p in zip(live, live_p):
                new_p[i] = p
    if momentum != 0 and not complete:
        new_b, kept = list(bufs), new_b
        for i, b in zip(live, kept):
            new_b[i] = b
    state = GroupState(view.state.step + 1, {"momentum_buffer": list(new_b)} if momentum != 0 else {}, {})
    return GroupUpdate(list(new_p), state, eta, scale)
