r"""The ``torch.func`` engine: the same K differentiable steps as :mod:`.higher_engine`,
written directly with ``torch.func.functional_call`` and ``torch.autograd.grad``.

The fast weights are a plain list of tensors; step ``t`` of group ``g`` (schedules from
:func:`~metascale.optim.layerwise.group_schedules`, entry ``t`` held past the horizon) is

.. math::

    g_t = \nabla_p \ell(f(x_t; p_t), y_t), \qquad
    (p_{t+1}, b_{t+1}) = \mathrm{layerwise\_update}(p_t, g_t, b_t;\ \eta_{g,t}, s_{g,t}),

the one pure update function also used by the frozen optimizer and the ``higher`` twin, so
both engines compute the same numbers (to rounding). Unlike ``higher``, the state between
steps is explicit (:class:`InnerState`), so a long unroll can be cut into windows: pass the
returned ``state`` (optionally detached, which truncates the meta-gradient) to the next call.

The adaptive rule (:class:`~metascale.optim.AdaptiveConfig`) runs
:func:`~metascale.optim.adaptive.adaptive_step` on all groups at once instead, and carries its
per-group statistics in :attr:`InnerState.stats`; its ``fraction_done`` feature uses
``total_steps``.

Speed (static rule): where ``s`` is constant over the run (``per_step = false``) or there is no momentum,
the rule depends on ``eta`` and ``s`` only through ``eta s`` (with ``b = s b'``:
:math:`b'_t = \mu b'_{t-1} + g_t`, :math:`p_{t+1} = p_t - \eta_t s\, (b'_t \text{ or }
g_t + \mu b'_t)`), so the group runs with step size ``eta_t s`` and scale 1 on ``b'``; the
carried buffers are converted at the call boundaries, so :class:`InnerState` always holds
``b``. Then ``s g_t`` is a product with the float 1 instead of a tensor that requires grad:
autograd neither saves every inner gradient ``g_t`` for ``d/ds`` nor computes
:math:`\langle \bar g, g_t \rangle` in the backward (~7% of a meta-step for an MLP).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call

from ..optim.adaptive import AdaptiveConfig, AdaptiveStats, adaptive_step
from ..optim.groups import group_parameters
from ..optim.layerwise import LayerwiseConfig, _at, folded_schedules, layerwise_update
from ..tasks.base import Task
from .higher_engine import UnrollResult, meta_objective


@dataclasses.dataclass
class InnerState:
    """What a (truncated) unroll carries between windows.

    Attributes:
        params: fast weights, in ``model.parameters()`` order.
        bufs: momentum buffers, same order (``None``: not created yet).
        step: inner steps taken so far (indexes the schedules and the minibatches).
        stats: the adaptive rule's per-group running statistics (``None`` for the static rule).
    """

    params: list[torch.Tensor]
    bufs: list[torch.Tensor | None]
    step: int = 0
    stats: AdaptiveStats | None = None

    def detach(self) -> "InnerState":
        """A copy whose tensors are cut from the graph (the truncation point of a window)."""
        return InnerState([p.detach() for p in self.params],
                          [None if b is None else b.detach() for b in self.bufs], self.step,
                          None if self.stats is None else self.stats.detach())


@dataclasses.dataclass
class FuncUnrollResult(UnrollResult):
    """:class:`UnrollResult` plus the final :class:`InnerState` (graph attached)."""

    state: InnerState | None = None


def init_state(task: Task, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None) -> tuple[nn.Module, InnerState]:
    """A freshly seeded model of ``task`` (``task.make_model``) and the state at step 0:
    detached copies of its parameters (no grad), no momentum buffers."""
    model = task.make_model(device=device, dtype=dtype)
    params = [p.detach().clone() for p in model.parameters()]
    return model, InnerState(params, [None] * len(params), 0)


def unroll_func(task: Task, meta: dict[str, torch.Tensor], rule: LayerwiseConfig | AdaptiveConfig, steps: int, *,
                objective: str = "log_mean", device: torch.device | str | None = None,
                dtype: torch.dtype | None = None, create_graph: bool = True,
                train_loss: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] | None = None,
                state: InnerState | None = None, model: nn.Module | None = None,
                total_steps: int | None = None) -> FuncUnrollResult:
    r"""Run ``steps`` differentiable inner steps from ``state``; return the meta-loss.

    With ``state=None`` this starts from :func:`init_state` and reproduces
    :func:`~metascale.inner.higher_engine.unroll`: ``val_losses[0]`` is the validation loss
    before the first step, then one entry after each step, and the meta-loss is
    :func:`~metascale.inner.higher_engine.meta_objective` of the ``steps`` losses
    ``L_{u+1}..L_{u+steps}`` computed in this call (``u = state.step``).

    Step ``t`` of this call is global step ``u + t``: it indexes the schedules
    (:math:`\eta_{g,u+t}, s_{g,u+t}`), the minibatch ``task.train_batch(u + t)`` and the learned
    loss's step fraction ``(u + t) / total_steps`` (``total_steps`` defaults to ``steps``; pass
    the full horizon when unrolling in windows).

    Args:
        state: where to continue from. Its tensors are used as given: carried with their graph
            the windows compose into one long unroll; detached, the meta-gradient is truncated
            at the window start. Tensors without grad become fresh differentiable leaves.
        model: the module used as the functional skeleton (parameters are replaced, buffers
            used as they are); built with ``task.make_model`` when omitted.
        create_graph: ``False`` treats each inner gradient :math:`g_t` as a constant (values
            unchanged; the meta-gradient is the first-order one, no second-order graph).
        Other arguments: as in :func:`~metascale.inner.higher_engine.unroll`.
    """
    dtype = dtype or next(iter(meta.values())).dtype
    task = task.to(device=device, dtype=dtype)
    if state is None:
        built, state = init_state(task, device, dtype)
        model = built if model is None else model
    elif model is None:
        model = task.make_model(device=device, dtype=dtype)
    names = [n for n, _ in model.named_parameters()]
    where = {id(p): i for i, p in enumerate(model.parameters())}
    params, bufs = list(state.params), list(state.bufs)
    adaptive = isinstance(rule, AdaptiveConfig)
    stats = (state.stats or AdaptiveStats()) if adaptive else None
    groups, unfold, infos = [], [], []
    for info, ps in group_parameters(model.parameters()):
        if adaptive:
            infos.append(info)
            groups.append([where[id(p)] for p in ps])
            continue
        idx = [where[id(p)] for p in ps]
        eta, scale, s = folded_schedules(meta, info, rule.momentum)
        if s is not None and rule.momentum != 0:  # carried buffers b = s b': run on b' = b / s
            unfold.append((idx, s))
            for i in idx:
                bufs[i] = None if bufs[i] is None else bufs[i] / s
        groups.append((idx, eta, scale))
    total = steps if total_steps is None else total_steps

    def forward(ps: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, dict(zip(names, ps)), (x,))

    with torch.no_grad():
        trace = [float(task.loss(forward(params, task.x_val), task.y_val))]
    val_losses = []
    for t in range(state.step, state.step + steps):
        x, y = task.train_batch(t)
        with torch.enable_grad():
            params = [p if p.requires_grad else p.detach().requires_grad_() for p in params]
            pred = forward(params, x)
            loss = task.loss(pred, y) if train_loss is None else train_loss(pred, y, t / total)
            grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
        if adaptive:
            new_p, new_b, stats, _, _ = adaptive_step(
                meta, rule, infos, [[params[i] for i in idx] for idx in groups],
                [[grads[i] for i in idx] for idx in groups], [[bufs[i] for i in idx] for idx in groups],
                stats, t, total)
            for idx, gp, gb in zip(groups, new_p, new_b):
                for i, p, b in zip(idx, gp, gb):
                    params[i], bufs[i] = p, b
        for idx, eta, scale in ([] if adaptive else groups):
            new_p, new_b = layerwise_update(
                [params[i] for i in idx], [grads[i] for i in idx], [bufs[i] for i in idx],
                step_size=_at(eta, t), scale=_at(scale, t), momentum=rule.momentum,
                nesterov=rule.nesterov, inplace=False)
            for i, p, b in zip(idx, new_p, new_b):
                params[i], bufs[i] = p, b
        val = task.loss(forward(params, task.x_val), task.y_val)
        val_losses.append(val)
        v = float(val.detach())
        trace.append(v if math.isfinite(v) else math.inf)
    for idx, s in unfold:
        for i in idx:
            bufs[i] = None if bufs[i] is None else bufs[i] * s
    return FuncUnrollResult(meta_loss=meta_objective(val_losses, objective), val_losses=trace,
                            state=InnerState(params, bufs, state.step + steps, stats))
