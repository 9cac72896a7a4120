r"""The ``higher`` engine: K differentiable steps of the learnable optimizer on one task.

The frozen :class:`~metascale.optim.LayerwiseOptimizer` is handed to
``higher.innerloop_ctx`` with ``override`` holding the per-group schedules computed from the
meta-parameters, so the inner updates are differentiable functions of them. The meta-loss is
computed from the validation losses ``L_1..L_K`` of the true task loss after each inner step
(:func:`meta_objective`); a learned loss (if any) never enters it.

Buffers (e.g. BatchNorm running statistics) are not written back from the patched model
(higher #103): the inner loop uses the buffers of the freshly built model as they are; the
shipped task families have none.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import higher
import torch

from ..config import check
from ..optim.adaptive import AdaptiveConfig, AdaptiveOptimizer
from ..optim.adaptive import differentiable_override as adaptive_override
from ..optim.layerwise import LayerwiseConfig, LayerwiseOptimizer, differentiable_override
from ..tasks.base import Task

OBJECTIVES = ("mean", "log_mean", "final", "log_final")


ENGINES = ("higher", "func")


@dataclasses.dataclass(frozen=True)
class InnerConfig:
    """The ``[inner]`` table.

    Attributes:
        steps: inner steps ``K`` per window (the whole unroll when ``windows = 1``).
        batch_size: inner minibatch size.
        objective: the meta-objective (:func:`meta_objective`), per window.
        engine: ``"higher"`` (default) or ``"func"`` (``torch.func``); same rule, same numbers.
        windows: ``N``: meta-train over an inner horizon of ``N * K`` steps by backpropagating
            through windows of ``K`` steps, the inner state carried across windows and the graph
            cut between them (truncated unrolls; uses the ``func`` engine, which carries state).
    """

    steps: int = dataclasses.field(default=20, metadata=check("int", 1, 10_000))
    batch_size: int = dataclasses.field(default=10, metadata=check("int", 1, 1_000_000))
    objective: str = dataclasses.field(default="log_mean", metadata=check("str", choices=OBJECTIVES))
    engine: str = dataclasses.field(default="higher", metadata=check("str", choices=ENGINES))
    windows: int = dataclasses.field(default=1, metadata=check("int", 1, 1_000_000))

    @property
    def horizon(self) -> int:
        """Inner steps per task in meta-training: ``windows * steps``."""
        return self.windows * self.steps


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


def unroll(task: Task, meta: dict[str, torch.Tensor], rule: LayerwiseConfig | AdaptiveConfig, steps: int, *,
           objective: str = "log_mean", device: torch.device | str | None = None,
           dtype: torch.dtype | None = None, track_higher_grads: bool = True,
           train_loss: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] | None = None) -> UnrollResult:
    """Train a fresh model of ``task`` for ``steps`` differentiable steps; return the meta-loss.

    Args:
        task: the inner problem; its model is built and seeded by ``task.make_model``.
        meta: meta-parameters (tensors that may require grad) of the rule.
        rule: the rule's config: :class:`~metascale.optim.LayerwiseConfig` (momentum, nesterov)
            or :class:`~metascale.optim.AdaptiveConfig` (its ``fraction_done`` feature runs over
            ``steps``).
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
    if isinstance(rule, AdaptiveConfig):
        opt = AdaptiveOptimizer(model.parameters(), meta, rule, total_steps=steps)
        override = adaptive_override(meta, rule)
    else:
        opt = LayerwiseOptimizer(model.parameters(), meta, momentum=rule.momentum, nesterov=rule.nesterov)
        override = differentiable_override(opt, meta)
    val_losses, trace = [], []
    with higher.innerloop_ctx(model, opt, override=override, copy_initial_weights=True,
                              track_higher_grads=track_higher_grads) as (fmodel, diffopt):
        with torch.no_grad():
            trace.append(float(task.loss(fmodel(task.x_val), task.y_val)))
        for t in range(steps):
            x, y = task.train_batch(t)
            pred = fmodel(x)
            diffopt.step(task.loss(pred, y) if train_loss is None else train_loss(pred, y, t / steps))
            val = task.loss(fmodel(task.x_val), task.y_val)
            val_losses.append(val)
            v = float(val.detach())
            trace.append(v if math.isfinite(v) else math.inf)
        loss = meta_objective(val_losses, objective)
    return UnrollResult(meta_loss=loss, val_losses=trace)
