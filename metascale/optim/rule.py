r"""The ``Rule`` protocol: what a learnable optimizer is, whatever drives it.

A rule is one object (one file in :mod:`metascale.optim`, one line in
:data:`metascale.optim.registry.RULES`). It

* names its config type and the spec table it reads (``config_type``, ``table``);
* makes its meta-parameters from the config and the horizon ``K`` of meta-training
  (:meth:`Rule.init_meta`, :meth:`Rule.meta_shapes`; :meth:`Rule.resolve` fills settings that
  follow from ``K``);
* names its state: per-parameter ``buffers`` and per-group ``stats``, carried in a
  :class:`GroupState` per parameter group;
* holds one pure step, :meth:`Rule.step`, on views of the live groups, in place (the frozen
  ``torch.optim`` front end, floats) or out of place (``higher`` and ``torch.func``, tensors
  that carry gradients to the meta-parameters), built on :mod:`metascale.optim.kernels`;
* declares how its meta-parameters are grouped for the meta-optimizer
  (:meth:`Rule.meta_groups`) and how ``metascale info`` describes them (:meth:`Rule.describe`).

As in learned_optimization's ``LearnedOptimizer.opt_fn(theta)``, the outer loop never looks
inside the meta-parameters: :meth:`Rule.bind` turns them into whatever the step needs for a
given model's groups (schedules, a network), once per run.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch

from .groups import GroupInfo

Number = float | torch.Tensor


@dataclasses.dataclass
class GroupState:
    """What one parameter group carries between steps.

    Attributes:
        step: steps this group has taken (it indexes the rule's schedules).
        buffers: per-parameter tensors by name (e.g. ``momentum_buffer``), aligned with the
            group's parameters; ``None`` where not created yet.
        stats: per-group scalars by name (floats on the frozen path, 0-dim tensors on the
            differentiable one).
    """

    step: int = 0
    buffers: dict[str, list[torch.Tensor | None]] = dataclasses.field(default_factory=dict)
    stats: dict[str, Number] = dataclasses.field(default_factory=dict)

    def detach(self) -> "GroupState":
        """A copy whose tensors are cut from the graph."""
        cut = lambda x: x.detach() if isinstance(x, torch.Tensor) else x
        return GroupState(self.step, {k: [None if b is None else b.detach() for b in v] for k, v in self.buffers.items()},
                          {k: cut(v) for k, v in self.stats.items()})


@dataclasses.dataclass
class GroupView:
    """One live group at one step: its index among the model's groups, parameters, gradients
    (``None``: this parameter has none), state, and the global step-size multiplier ``lr``."""

    index: int
    params: list[torch.Tensor]
    grads: list[torch.Tensor | None]
    state: GroupState
    lr: Number = 1.0
    foreach: bool = True


@dataclasses.dataclass
class GroupUpdate:
    """What :meth:`Rule.step` returns per view: new parameters and state, and the step size and
    rescaling factor it used (for reports)."""

    params: list[torch.Tensor]
    state: GroupState
    step_size: Number
    scale: Number


class Rule:
    """Base class of the rules; see the module doc. Subclasses set the class attributes and
    implement the methods that raise ``NotImplementedError``."""

    name: str = ""
    config_type: type = object
    table: str = ""
    buffers: tuple[str, ...] = ()
    stats: tuple[str, ...] = ()
    summary: str = ""  # one line for ``--help`` and ``metascale info``

    # ------------------------------------------------------------------ config
    def config_from(self, config: Any) -> Any:
        """This rule's config from its spec table's config (e.g. a variant fixes a field).
        Raises ``ValueError`` when the table does not suit the rule."""
        return config

    def upgrade(self, stored: dict, version: str) -> dict:
        """A config stored by export format ``version`` as this release's config table."""
        return stored

    def owns(self, config: Any) -> bool:
        """Whether ``config`` (a resolved config) is one of this rule's."""
        return type(config) is self.config_type

    def resolve(self, config: Any, horizon: int) -> Any:
        """``config`` with the settings that follow from the meta-training horizon filled in."""
        return config

    # ------------------------------------------------------------------ meta-parameters
    def meta_shapes(self, config: Any, horizon: int) -> dict[str, tuple[int, ...]]:
        """Name and shape of every meta-parameter tensor."""
        raise NotImplementedError

    def init_meta(self, config: Any, horizon: int, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                  device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """The untrained meta-parameters."""
        raise NotImplementedError

    def horizon_of(self, meta: dict[str, torch.Tensor], config: Any) -> int | None:
        """The meta-training horizon that ``meta``'s shapes imply (``None``: they imply none,
        e.g. a network that applies to any horizon)."""
        return None

    def meta_groups(self, meta: dict[str, torch.Tensor], lr: float, net_lr: float) -> list[dict]:
        """Param groups of the meta-optimizer (Adam): log-space quantities at ``lr`` by default."""
        return [{"params": list(meta.values()), "lr": lr}]

    def check_meta(self, meta: dict[str, torch.Tensor], config: Any) -> str | None:
        """What is wrong with finite, well-shaped stored meta-parameters (``None``: nothing),
        e.g. a step size whose ``exp`` overflows."""
        return None

    def check_stats(self, stats: dict[str, Any]) -> str | None:
        """What is wrong with finite per-group statistics loaded from a ``state_dict``
        (``None``: nothing), e.g. a negative mean square."""
        return None

    def anchor_axes(self, meta: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
        """The meta-parameter tensors that hold entries per (role, depth anchor), each with the
        axes of role and anchor (``{}``: none, e.g. a network shared by every layer). Meta-training
        records which anchors never received a meta-gradient (:func:`never_trained`)."""
        return {}

    def learned(self, meta: dict[str, torch.Tensor]) -> dict | None:
        """The learned values worth a line of ``metrics.jsonl`` per meta-step (``None``: none
        that do not depend on the training state)."""
        return None

    def describe(self, meta: dict[str, torch.Tensor], config: Any, horizon: int) -> list[str]:
        """Lines for ``metascale info``."""
        return []

    # ------------------------------------------------------------------ the step
    def bind(self, meta: dict[str, torch.Tensor], config: Any, infos: Sequence[GroupInfo], *,
             differentiable: bool) -> Any:
        """What :meth:`step` needs for a model whose groups are ``infos``, computed once from the
        meta-parameters (floats for the frozen path; tensors in ``meta``'s graph otherwise)."""
        raise NotImplementedError

    def step(self, bound: Any, views: list[GroupView], *, total_steps: int, inplace: bool) -> list[GroupUpdate]:
        """One step of every live group (``views``). In place: parameters and buffers are updated
        under ``no_grad``; else new tensors are returned and the inputs are untouched."""
        raise NotImplementedError

    def enter(self, bound: Any, state: GroupState, index: int) -> GroupState:
        """Convert a carried state into the units :meth:`step` keeps for ``bound`` (identity
        unless the rule folds factors, see the layer-wise rule)."""
        return state

    def leave(self, bound: Any, state: GroupState, index: int) -> GroupState:
        """The inverse of :meth:`enter`."""
        return state


# --------------------------------------------------------------------------- state <-> torch.optim layout
def read_group_state(rule: Rule, param_states: list[dict]) -> GroupState:
    """A :class:`GroupState` from per-parameter state dicts (``torch.optim``'s and ``higher``'s
    layout): buffers from each parameter's dict, ``step`` and stats from the first one's."""
    first = param_states[0]
    return GroupState(int(first.get("step", 0)),
                      {k: [st.get(k) for st in param_states] for k in rule.buffers},
                      {k: first[k] for k in rule.stats if k in first})


def write_group_state(rule: Rule, param_states: list[dict], state: GroupState) -> None:
    """Store ``state`` in per-parameter state dicts (the inverse of :func:`read_group_state`)."""
    for k, bufs in state.buffers.items():
        for st, b in zip(param_states, bufs):
            if b is not None:
                st[k] = b
    for st in param_states:
        st["step"] = state.step
    param_states[0].update(state.stats)


def never_trained(rule: Rule, touched: dict[str, torch.Tensor]) -> dict:
    """What meta-training never reached, from ``touched`` (per meta-parameter tensor, whether each
    entry ever received a non-zero meta-gradient): the count of untouched entries per tensor, and
    the (role, depth anchor) pairs none of whose entries in :meth:`Rule.anchor_axes` was touched
    (e.g. the middle anchor of three when every meta-training model had two layers). JSON-able,
    for the export summary; :func:`metascale.export.load_optimizer` warns when a model maps there."""
    from .groups import ROLES
    out = {"entries": {k: int((~t).sum()) for k, t in touched.items()},
           "sizes": {k: t.numel() for k, t in touched.items()}, "anchors": [], "depth_bins": None}
    axes = rule.anchor_axes(touched)
    reached = None
    for k, (ra, ba) in axes.items():
        per = touched[k].movedim((ra, ba), (0, 1))
        per = per.reshape(per.shape[0], per.shape[1], -1).any(-1)
        reached = per if reached is None else reached | per
    if reached is not None:
        bins = reached.shape[1]
        out["depth_bins"] = bins
        out["anchors"] = [{"role": ROLES[r], "anchor": b, "depth": b / (bins - 1) if bins > 1 else 0.0}
                          for r in range(reached.shape[0]) for b in range(bins) if not reached[r, b]]
    return out
