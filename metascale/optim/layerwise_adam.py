r"""A learned layer-wise schedule over Adam (``--rule layerwise-adam``): a log step size and a
log rescaling factor per parameter group (role x depth anchor) and inner step, applied to
Adam's direction.

The rescaling factor ``s_t`` is a loss scale on the group's gradient, made a step-size
multiplier for Adam by the ``1/s^2`` fold of the second moment (the loss-scaling view of
adaptive methods: docs/loss-scaling.md). At step ``t`` (``k = t + 1``) of one group:

.. math::

    m_k = \beta_1 m_{k-1} + (1-\beta_1)\, s_t g, \qquad
    v_k = \beta_2 v_{k-1} + (1-\beta_2)\, (s_t g)^2 / s_t^2, \\
    p \leftarrow p\,(1 - \eta_t \lambda) - \eta_t\,
        \frac{m_k / (1-\beta_1^k)}{\sqrt{v_k / (1-\beta_2^k)} + \epsilon},

with the schedules ``eta_t``, ``s_t`` of the layer-wise rule (interpolated over depth
anchors in log space, the last step held past the horizon). A constant ``s`` is a step size:
``eta`` and ``s`` enter the update only through ``eta * s`` (``m`` scales with ``s``, ``v``
does not). With unit meta-parameters (``eta = init_lr``, ``s = 1``) this is
``torch.optim.Adam(lr=init_lr)``, or ``torch.optim.AdamW`` with decoupled weight decay
``lambda``.

Memory: Adam's two buffers per parameter; the meta-parameters are ``2 * 2 * depth_bins * S``
numbers.
"""
from __future__ import annotations

import dataclasses


from ..config import check
from .kernels import adam, adam_, state_like
from .layerwise import ScheduleRule, at, batched_schedules, group_schedules
from .rule import GroupState, GroupUpdate


@dataclasses.dataclass(frozen=True)
class LayerwiseAdamConfig:
    """Configuration of the layer-wise Adam rule (the ``[layerwise_adam]`` table of a spec).

    Attributes:
        init_lr: Adam's step size at unit meta-parameters.
        beta1, beta2, eps: Adam's.
        weight_decay: decoupled weight decay ``lambda`` (AdamW's; scaled by the learned step size).
        per_step: one step size and rescaling factor per inner step; otherwise one per group.
        depth_bins: depth anchors (:mod:`metascale.optim.groups`).
    """

    init_lr: float = dataclasses.field(default=1e-3, metadata=check("float", 1e-8, 100.0))
    beta1: float = dataclasses.field(default=0.9, metadata=check("float", 0.0, 0.999999))
    beta2: float = dataclasses.field(default=0.999, metadata=check("float", 0.0, 0.999999))
    eps: float = dataclasses.field(default=1e-8, metadata=check("float", 1e-30, 1.0))
    weight_decay: float = dataclasses.field(default=0.0, metadata=check("float", 0.0, 10.0))
    per_step: bool = dataclasses.field(default=True, metadata=check("bool"))
    depth_bins: int = dataclasses.field(default=3, metadata=check("int", 1, 64))


class LayerwiseAdamRule(ScheduleRule):
    """The layer-wise Adam rule (see the module doc)."""

    name = "layerwise-adam"
    config_type = LayerwiseAdamConfig
    table = "layerwise_adam"
    buffers = ("exp_avg", "exp_avg_sq")
    summary = ("a learned step size and rescaling factor per layer and inner step over Adam's direction "
               "(spec table [layerwise_adam]); Adam's two buffers per parameter")

    def bind(self, meta, config, infos, *, differentiable):
        """The ``(eta, s)`` schedules of every group: float tuples frozen, tensors otherwise."""
        if differentiable:  # tuples of 0-dim tensors: indexed per step without an op
            eta, scale = batched_schedules(meta, infos)
            return config, [(e.unbind(), sc.unbind()) for e, sc in zip(eta.unbind(), scale.unbind())]
        meta = {k: v.detach().double().cpu() for k, v in meta.items()}
        return config, [tuple(tuple(x.tolist()) for x in group_schedules(meta, i)) for i in infos]

    def step(self, bound, views, *, total_steps, inplace):
        cfg, schedules = bound
        out = []
        for v in views:
            t = v.state.step
            eta, s = (at(x, t) for x in schedules[v.index])
            eta = eta if isinstance(v.lr, float) and v.lr == 1.0 else v.lr * eta
            live = [i for i, g in enumerate(v.grads) if g is not None]
            ms = list(v.state.buffers.get("exp_avg") or [None] * len(v.params))
            vs = list(v.state.buffers.get("exp_avg_sq") or [None] * len(v.params))
            ps, gs = [v.params[i] for i in live], [v.grads[i] for i in live]
            kw = dict(step=t + 1, beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps, weight_decay=cfg.weight_decay)
            new_p = list(v.params)
            if inplace:
                for i in live:
                    if ms[i] is None:
                        ms[i], vs[i] = state_like(v.params[i]), state_like(v.params[i])
                adam_(ps, gs, [ms[i] for i in live], [vs[i] for i in live], lr=float(eta), scale=float(s),
                      foreach=v.foreach, **kw)
            else:
                live_p, live_m, live_v = adam(ps, gs, [ms[i] for i in live], [vs[i] for i in live], lr=eta, scale=s,
                                              **kw)
                for i, p, m, w in zip(live, live_p, live_m, live_v):
                    new_p[i], ms[i], vs[i] = p, m, w
            out.append(GroupUpdate(new_p, GroupState(t + 1, {"exp_avg": ms, "exp_avg_sq": vs}, {}), eta, s))
        return out
