"""The exported optimizer file: one ``.safetensors`` file, no pickle.

Tensors: the rule's meta-parameters, unconstrained (e.g. ``log_step_size`` and ``log_scale``
for the layer-wise rule, the shared network for the adaptive ones), named and shaped as the
rule declares for its config and horizon (:meth:`metascale.optim.Rule.meta_shapes`).
Metadata (string -> string, JSON values):

=================  ==========================================================
``format``         ``"metascale.optimizer"``
``format_version`` ``"2"`` (version ``"1"`` files, written by release 0.1.0, still load)
``rule``           the rule's registry key (:data:`metascale.optim.RULES`)
``rule_config``    the rule's config, resolved for the horizon
``horizon``        the inner horizon ``K`` it was meta-trained on (the default ``total_steps``)
``group_mapping``  the role/depth mapping rule (:data:`~metascale.optim.MAPPING_RULE`)
``spec``           the task-distribution spec it was meta-trained on
``summary``        a meta-training summary (steps, seed, losses, wall time)
=================  ==========================================================

Version 1 had no ``horizon`` (it is the stored spec's inner horizon) and named the rule by its
config type (``rule = "adaptive"`` for both adaptive variants, ``momentum`` told them apart;
an adaptive ``rule_config`` without ``table_steps`` predates the offset table: 0).

Loading checks the header, the metadata and the declared shapes against what the stored config
and horizon imply before it reads a tensor (:mod:`metascale.safeio`), then finiteness and the
rule's own checks (e.g. ``exp`` of every stored log step size and scale), and raises
:class:`~metascale.errors.ExportFormatError` with one line for anything else.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import save_file

from ..config import from_table, to_dict
from ..errors import ExportFormatError, SpecError
from ..optim import MAPPING_RULE, RULES, GroupInfo, LearnedOptimizer, anchor_weights, group_infos, rule_for
from .. import pretrained
from ..safeio import clip_text, read_safetensors
from ..spec import MAX_HORIZON

FORMAT = "metascale.optimizer"
FORMAT_VERSION = "2"
READS = ("1", "2")
_KEYS = {"1": ("format", "format_version", "rule", "rule_config", "group_mapping", "spec", "summary"),
         "2": ("format", "format_version", "rule", "rule_config", "horizon", "group_mapping", "spec", "summary")}


@dataclasses.dataclass
class ExportedOptimizer:
    """The validated content of an exported file (``rule``: the registry key)."""

    meta: dict[str, torch.Tensor]
    rule: str
    config: Any
    spec: dict
    summary: dict
    group_mapping: dict
    horizon: int


def _stored_spec(spec: dict, where: str):
    from ..spec import spec_from_dict
    try:
        return spec_from_dict(spec, str(spec.get("name", "spec")), where, unknown_family_ok=True)
    except SpecError as e:
        raise ExportFormatError(clip_text(f"invalid {e}", 300)) from None


def save_optimizer(path: str | Path, meta: dict[str, torch.Tensor], config: Any, spec: dict, summary: dict, *,
                   horizon: int | None = None) -> Path:
    """Write meta-parameters and metadata to ``path`` (parent folders are created). The rule
    is the one ``config`` belongs to; ``horizon`` defaults to the one ``meta``'s shapes imply,
    else the spec's inner horizon."""
    path = Path(path)
    rule = rule_for(config)
    if horizon is None:
        horizon = rule.horizon_of(meta, config) or _stored_spec(spec, "spec").inner.horizon
    horizon = int(horizon)
    config = rule.resolve(config, horizon)
    tensors = {k: meta[k].detach().cpu().float().contiguous() for k in rule.meta_shapes(config, horizon)}
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "rule": rule.name,
                "rule_config": json.dumps(to_dict(config)), "horizon": str(horizon),
                "group_mapping": json.dumps(MAPPING_RULE), "spec": json.dumps(spec), "summary": json.dumps(summary)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def _json(meta: dict, key: str, path: Path) -> dict:
    try:
        value = json.loads(meta[key])
    except (ValueError, TypeError, RecursionError):  # also over-long integers, too deep nesting
        raise ExportFormatError(f"{path}: metadata {key!r} is not valid JSON (file tampered with?)") from None
    if not isinstance(value, dict):
        raise ExportFormatError(f"{path}: metadata {key!r} must be a JSON object")
    return value


def _header(path: Path, meta_str: dict, declared: dict) -> tuple:
    """Rule, config, horizon, spec, summary and mapping from the metadata, before any tensor."""
    if meta_str.get("format") != FORMAT:
        raise ExportFormatError(f"{path}: not a metascale optimizer file "
                                f"(format = {clip_text(repr(meta_str.get('format')), 60)})")
    version = meta_str.get("format_version")
    if version not in READS:
        raise ExportFormatError(f"{path}: file format version {clip_text(repr(version), 40)}; this metascale reads "
                                f"versions {', '.join(READS)}")
    missing = [k for k in _KEYS[version] if k not in meta_str]
    extra = [clip_text(k, 40) for k in meta_str if k not in _KEYS[version]][:3]
    if missing or extra:
        raise ExportFormatError(f"{path}: metadata keys {'missing ' + str(missing) if missing else ''}"
                                f"{' unexpected ' + str(extra) if extra else ''}")
    name = meta_str["rule"]
    if name not in RULES:
        raise ExportFormatError(f"{path}: unknown rule {clip_text(repr(name), 60)}; this metascale knows "
                                f"{', '.join(RULES)}")
    stored = _json(meta_str, "rule_config", path)
    spec, summary, mapping = (_json(meta_str, k, path) for k in ("spec", "summary", "group_mapping"))
    parsed = _stored_spec(spec, f"{path}: stored spec")
    stored = RULES[name].upgrade(stored, version)
    try:
        config = from_table(RULES[name].config_type, stored, "rule_config")
    except SpecError as e:
        raise ExportFormatError(clip_text(f"{path}: invalid {e}", 300)) from None
    if version == "1":  # the rule was named by its config type; the registry key follows from the config;
        # the horizon is the one the tensors imply (shapes only: "meta" tensors hold no memory), else the spec's
        rule = rule_for(config)
        shapes = {k: torch.empty(shape, device="meta") for k, (_, shape) in declared.items()}
        try:
            horizon = rule.horizon_of(shapes, config) or parsed.inner.horizon
        except (KeyError, IndexError):  # tensors missing or mis-shaped: reported below
            horizon = parsed.inner.horizon
    else:
        rule = RULES[name]
        if not rule.owns(config):
            raise ExportFormatError(f"{path}: rule_config does not fit rule {name!r}")
        text = meta_str["horizon"]
        if not (text.isdigit() and len(text) <= 9 and 1 <= int(text) <= MAX_HORIZON):
            raise ExportFormatError(f"{path}: horizon {clip_text(repr(text), 40)} is not an integer in "
                                    f"[1, {MAX_HORIZON}]")
        horizon = int(text)
    if rule.resolve(config, horizon) != config:
        raise ExportFormatError(f"{path}: rule_config is not resolved for horizon {horizon}")
    if mapping != MAPPING_RULE:
        raise ExportFormatError(f"{path}: group mapping rule differs from this metascale's (file tampered with?)")
    return rule, config, horizon, spec, summary, mapping


def read_optimizer(path: str | Path) -> ExportedOptimizer:
    """Read and validate an exported optimizer file (see the module doc), or the file of a
    pretrained optimizer's name (:mod:`metascale.pretrained`).

    Raises:
        ExportFormatError: for anything but a well-formed file of a version this release reads.
    """
    given, path = path, pretrained.resolve(path)
    if not path.exists() and isinstance(given, str) and not any(s in given for s in ("/", "\\", ".")):
        raise ExportFormatError(f"{clip_text(given, 80)}: no such file, nor a pretrained optimizer (metascale "
                                f"pretrained lists them: {', '.join(pretrained.catalog())})")
    found = {}

    def check(meta_str, declared):
        found["header"] = _header(path, meta_str, declared)
        rule, config, horizon = found["header"][:3]
        want = rule.meta_shapes(config, horizon)
        if set(declared) != set(want):
            raise ExportFormatError(f"{path}: tensors {clip_text(sorted(declared), 120)}; expected exactly "
                                    f"{list(want)}")
        for k, (dtype, shape) in declared.items():
            if dtype != torch.float32:
                raise ExportFormatError(f"{path}: tensor {k!r} has dtype {dtype}; expected float32")
            if shape != tuple(want[k]):
                raise ExportFormatError(f"{path}: tensor {k!r} has shape {clip_text(shape, 60)}; expected "
                                        f"{tuple(want[k])} for its rule_config and horizon {horizon}")

    _, tensors = read_safetensors(path, check=check)
    rule, config, horizon, spec, summary, mapping = found["header"]
    for k, t in tensors.items():
        if not torch.isfinite(t).all():
            raise ExportFormatError(f"{path}: tensor {k!r} holds non-finite values")
    problem = rule.check_meta(tensors, config)
    if problem:
        raise ExportFormatError(f"{path}: {problem}")
    return ExportedOptimizer(meta=tensors, rule=rule.name, config=config, spec=spec, summary=summary,
                             group_mapping=mapping, horizon=horizon)


def load_optimizer(path: str | Path, params: Iterable, *, lr: float = 1.0,
                   foreach: bool | None = None, total_steps: int | None = None,
                   **options) -> torch.optim.Optimizer:
    """Load an exported optimizer (a file, or a pretrained optimizer's name: ``metascale
    pretrained`` lists them) for ``params`` (any model: groups are matched by role and
    relative depth). ``lr`` multiplies every learned step size (for LR schedulers).
    ``total_steps`` is your training budget ``T`` (default: the meta-training horizon), for
    rules that read the fraction of training done. ``options``: ``weight_decay``, ``maximize``,
    ``check_finite`` (:class:`~metascale.optim.LearnedOptimizer`). Warns once when a group of
    this model maps onto (role, depth) anchors that meta-training never reached (the file's
    ``summary["never_trained"]``, shown by ``metascale info``).

    Example::

        opt = metascale.load_optimizer("runs/sine/optimizer.safetensors", model.parameters())
        for x, y in data:
            opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
    """
    exp = read_optimizer(path)
    if total_steps is not None and (not isinstance(total_steps, int) or isinstance(total_steps, bool)
                                    or total_steps < 1):
        raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
    opt = LearnedOptimizer(params, exp.meta, exp.config, total_steps=total_steps or exp.horizon, lr=lr,
                           foreach=foreach, **options)
    hit = groups_on_untrained(exp.summary, group_infos(opt))
    if hit:
        warnings.warn(f"{path}: {len(hit)} parameter group(s) of this model ({'; '.join(hit[:4])}"
                      f"{'; ...' if len(hit) > 4 else ''}) map onto (role, depth) anchors that meta-training never "
                      "reached: their learned values there are the untrained initial ones (metascale info lists "
                      "them)", UserWarning, stacklevel=2)
    return opt


def groups_on_untrained(summary: dict, infos: list[GroupInfo]) -> list[str]:
    """``"role layer i of L (depth d)"`` for every group whose depth interpolation gives weight to
    an anchor that ``summary["never_trained"]`` lists for its role."""
    nt = summary.get("never_trained") if isinstance(summary, dict) else None
    if not isinstance(nt, dict) or not nt.get("anchors") or not isinstance(nt.get("depth_bins"), int):
        return []
    dead = {(a.get("role"), a.get("anchor")) for a in nt["anchors"] if isinstance(a, dict)}
    out = []
    for info in infos:
        w = anchor_weights(info.depth, nt["depth_bins"])
        if any(w[b] > 0 and (info.role, b) in dead for b in range(len(w))):
            out.append(f"{info.role} layer {info.layer} of {info.num_layers} (depth {info.depth:.2f})")
    return out
