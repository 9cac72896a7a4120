"""Checking a ``state_dict`` before a :class:`~metascale.optim.LearnedOptimizer` loads it.

A ``state_dict`` may come from another model, another rule, another exported file, or a
stranger. ``torch.optim.Optimizer.load_state_dict`` only compares the number of groups and of
parameters per group; it would then hand a buffer of the wrong size to an in-place kernel
(``torch._fused_sgd_`` writes past its end) or let file A's state drive file B's schedules.
:func:`check_state_dict` refuses, before anything is written, every ``state_dict`` that is not
one this optimizer could have produced:

* its identity (``state_dict["metascale"]``: the rule's registry key and a SHA-256 of the rule's
  config and meta-parameters, :func:`identity`) equals the optimizer's;
* the groups match in number, size and place (role, layer, layer count); every other group
  value has the kind of the optimizer's own (numbers finite, ``lr >= 0``), and keys the
  optimizer does not have (an LR scheduler's ``initial_lr``) hold plain values;
* per parameter, only ``step`` (an integer >= 0), the rule's buffers (all or none of them; real
  floating tensors of the parameter's shape, not on the ``meta`` device) and the rule's per-group statistics
  (finite numbers the rule accepts, :meth:`~metascale.optim.Rule.check_stats`).

Every refusal is a :class:`~metascale.errors.StateError` with one line. After loading,
:func:`match_buffers` gives each buffer its parameter's dtype, device and strides (a copy where
they differ), so the fused kernels only ever see buffers laid out like their parameters.
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import torch

from ..config import to_dict
from ..errors import StateError
from ..safeio import clip_text

KEY = "metascale"
"""The ``state_dict`` entry that holds the identity (:func:`identity`)."""
MAX_STEP = 2 ** 62
_PLACE = ("role", "layer", "num_layers")


def identity(rule: Any, config: Any, meta: dict[str, torch.Tensor]) -> dict[str, str]:
    """``{"rule": name, "meta_digest": hex}``: SHA-256 over the config (JSON) and every
    meta-parameter's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256(json.dumps([rule.name, to_dict(config)], sort_keys=True).encode())
    for k in sorted(meta):
        t = meta[k].detach().cpu().contiguous()
        h.update(json.dumps([k, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return {"rule": rule.name, "meta_digest": h.hexdigest()}


def _show(v: Any, limit: int) -> str:
    """``repr(v)`` on one line, cut to ``limit`` characters."""
    return clip_text(" ".join(repr(v).split()), limit)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _plain(v: Any) -> bool:
    return v is None or isinstance(v, (bool, str)) or _is_num(v)


def _same_kind(mine: Any, theirs: Any) -> bool:
    """Whether a saved group value may replace the optimizer's own value ``mine``."""
    if mine is None or isinstance(mine, bool):
        return theirs is None or isinstance(theirs, bool)
    if isinstance(mine, (int, float)):
        return _is_num(theirs)
    if isinstance(mine, str):
        return isinstance(theirs, str)
    return type(theirs) is type(mine)


def check_state_dict(optimizer: Any, state_dict: Any) -> None:
    """Raise :class:`StateError` unless ``optimizer`` (a ``LearnedOptimizer``) may load
    ``state_dict`` (see the module doc); reads only, writes nothing."""
    rule = optimizer.rule
    if not isinstance(state_dict, dict) or set(state_dict) != {"state", "param_groups", KEY}:
        keys = sorted(map(str, state_dict)) if isinstance(state_dict, dict) else type(state_dict).__name__
        raise StateError(f"not a metascale optimizer state_dict: keys {_show(keys, 80)}; expected "
                         f"['{KEY}', 'param_groups', 'state'] (saved by LearnedOptimizer.state_dict())")
    mine, theirs = optimizer.identity(), state_dict[KEY]
    if not isinstance(theirs, dict) or theirs != mine:
        if isinstance(theirs, dict) and theirs.get("rule") != mine["rule"]:
            raise StateError(f"state_dict is from an optimizer of rule {_show(theirs.get('rule'), 60)}; "
                             f"this one runs rule {mine['rule']!r}")
        raise StateError(f"state_dict is from an optimizer with other meta-parameters or config (digest "
                         f"{_show(theirs.get('meta_digest') if isinstance(theirs, dict) else theirs, 24)}, "
                         f"this one {mine['meta_digest'][:16]}...): the state of one learned optimizer cannot "
                         "drive another")
    groups, saved = optimizer.param_groups, state_dict["param_groups"]
    if not isinstance(saved, list) or len(saved) != len(groups):
        raise StateError(f"state_dict has {len(saved) if isinstance(saved, list) else 'no list of'} parameter "
                         f"group(s); this optimizer has {len(groups)} (a model of another depth?)")
    owner: dict[int, tuple[int, torch.Tensor]] = {}
    for k, (group, sg) in enumerate(zip(groups, saved)):
        if not isinstance(sg, dict) or not isinstance(sg.get("params"), list) \
                or not all(_is_int(i) for i in sg["params"]):
            raise StateError(f"state_dict parameter group {k} is not a dict with a list of integer 'params'")
        if len(sg["params"]) != len(group["params"]):
            raise StateError(f"state_dict parameter group {k} has {len(sg['params'])} parameter(s); this "
                             f"optimizer's has {len(group['params'])} (a model of another shape?)")
        for key in _PLACE:
            if key in group and sg.get(key) != group[key]:
                raise StateError(f"state_dict parameter group {k} has {key} {_show(sg.get(key), 40)}; "
                                 f"this optimizer's has {group[key]!r} (a model of another shape?)")
        for key, value in sg.items():
            if key == "params" or key in _PLACE:
                continue
            if key in group:
                ok = _same_kind(group[key], value)
            else:  # keys other tools add (LR schedulers' initial_lr, param_names): plain values only
                ok = _plain(value) or (isinstance(value, (list, tuple)) and len(value) <= 1_000_000
                                       and all(_plain(v) for v in value))
            if not ok:
                raise StateError(f"state_dict parameter group {k}: {_show(key, 40)} = "
                                 f"{_show(value, 40)} is not a value this optimizer accepts")
        if not _is_num(sg.get("lr", 0)) or sg.get("lr", 0) < 0:
            raise StateError(f"state_dict parameter group {k}: lr = {_show(sg.get('lr'), 40)}; expected a "
                             "finite number >= 0")
        for i, p in zip(sg["params"], group["params"]):
            if i in owner:
                raise StateError(f"state_dict lists parameter index {i} twice")
            owner[i] = (k, p)
    state = state_dict["state"]
    if not isinstance(state, dict):
        raise StateError("state_dict 'state' is not a dict")
    allowed = {"step", *rule.buffers, *rule.stats}
    for i, entry in state.items():
        if i not in owner:
            raise StateError(f"state_dict holds state for parameter {_show(i, 40)}, which no group lists")
        k, p = owner[i]
        if not isinstance(entry, dict):
            raise StateError(f"state_dict state of parameter {i} is not a dict")
        for key, value in entry.items():
            where = f"state_dict state of parameter {i} (group {k}, shape {tuple(p.shape)})"
            if key not in allowed:
                raise StateError(f"{where} has {_show(key, 40)}; rule {rule.name!r} keeps only "
                                 f"{sorted(allowed)}")
            if key == "step":
                if not _is_int(value) or not 0 <= value <= MAX_STEP:
                    raise StateError(f"{where}: step = {_show(value, 40)}; expected an integer >= 0")
            elif key in rule.buffers:
                _check_buffer(value, p, f"{where}: {key}")
            elif not _is_num(value):
                raise StateError(f"{where}: {key} = {_show(value, 40)}; expected a finite number")
        held = [key for key in rule.buffers if key in entry]
        if held and len(held) != len(rule.buffers):
            raise StateError(f"state_dict state of parameter {i} (group {k}) has {held} without "
                             f"{[key for key in rule.buffers if key not in entry]}; rule {rule.name!r} keeps them "
                             "together")
        problem = rule.check_stats({key: entry[key] for key in rule.stats if key in entry})
        if problem:
            raise StateError(f"state_dict state of parameter {i} (group {k}): {problem}")


def _check_buffer(value: Any, p: torch.Tensor, where: str) -> None:
    if not isinstance(value, torch.Tensor) or value.layout != torch.strided or value.is_complex() \
            or not value.is_floating_point():
        what = type(value).__name__ if not isinstance(value, torch.Tensor) else f"{value.dtype} {value.layout}"
        raise StateError(f"{where} is {what}; expected a dense real floating-point tensor")
    if value.shape != p.shape:
        raise StateError(f"{where} has shape {clip_text(tuple(value.shape), 60)}; expected the parameter's "
                         f"{tuple(p.shape)} (a state_dict of a model of another size?)")
    if value.device.type == "meta" and p.device.type != "meta":
        raise StateError(f"{where} is on the meta device (holds no values)")


LOW_PRECISION = (torch.float16, torch.bfloat16)


def match_buffers(optimizer: Any, loaded: dict | None = None) -> None:
    """Give every buffer its parameter's dtype, device and strides (a copy where they differ),
    except that a float32 buffer of a float16/bfloat16 parameter stays float32 (the moments of
    :func:`~metascale.optim.kernels.state_like`). ``loaded``: the ``state_dict`` just loaded;
    ``torch.optim`` casts its buffers to the parameters' dtype, so float32 moments of
    low-precision parameters are taken from it again, unrounded."""
    wide = {}
    if loaded is not None:
        saved = [i for g in loaded["param_groups"] for i in g["params"]]
        for index, p in zip(saved, (p for g in optimizer.param_groups for p in g["params"])):
            entry = loaded["state"].get(index, {})
            if p.dtype in LOW_PRECISION:
                wide[p] = {k: v for k, v in entry.items()
                           if k in optimizer.rule.buffers and isinstance(v, torch.Tensor) and v.dtype == torch.float32}
    for group in optimizer.param_groups:
        for p in group["params"]:
            entry = optimizer.state.get(p)
            if not entry:
                continue
            for key in optimizer.rule.buffers:
                b = wide.get(p, {}).get(key, entry.get(key))
                if not isinstance(b, torch.Tensor):
                    continue
                dtype = torch.float32 if p.dtype in LOW_PRECISION and b.dtype == torch.float32 else p.dtype
                if b.dtype != dtype or b.device != p.device or b.stride() != p.stride() or key in wide.get(p, {}):
                    entry[key] = torch.empty_like(p, dtype=dtype).copy_(b)
