"""The exported optimizer file: one ``.safetensors`` file, no pickle.

Tensors: the rule's meta-parameters, unconstrained: ``log_step_size`` and ``log_scale`` of
shape ``(roles, depth_bins, S)`` for the layer-wise rule; the shared network's ``w1``, ``b1``,
``w2``, ``b2``, ``wl`` and, when ``table_steps > 0``, the offset ``table``
(:func:`~metascale.optim.adaptive.net_shapes`) for the adaptive rule. An adaptive file whose
``rule_config`` has no ``table_steps`` (written before the table existed) reads as
``table_steps = 0``.
Metadata (string -> string, JSON values):

=================  ==========================================================
``format``         ``"metascale.optimizer"``
``format_version`` ``"1"``
``rule``           ``"layerwise"`` or ``"adaptive"`` (both variants; ``momentum`` tells them apart)
``rule_config``    the rule's config (:class:`~metascale.optim.LayerwiseConfig` or
                   :class:`~metascale.optim.AdaptiveConfig`)
``group_mapping``  the role/depth mapping rule (:data:`~metascale.optim.MAPPING_RULE`)
``spec``           the task-distribution spec it was meta-trained on
``summary``        a meta-training summary (steps, seed, losses, wall time)
=================  ==========================================================

Loading validates all of it and raises :class:`~metascale.errors.ExportFormatError` with a
clear message for a truncated file, another format version, missing/extra/mis-shaped tensors
or tampered metadata. ``safetensors`` parses a JSON header and raw buffers: nothing is
unpickled and no code runs.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import from_table, to_dict
from ..errors import ExportFormatError, SpecError
from ..optim.groups import MAPPING_RULE, ROLES
from ..optim.adaptive import AdaptiveConfig, net_shapes
from ..optim.layerwise import META_NAMES, LayerwiseConfig
from ..optim.rules import RuleConfig, frozen_optimizer

FORMAT = "metascale.optimizer"
FORMAT_VERSION = "1"
RULES = ("layerwise", "adaptive")
_CONFIGS = {"layerwise": LayerwiseConfig, "adaptive": AdaptiveConfig}
_KEYS = ("format", "format_version", "rule", "rule_config", "group_mapping", "spec", "summary")


@dataclasses.dataclass
class ExportedOptimizer:
    """The validated content of an exported file."""

    meta: dict[str, torch.Tensor]
    rule: str
    config: RuleConfig
    spec: dict
    summary: dict
    group_mapping: dict

    @property
    def horizon(self) -> int:
        """Length ``S`` of the learned schedules (1 when not per step); for the adaptive rule,
        the inner horizon it was meta-trained on (its default ``total_steps``)."""
        if self.rule == "adaptive":
            inner = self.spec.get("inner", {})
            return int(inner.get("steps", 20)) * int(inner.get("windows", 1))
        return int(self.meta["log_step_size"].shape[-1])


def _tensor_names(rule: str, config: RuleConfig) -> tuple[str, ...]:
    return tuple(net_shapes(config)) if rule == "adaptive" else META_NAMES


def save_optimizer(path: str | Path, meta: dict[str, torch.Tensor], config: RuleConfig,
                   spec: dict, summary: dict) -> Path:
    """Write meta-parameters and metadata to ``path`` (parent folders are created); the rule
    follows from the type of ``config``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rule = "adaptive" if isinstance(config, AdaptiveConfig) else "layerwise"
    tensors = {k: meta[k].detach().cpu().float().contiguous() for k in _tensor_names(rule, config)}
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "rule": rule,
                "rule_config": json.dumps(to_dict(config)), "group_mapping": json.dumps(MAPPING_RULE),
                "spec": json.dumps(spec), "summary": json.dumps(summary)}
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


def read_safetensors(path: Path, fmt: str | None = None, version: str | None = None) -> tuple[dict, dict]:
    """``(metadata, tensors)`` of a safetensors file; :class:`ExportFormatError` if unreadable
    or, when ``fmt``/``version`` are given, of another format or format version."""
    if not path.is_file():
        raise ExportFormatError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for corrupt input
        raise ExportFormatError(f"{path}: not a readable safetensors file (truncated or corrupted?): "
                                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if fmt is not None and meta.get("format") != fmt:
        what = fmt.split(".")[-1]
        raise ExportFormatError(f"{path}: not a metascale {what} file (format = {meta.get('format')!r})")
    if version is not None and meta.get("format_version") != version:
        raise ExportFormatError(f"{path}: file format version {meta.get('format_version')!r}; this metascale "
                                f"reads version {version!r}")
    return meta, tensors



def _check_layerwise(path: Path, tensors: dict[str, torch.Tensor], config: LayerwiseConfig) -> None:
    """Shapes and finite step sizes of the layer-wise rule's schedules."""
    shape = tensors["log_step_size"].shape
    for k, t in tensors.items():
        if t.dim() != 3 or t.shape != shape or t.shape[0] != len(ROLES) or t.shape[1] != config.depth_bins \
                or t.shape[2] < 1 or (not config.per_step and t.shape[2] != 1):
            raise ExportFormatError(f"{path}: tensor {k!r} has shape {tuple(t.shape)}; expected "
                                    f"({len(ROLES)}, {config.depth_bins}, S) with S >= 1 (S = 1 unless per_step), "
                                    "the same for all tensors")
    if not all(math.isfinite(x) for x in torch.exp(tensors["log_step_size"]).flatten().tolist()):
        raise ExportFormatError(f"{path}: step sizes overflow")


def read_optimizer(path: str | Path) -> ExportedOptimizer:
    """Read and validate an exported optimizer file.

    Raises:
        ExportFormatError: for anything but a well-formed file of this format version.
    """
    path = Path(path)
    meta_str, tensors = read_safetensors(path, FORMAT, FORMAT_VERSION)
    missing = [k for k in _KEYS if k not in meta_str]
    extra = [k for k in meta_str if k not in _KEYS]
    if missing or extra:
        raise ExportFormatError(f"{path}: metadata keys {'missing ' + str(missing) if missing else ''}"
                                f"{' unexpected ' + str(extra) if extra else ''}")
    rule = meta_str["rule"]
    if rule not in RULES:
        raise ExportFormatError(f"{path}: unknown rule {rule!r}; this metascale knows {', '.join(RULES)}")
    stored = _json(meta_str, "rule_config", path)
    if rule == "adaptive":  # files written before the offset table existed have none
        stored.setdefault("table_steps", 0)
    try:
        config = from_table(_CONFIGS[rule], stored, "rule_config")
    except SpecError as e:
        raise ExportFormatError(f"{path}: invalid {e}") from None
    spec, summary, mapping = (_json(meta_str, k, path) for k in ("spec", "summary", "group_mapping"))
    from ..spec import spec_from_dict  # local: the spec module imports the whole pipeline
    try:
        spec_from_dict(spec, str(spec.get("name", "spec")), f"{path}: stored spec", unknown_family_ok=True)
    except SpecError as e:
        raise ExportFormatError(f"invalid {e}") from None
    if mapping != MAPPING_RULE:
        raise ExportFormatError(f"{path}: group mapping rule differs from this metascale's (file tampered with?)")
    names = _tensor_names(rule, config)
    if set(tensors) != set(names):
        raise ExportFormatError(f"{path}: tensors {sorted(tensors)}; expected exactly {list(names)}")
    for k, t in tensors.items():
        if t.dtype != torch.float32:
            raise ExportFormatError(f"{path}: tensor {k!r} has dtype {t.dtype}; expected float32")
        if not torch.isfinite(t).all():
            raise ExportFormatError(f"{path}: tensor {k!r} holds non-finite values")
    if rule == "adaptive":
        for k, want in net_shapes(config).items():
            if tuple(tensors[k].shape) != want:
                raise ExportFormatError(f"{path}: tensor {k!r} has shape {tuple(tensors[k].shape)}; expected {want} "
                                        f"(hidden = {config.hidden}, table_steps = {config.table_steps}, "
                                        f"depth_bins = {config.depth_bins})")
    else:
        _check_layerwise(path, tensors, config)
    return ExportedOptimizer(meta=tensors, rule=rule, config=config, spec=spec, summary=summary,
                             group_mapping=mapping)


def load_optimizer(path: str | Path, params: Iterable[torch.Tensor], *, lr: float = 1.0,
                   foreach: bool | None = None, total_steps: int | None = None) -> torch.optim.Optimizer:
    """Load an exported optimizer for ``params`` (any model: groups are matched by role and
    relative depth). ``lr`` multiplies every learned step size (for LR schedulers).
    ``total_steps`` is your training budget ``T`` for the adaptive rule (its fraction-done
    feature; default: the meta-training horizon); the layer-wise rule ignores it.

    Example::

        opt = metascale.load_optimizer("runs/sine/optimizer.safetensors", model.parameters())
        for x, y in data:
            opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
    """
    exp = read_optimizer(path)
    if total_steps is not None and (not isinstance(total_steps, int) or total_steps < 1):
        raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
    return frozen_optimizer(params, exp.meta, exp.config, total_steps=total_steps or exp.horizon, lr=lr,
                            foreach=foreach)
