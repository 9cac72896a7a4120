r"""The ``torch.func`` engine: the same K differentiable steps as :mod:`.higher_engine`,
written directly with ``torch.func.functional_call`` and ``torch.autograd.grad``.

The fast weights are a plain list of tensors; step ``t`` is

.. math::

    g_t = \nabla_p \ell(f(x_t; p_t), y_t), \qquad
    (p_{t+1}, \sigma_{t+1}) = \mathrm{step}(p_t, g_t, \sigma_t;\ \text{bind}(\theta)),

the rule's one pure step (:meth:`metascale.optim.Rule.step`, out of place), which the frozen
optimizer and the ``higher`` engine also call, so the engines compute the same numbers (to
rounding). Unlike ``higher``, the state between steps is explicit (:class:`InnerState`: the
parameters and a :class:`~metascale.optim.GroupState` per parameter group), so a long unroll
can be cut into windows: pass the returned ``state`` (optionally detached, which truncates the
meta-gradient) to the next call. The state is always held in the rule's external units: a rule
that keeps its buffers in other units for speed (the layer-wise rule folds a constant ``s``
into ``eta``) converts them at the call boundaries (``Rule.enter`` / ``Rule.leave``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch
from torch import nn

from ..optim import GroupState, GroupView, group_parameters, rule_for
from ..tasks.base import Task
from .functional import ModelFunction
from .higher_engine import UnrollResult, meta_objective


@dataclasses.dataclass
class InnerState:
    """What a (truncated) unroll carries between windows.

    Attributes:
        params: fast weights, in ``model.parameters()`` order.
        groups: the rule's state per parameter group (``group_parameters`` order; ``None``
            before the first step).
        step: inner steps taken so far (indexes the minibatches and the learned loss's time).
    """

    params: list[torch.Tensor]
    groups: list[GroupState] | None = None
    step: int = 0

    def detach(self) -> "InnerState":
        """A copy whose tensors are cut from the graph (the truncation point of a window)."""
        return InnerState([p.detach() for p in self.params],
                          None if self.groups is None else [g.detach() for g in self.groups], self.step)

    def buffers(self, name: str = "momentum_buffer") -> list[torch.Tensor | None]:
        """The per-parameter buffer ``name`` of every group, concatenated in group order."""
        return [b for g in self.groups or [] for b in g.buffers.get(name, [])]


@dataclasses.dataclass
class FuncUnrollResult(UnrollResult):
    """:class:`UnrollResult` plus the final :class:`InnerState` (graph attached)."""

    state: InnerState | None = None


def init_state(task: Task, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None) -> tuple[nn.Module, InnerState]:
    """A freshly seeded model of ``task`` (``task.make_model``) and the state at step 0:
    detached copies of its parameters (no grad), no rule state."""
    model = task.make_model(device=device, dtype=dtype)
    return model, InnerState([p.detach().clone() for p in model.parameters()])


def unroll_func(task: Task, meta: dict[str, torch.Tensor], rule: Any, steps: int, *,
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

    Step ``t`` of this call is global step ``u + t``: it indexes the rule's schedules (through
    each group's step count), the minibatch ``task.train_batch(u + t)`` and the learned loss's
    step fraction ``(u + t) / total_steps`` (``total_steps`` defaults to ``steps``; pass the
    full horizon when unrolling in windows; rules that read the fraction of training done use
    it too).

    Args:
        rule: the (resolved) config of a registered rule.
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
    where = {id(p): i for i, p in enumerate(model.parameters())}
    grouped = group_parameters(model.parameters())
    index = [[where[id(p)] for p in ps] for _, ps in grouped]
    the_rule = rule_for(rule)
    bound = the_rule.bind(meta, rule, [info for info, _ in grouped], differentiable=True)
    params = list(state.params)
    groups = [the_rule.enter(bound, g, k) for k, g in enumerate(state.groups)] if state.groups is not None \
        else [GroupState(state.step) for _ in index]
    total = steps if total_steps is None else total_steps

    forward = ModelFunction(model)
    try:
        return _unroll(task, the_rule, bound, index, groups, params, forward, state.step, steps, total, objective,
                       create_graph, train_loss)
    finally:
        forward.restore()


def _unroll(task, rule, bound, index, groups, params, forward, start, steps, total, objective, create_graph,
            train_loss) -> FuncUnrollResult:
    """The loop of :func:`unroll_func` (``forward``: the skeleton model as a function)."""
    with torch.no_grad():
        trace = [float(task.loss(forward(params, task.x_val), task.y_val))]
    val_losses = []
    for t in range(start, start + steps):
        x, y = task.train_batch(t)
        with torch.enable_grad():
            params = [p if p.requires_grad else p.detach().requires_grad_() for p in params]
            pred = forward(params, x)
            loss = task.loss(pred, y) if train_loss is None else train_loss(pred, y, t / total)
            grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
        views = [GroupView(k, [params[i] for i in idx], [grads[i] for i in idx], groups[k])
                 for k, idx in enumerate(index) if any(grads[i] is not None for i in idx)]
        for view, up in zip(views, rule.step(bound, views, total_steps=total, inplace=False)):
            for i, p in zip(index[view.index], up.params):
                params[i] = p
            groups[view.index] = up.state
        val = task.loss(forward(params, task.x_val), task.y_val)
        val_losses.append(val)
        v = float(val.detach())
        trace.append(v if math.isfinite(v) else math.inf)
    groups = [rule.leave(bound, g, k) for k, g in enumerate(groups)]
    return FuncUnrollResult(meta_loss=meta_objective(val_losses, objective), val_losses=trace,
                            state=InnerState(params, groups, start + steps))
