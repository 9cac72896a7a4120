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

The ``torch.optim`` contract: ``params`` may be tensors, ``model.named_parameters()`` pairs
(names kept in ``param_groups[i]["param_names"]``) or parameter-group dicts with options;
roles and depths are always those of all parameters in the order given. Per-group options:
``lr``, ``weight_decay`` (decoupled: after the rule's update ``p <- p (1 - lr eta_t s_t wd)``,
``eta_t s_t`` the group's learned step this step, so ``wd`` is relative to the step as AdamW's
is to its ``lr``; 0 by default, and 0 costs nothing), ``maximize`` and ``foreach``.
:meth:`LearnedOptimizer.add_param_group` places new parameters as one more layer at a relative
depth (default 1, a new head). Low precision: float16/bfloat16 parameters (also mixed with
float32 in one group) take the foreach kernels, which compute in float32 (torch's fused SGD
kernel is used for float32/float64 only, and not under ``torch.compile``); a step taken inside
an autocast region runs with autocast off. ``check_finite`` (default on) warns once when a
step leaves a parameter NaN or infinite, naming the group and step: one ``torch._foreach_norm``
over the updated parameters (one extra read of them) and one host sync per step
(benchmarks/step_cost.py measures it; ``check_finite=False`` turns it off).
"""
from __future__ import annotations

import math
import warnings
from fractions import Fraction
from typing import Any, Iterable

import torch

from .groups import ROLES, GroupInfo, group_parameters
from .registry import rule_for
from .rule import GroupView, read_group_state, write_group_state
from .statedict import KEY, check_state_dict, identity, match_buffers


class LearnedOptimizer(torch.optim.Optimizer):
    """A meta-trained rule, frozen: see the module doc."""

    def __init__(self, params: Iterable, meta: dict[str, torch.Tensor], config: Any, *,
                 total_steps: int, lr: float = 1.0, foreach: bool | None = None, weight_decay: float = 0.0,
                 maximize: bool = False, check_finite: bool = True):
        if not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr < 0:
            raise ValueError(f"Invalid learning rate: {lr!r} (expected a finite number >= 0)")
        self.rule = rule_for(config)
        params = list(params)
        check_params(params)
        self.config, self.total_steps, self.check_finite = config, total_steps, check_finite
        self.meta = {k: v.detach().clone() for k, v in meta.items()}
        self.bound, self._bound_infos, self._diverged = None, None, False
        super().__init__(place_groups(params), {"lr": lr, "foreach": foreach, "weight_decay": weight_decay,
                                                "maximize": maximize})
        self._rebind()

    def add_param_group(self, param_group: dict) -> None:
        """Add parameters, as ``torch.optim`` optimizers do (e.g. layers unfrozen mid-run).

        The new parameters are placed as one more layer at relative depth ``param_group["depth"]``
        (default 1: where a new head sits), split by role (matrix / vector) into at most two
        groups; the group's other keys (``lr``, ``weight_decay``, ``maximize``, ``foreach``)
        are its options, the optimizer's defaults otherwise. A dict that already names its
        place (``role``, ``layer``, ``num_layers``, as in ``param_groups``) is added as it is."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        if "role" in param_group:
            check_group(param_group)
            super().add_param_group(param_group)
        else:
            for group in place_new_group(param_group):
                check_group(group)
                super().add_param_group(group)
        if self.bound is not None:
            self._rebind()

    def _rebind(self) -> None:
        """Bind the meta-parameters to the current groups (again after ``add_param_group`` or a
        ``load_state_dict`` that moved a group)."""
        infos = group_infos(self)
        self.bound = self.rule.bind(self.meta, self.config, infos, differentiable=False)
        self._bound_infos = infos

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
        match_buffers(self, state_dict)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("foreach", None)
            group.setdefault("weight_decay", 0.0)
            group.setdefault("maximize", False)
        self.__dict__.setdefault("check_finite", True)
        self.__dict__.setdefault("_diverged", False)
        self.__dict__.setdefault("_bound_infos", None)

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimisation step (``closure`` re-evaluates the loss, as in torch.optim)."""
        loss = run_closure(closure)
        if group_infos(self) != self._bound_infos:
            self._rebind()
        views, states = [], []
        for k, group, ps in live_groups(self):
            sts = [self.state[p] for p in ps]
            states.append(sts)
            foreach = True if group["foreach"] is None else group["foreach"]  # foreach/fused, also for one tensor
            grads = [p.grad for p in ps]
            if group["maximize"]:
                grads = torch._foreach_neg(grads) if foreach else [torch.neg(g) for g in grads]
            views.append(GroupView(k, ps, grads, read_group_state(self.rule, sts), group["lr"], foreach))
        if not views:
            return loss
        device = views[0].params[0].device.type
        if torch.is_autocast_enabled(device):  # a step inside an autocast region: the rule's math in full precision
            with torch.autocast(device, enabled=False):
                updates = self.rule.step(self.bound, views, total_steps=self.total_steps, inplace=True)
        else:
            updates = self.rule.step(self.bound, views, total_steps=self.total_steps, inplace=True)
        for view, sts, up in zip(views, states, updates):
            write_group_state(self.rule, sts, up.state)
            group = self.param_groups[view.index]
            group["last_step_size"], group["last_scale"] = up.step_size, up.scale
            if group["weight_decay"]:  # decoupled, relative to the step the rule took
                decay = 1.0 - float(up.step_size) * float(up.scale) * group["weight_decay"]
                if view.foreach:
                    torch._foreach_mul_(view.params, decay)
                else:
                    for p in view.params:
                        p.mul_(decay)
        if self.check_finite:
            self._guard(views)
        return loss

    def _guard(self, views: list[GroupView]) -> None:
        """Warn once if a parameter became NaN or infinite: one ``torch._foreach_norm`` over the
        updated parameters (NaN and inf propagate; accumulated in float32 for float16/bfloat16, so
        only finite values beyond ~1e35 in float32 could read as infinite) and one host sync per
        step; the failing group is looked up only after a failure. (The max-abs norm never
        overflows, but torch 2.13's CPU kernel for it is 14x slower than the 2-norm.)"""
        if self._diverged:
            return
        flat = [p for v in views for p in v.params]
        low = any(p.dtype in (torch.float16, torch.bfloat16) for p in flat)
        norms = torch._foreach_norm(flat, 2, dtype=torch.float32) if low else torch._foreach_norm(flat)
        if bool(torch.stack(norms).isfinite().all()):
            return
        self._diverged = True
        i = 0
        for view in views:
            n = len(view.params)
            if not bool(torch.stack(norms[i:i + n]).isfinite().all()):
                g = self.param_groups[view.index]
                warnings.warn(f"{type(self).__name__}: parameter group {view.index} ({g['role']}, layer {g['layer']} "
                              f"of {g['num_layers']}) holds non-finite values after its step {view.state.step + 1} "
                              "(training diverged: lower lr, or check the loss); warned once",
                              RuntimeWarning, stacklevel=3)
                return
            i += n


def check_params(params: list) -> None:
    """``ValueError`` for parameters the rules cannot update: complex, integer or on the
    ``meta`` device (holding no values)."""
    for p in params:
        if isinstance(p, torch.Tensor) and (p.is_complex() or not p.is_floating_point() or p.device.type == "meta"):
            what = "on the meta device" if p.device.type == "meta" else f"of dtype {p.dtype}"
            raise ValueError(f"metascale optimizers update real floating-point parameters holding values; got a "
                             f"parameter of shape {tuple(p.shape)} {what}")


OPTIONS = ("lr", "weight_decay", "maximize", "foreach")
"""The options a parameter group may set (the optimizer's defaults otherwise)."""


def _split_named(items: list) -> tuple[list, list | None]:
    """Tensors and names of ``items``: tensors, or ``(name, tensor)`` pairs as
    ``model.named_parameters()`` yields (all named or none)."""
    named = [isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in items]
    if any(named) and not all(named):
        raise ValueError("all parameters must be (name, tensor) pairs, as model.named_parameters() gives, or none")
    if any(named):
        return [x[1] for x in items], [x[0] for x in items]
    return list(items), None


def _option_keys(group: dict, allowed: tuple[str, ...]) -> None:
    bad = [k for k in group if k not in allowed]
    if bad:
        raise ValueError(f"parameter group key {bad[0]!r} is not one of {', '.join(allowed)}")


def place_groups(params: Iterable) -> list[dict]:
    """The parameter groups of ``params``: tensors, ``(name, tensor)`` pairs
    (``model.named_parameters()``), or dicts of those with options (``OPTIONS``, e.g.
    ``[{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]``). Roles and depths are
    those of every parameter in the order given (:func:`~metascale.optim.groups.group_parameters`,
    dicts concatenated); a (role, layer) group whose parameters come from two dicts is split in two,
    each with its dict's options."""
    items = list(params)
    if not items:
        raise ValueError("optimizer got an empty parameter list")
    if any(isinstance(x, dict) for x in items):
        if not all(isinstance(x, dict) for x in items):
            raise TypeError("give parameters, (name, parameter) pairs, or parameter-group dicts, not a mix")
        users = items
    else:
        users = [{"params": items}]
    flat, owner, names = [], [], []
    for u, d in enumerate(users):
        if "params" not in d:
            raise ValueError("a parameter group dict needs a 'params' entry")
        _option_keys(d, ("params", *OPTIONS))
        ps = [d["params"]] if isinstance(d["params"], torch.Tensor) else list(d["params"])
        tensors, ns = _split_named(ps)
        flat += tensors
        owner += [u] * len(tensors)
        names += ns or [None] * len(tensors)
    if any(n is None for n in names) and any(n is not None for n in names):
        raise ValueError("all parameters must be named (named_parameters()) or none")
    where: dict[int, list[int]] = {}
    for i, p in enumerate(flat):
        where.setdefault(id(p), []).append(i)
    groups = []
    for info, ps in group_parameters(flat):
        split: dict[int, list] = {}
        for p in ps:
            i = where[id(p)].pop(0)
            split.setdefault(owner[i], []).append(p if names[i] is None else (names[i], p))
        for u, members in sorted(split.items()):
            opts = {k: v for k, v in users[u].items() if k != "params"}
            groups.append({**opts, "params": members, "role": info.role, "layer": info.layer,
                           "num_layers": info.num_layers})
    return groups


def place_new_group(group: dict) -> list[dict]:
    """The groups :meth:`LearnedOptimizer.add_param_group` adds for a user's dict: its
    parameters as one layer at relative depth ``group.get("depth", 1)``, one group per role.
    The depth is stored as ``layer / (num_layers - 1)`` with a denominator of at most 1000."""
    _option_keys(group, ("params", "depth", *OPTIONS))
    depth = group.get("depth", 1.0)
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be a number in [0, 1], got {depth!r}")
    frac = Fraction(depth).limit_denominator(1000)
    ps = [group["params"]] if isinstance(group["params"], torch.Tensor) else list(group["params"])
    tensors, names = _split_named(ps)
    if not tensors:
        raise ValueError("add_param_group got an empty parameter list")
    opts = {k: v for k, v in group.items() if k not in ("params", "depth")}
    out = []
    for role in ROLES:
        members = [p if names is None else (n, p) for n, p in zip(names or [None] * len(tensors), tensors)
                   if isinstance(p, torch.Tensor) and ("matrix" if p.dim() >= 2 else "vector") == role]
        if members:
            out.append({**opts, "params": members, "role": role, "layer": frac.numerator,
                        "num_layers": frac.denominator + 1})
    if sum(len(g["params"]) for g in out) != len(tensors):
        raise TypeError("add_param_group: every parameter must be a tensor")
    return out


def check_group(group: dict) -> None:
    """``ValueError`` for a group whose place or options the step cannot use."""
    if group.get("role") not in ROLES:
        raise ValueError(f"parameter group role {group.get('role')!r} is not one of {', '.join(ROLES)}")
    layer, n = group.get("layer"), group.get("num_layers")
    if not (isinstance(layer, int) and isinstance(n, int) and 0 <= layer < n):
        raise ValueError(f"parameter group needs integers 0 <= layer < num_layers, got {layer!r}, {n!r}")
    for key in ("lr", "weight_decay"):
        v = group.get(key, 0.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"Invalid {key}: {v!r} (expected a finite number >= 0)")
    if not isinstance(group.get("maximize", False), bool):
        raise ValueError(f"maximize must be True or False, got {group['maximize']!r}")
    if group.get("foreach") not in (None, True, False):
        raise ValueError(f"foreach must be None, True or False, got {group['foreach']!r}")


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
