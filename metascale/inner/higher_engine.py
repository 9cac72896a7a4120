r"""The ``higher`` engine: K differentiable steps of the learnable optimizer on one task.

The model's parameter groups are handed to ``higher`` (``higher.optim.get_diff_optim``) with
one generic differentiable optimizer, :class:`DifferentiableLearned`, which calls the rule's
pure step (:meth:`metascale.optim.Rule.step`) out of place with what the rule bound from the
meta-parameters, so the inner updates are differentiable functions of them. ``higher``
computes each inner gradient and keeps the fast weights; the model runs on them as a function
(:class:`~metascale.inner.functional.ModelFunction`, the same as the ``torch.func`` engine)
rather than through ``higher``'s patched copy of the module, which costs more than the
update on small models (docs/benchmarks.md). The meta-loss is
computed from the validation losses ``L_1..L_K`` of the true task loss after each inner step
(:func:`meta_objective`); a learned loss (if any) never enters it.

Buffers (e.g. BatchNorm running statistics) are the freshly built model's own: its forward
updates them in place as in ordinary training, and they carry no gradient (``higher``'s
patched module would not write them back at all, higher #103).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import higher
import torch

from ..optim import GroupView, group_parameters, rule_for
from ..optim.rule import read_group_state
from ..spec import ENGINES, OBJECTIVES, InnerConfig
from ..tasks.base import Task
from .functional import ModelFunction

__all__ = ["ENGINES", "OBJECTIVES", "InnerConfig", "DifferentiableLearned", "UnrollResult", "differentiable_optimizer",
           "meta_objective", "unroll"]


class _Groups(torch.optim.Optimizer):
    """The parameter groups (role x depth) that ``higher.innerloop_ctx`` copies into
    :class:`DifferentiableLearned`; it never steps itself."""

    def __init__(self, groups: list[list[torch.Tensor]]):
        super().__init__([{"params": ps} for ps in groups], {})

    def step(self, closure=None):  # pragma: no cover - never called
        raise RuntimeError("used only to hand parameter groups to higher")


class DifferentiableLearned(higher.optim.DifferentiableOptimizer):
    """``higher``'s differentiable optimizer for every rule: each step calls the rule's pure
    step out of place. Give it, as ``override``, the rule (``"rule"``), what the rule bound
    from meta-parameters that may require grad (``"bound"``) and the horizon
    (``"total_steps"``); see :func:`unroll`."""

    def _update(self, grouped_grads, **kwargs) -> None:
        groups = self.param_groups
        rule, bound, total = groups[0]["rule"], groups[0]["bound"], groups[0]["total_steps"]
        states = self.__dict__.get("_group_states")
        if states is None:  # the state higher copied from the torch.optim layout, read once
            states = self._group_states = [
                read_group_state(rule, [self.state[k][i] for i in range(len(g["params"]))])
                for k, g in enumerate(groups)]
        views = [GroupView(k, group["params"], list(grads), states[k])
                 for k, (group, grads) in enumerate(zip(groups, grouped_grads))
                 if any(g is not None for g in grads)]
        if not views:
            return
        for view, up in zip(views, rule.step(bound, views, total_steps=total, inplace=False)):
            groups[view.index]["params"] = up.params
            states[view.index] = up.state


higher.register_optim(_Groups, DifferentiableLearned)


def differentiable_optimizer(params, meta: dict[str, torch.Tensor], config: Any, total_steps: int,
                             ) -> tuple[torch.optim.Optimizer, dict]:
    """``(optimizer, override)`` for ``higher.innerloop_ctx(model, optimizer, override=override)``:
    the model's parameter groups and what the rule of ``config`` binds from ``meta`` (which may
    require grad), so that ``diffopt.step(loss)`` is the rule's step, differentiable in ``meta``."""
    grouped = group_parameters(params)
    rule = rule_for(config)
    return _Groups([ps for _, ps in grouped]), {
        "rule": [rule], "total_steps": [total_steps],
        "bound": [rule.bind(meta, config, [info for info, _ in grouped], differentiable=True)]}


def meta_objective(val_losses: list[torch.Tensor], kind: str) -> torch.Tensor:
    r"""Reduce the validation losses ``L_1..L_K`` along the run to one meta-loss.

    ``mean``: :math:`\frac1K\sum_t L_t`; ``log_mean``: :math:`\log \frac1K\sum_t L_t` (scale
    free across tasks whose losses differ by orders of magnitude); ``final``: :math:`L_K`;
    ``log_final``: :math:`\log L_K`.
    """
    if kind in ("mean", "log_mean"):
        value = torch.stack(val_losses).mean()
    elif kind in ("final", "log_final"):
        value = val_losses[-1]
    else:
        raise ValueError(f"unknown meta-objective {kind!r}; choose from {OBJECTIVES}")
    return torch.log(value) if kind.startswith("log") else value


@dataclasses.dataclass
class UnrollResult:
    """What one unroll returns: the meta-loss (a graph back to the meta-parameters when
    tracked) and the per-step validation losses as floats (``val_losses[0]`` at init)."""

    meta_loss: torch.Tensor
    val_losses: list[float]


def unroll(task: Task, meta: dict[str, torch.Tensor], rule: Any, steps: int, *,
           objective: str = "log_mean", device: torch.device | str | None = None,
           dtype: torch.dtype | None = None, track_higher_grads: bool = True,
           train_loss: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] | None = None) -> UnrollResult:
    """Train a fresh model of ``task`` for ``steps`` differentiable steps; return the meta-loss.

    Args:
        task: the inner problem; its model is built and seeded by ``task.make_model``.
        meta: meta-parameters (tensors that may require grad) of the rule.
        rule: the (resolved) config of a registered rule (:data:`metascale.optim.RULES`; e.g.
            ``spec.rule_config(name)``); rules that read the fraction of training done run it
            over ``steps``.
        steps: inner steps ``K``.
        objective: see :func:`meta_objective`.
        track_higher_grads: ``False`` evaluates without building the second-order graph
            (memory of one training step instead of ``K``).
        train_loss: a learned loss ``(pred, target, t / steps) -> scalar`` used for the inner
            training steps instead of the task's loss. The meta-loss always uses the task's
            true loss on validation data.
    """
    dtype = dtype or next(iter(meta.values())).dtype
    task = task.to(device=device, dtype=dtype)
    model = task.make_model(device=device, dtype=dtype)
    opt, override = differentiable_optimizer(model.parameters(), meta, rule, steps)
    diffopt = higher.optim.get_diff_optim(opt, model.parameters(), override=override,
                                          track_higher_grads=track_higher_grads)
    forward = ModelFunction(model)
    try:  # the initial weights are copies (higher's copy_initial_weights): no gradient to the model's init
        params = [p.detach().clone().requires_grad_() for p in model.parameters()]
        val_losses, trace = [], []
        with torch.no_grad():
            trace.append(float(task.loss(forward(params, task.x_val), task.y_val)))
        for t in range(steps):
            x, y = task.train_batch(t)
            pred = forward(params, x)
            params = diffopt.step(task.loss(pred, y) if train_loss is None else train_loss(pred, y, t / steps),
                                  params=params)
            val = task.loss(forward(params, task.x_val), task.y_val)
            val_losses.append(val)
            v = float(val.detach())
            trace.append(v if math.isfinite(v) else math.inf)
    finally:
        forward.restore()
    return UnrollResult(meta_loss=meta_objective(val_losses, objective), val_losses=trace)
