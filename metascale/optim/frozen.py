"""The frozen learned optimizer: one drop-in ``torch.optim.Optimizer`` for every rule.

Build it from meta-parameters (usually through :func:`metascale.load_optimizer`)::

    opt = LearnedOptimizer(model.parameters(), meta, config, total_steps=1000)

Parameters are grouped by role and relative depth (:mod:`metascale.optim.groups`), and every
step calls the rule's pure step (:meth:`~metascale.optim.rule.Rule.step`) in place, the same
function the differentiable inner loops call out of place. ``lr`` (default 1) multiplies
every learned step size, so ``torch.optim.lr_scheduler`` works on top; ``total_steps`` is the
training budget ``T`` (rules that read the fraction of training done use it; the default is the
meta-training horizon when loaded from a file).

State, in ``torch.optim``'s layout: per parameter, the rule's buffers (e.g.
``momentum_buffer``) and ``step``; the rule's per-group statistics in the state of the group's
first parameter. After each step every group holds the step size and rescaling factor it used
in ``group["last_step_size"]`` and ``group["last_scale"]`` (floats; for reports and logging).
The meta-parameters (``opt.meta``) and what the rule derived from them (``opt.bound``: e.g. each
group's step-size and rescaling-factor schedules for the layer-wise rule, the network for the
adaptive ones) are held on the optimizer, not in its ``state_dict``.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from .groups import GroupInfo, group_parameters
from .registry import rule_for
from .rule import GroupView, read_group_state, write_group_state
from .statedict import KEY, check_state_dict, identity, match_buffers


class LearnedOptimizer(torch.optim.Optimizer):
    """A meta-trained rule, frozen: see the module doc."""

    def __init__(self, params: Iterable[torch.Tensor], meta: dict[str, torch.Tensor], config: Any, *,
                 total_steps: int, lr: float = 1.0, foreach: bool | None = None):
        if not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr < 0:
            raise ValueError(f"Invalid learning rate: {lr!r} (expected a finite number >= 0)")
        self.rule = rule_for(config)
        params = list(params)
        check_params(params)
        grouped = group_parameters(params)
        groups = [{"params": ps, "role": info.role, "layer": info.layer, "num_layers": info.num_layers}
                  for info, ps in grouped]
        super().__init__(groups, {"lr": lr, "foreach": foreach})
        self.config, self.total_steps = config, total_steps
        self.meta = {k: v.detach().clone() for k, v in meta.items()}
        self.bound = self.rule.bind(self.meta, config, [info for info, _ in grouped], differentiable=False)

    def identity(self) -> dict[str, str]:
        """The rule and a digest of the config and meta-parameters (:func:`.statedict.identity`),
        stored in the ``state_dict`` so that no other learned optimizer's state loads here."""
        if getattr(self, "_identity", None) is None:
            self._identity = identity(self.rule, self.config, self.meta)
        return self._identity

    def state_dict(self) -> dict:
        """``torch.optim``'s ``state_dict`` plus ``"metascale"``: this optimizer's identity."""
        return {**super().state_dict(), KEY: dict(self.identity())}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a ``state_dict`` of this optimizer (same rule, meta-parameters and model shapes);
        anything else raises :class:`~metascale.errors.StateError` before anything is written
        (:mod:`metascale.optim.statedict`)."""
        check_state_dict(self, state_dict)
        super().load_state_dict({k: v for k, v in state_dict.items() if k != KEY})
        match_buffers(self)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("foreach", None)

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimisation step (``closure`` re-evaluates the loss, as in torch.optim)."""
        loss = run_closure(closure)
        views, states = [], []
        for k, group, ps in live_groups(self):
            sts = [self.state[p] for p in ps]
            states.append(sts)
            foreach = True if group["foreach"] is None else group["foreach"]  # foreach/fused, also for one tensor
            views.append(GroupView(k, ps, [p.grad for p in ps], read_group_state(self.rule, sts), group["lr"],
                                   foreach))
        if not views:
            return loss
        for view, sts, up in zip(views, states, self.rule.step(self.bound, views, total_steps=self.total_steps,
                                                               inplace=True)):
            write_group_state(self.rule, sts, up.state)
            group = self.param_groups[view.index]
            group["last_step_size"], group["last_scale"] = up.step_size, up.scale
        return loss


def check_params(params: list) -> None:
    """``ValueError`` for parameters the rules cannot update: complex, integer or on the
    ``meta`` device (holding no values)."""
    for p in params:
        if isinstance(p, torch.Tensor) and (p.is_complex() or not p.is_floating_point() or p.device.type == "meta"):
            what = "on the meta device" if p.device.type == "meta" else f"of dtype {p.dtype}"
            raise ValueError(f"metascale optimizers update real floating-point parameters holding values; got a "
                             f"parameter of shape {tuple(p.shape)} {what}")


def group_infos(optimizer: torch.optim.Optimizer) -> list[GroupInfo]:
    """The :class:`GroupInfo` of every parameter group of a :class:`LearnedOptimizer`."""
    return [GroupInfo(g["role"], g["layer"], g["num_layers"]) for g in optimizer.param_groups]


def run_closure(closure) -> torch.Tensor | None:
    """The loss of ``closure`` evaluated with gradients on (``None`` without one), as
    ``torch.optim`` optimizers do at the start of ``step``."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def live_groups(optimizer: torch.optim.Optimizer) -> list[tuple[int, dict, list[torch.Tensor]]]:
    """``(index, group, parameters with a gradient)`` of every group that has one; raises
    ``RuntimeError`` for sparse gradients (the frozen metascale optimizer is dense)."""
    live = []
    for k, group in enumerate(optimizer.param_groups):
        params = [p for p in group["params"] if p.grad is not None]
        if any(p.grad.is_sparse for p in params):
            raise RuntimeError(f"{type(optimizer).__name__} does not support sparse gradients")
        if params:
            live.append((k, group, params))
    return live
