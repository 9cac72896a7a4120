"""The exported learned-loss file: one ``.safetensors`` file, no pickle.

Tensors: the loss module's ``state_dict`` (float32). Metadata (JSON values): ``format``
(``"metascale.loss"``), ``format_version`` (``"1"``), ``loss_config``
(:class:`~metascale.losses.LossConfig`), ``task_kind`` (``"regression"`` or
``"classification"``), ``spec`` and ``summary`` (with ``inner_lr``, the SGD step size the
loss was meta-trained under, when it was trained alone). :func:`load_loss` rebuilds the module
from the config and checks every tensor's name and shape before loading it.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import from_table, to_dict
from ..errors import ExportFormatError, SpecError
from ..losses import LossConfig, make_loss
from ..safeio import clip_text, read_header, read_safetensors

LOSS_FORMAT = "metascale.loss"
LOSS_FORMAT_VERSION = "1"
_KEYS = ("format", "format_version", "loss_config", "task_kind", "spec", "summary")


@dataclasses.dataclass
class ExportedLoss:
    """The validated content of an exported loss file."""

    module: torch.nn.Module
    config: LossConfig
    task_kind: str
    spec: dict
    summary: dict


def save_loss(path: str | Path, loss: torch.nn.Module, spec: dict, summary: dict) -> Path:
    """Write a learned loss module (from :func:`metascale.losses.make_loss`) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().float().contiguous() for k, v in loss.state_dict().items()}
    metadata = {"format": LOSS_FORMAT, "format_version": LOSS_FORMAT_VERSION,
                "loss_config": json.dumps(to_dict(loss.config)), "task_kind": loss.task_kind,
                "spec": json.dumps(spec), "summary": json.dumps(summary)}
    save_file(tensors, str(path), metadata=metadata)
    return path


def file_format(path: str | Path) -> str:
    """``"metascale.optimizer"`` or ``"metascale.loss"`` (or whatever the file claims)."""
    return read_header(Path(path))[0].get("format", "")


def read_loss(path: str | Path) -> ExportedLoss:
    """Read and validate an exported learned loss.

    Raises:
        ExportFormatError: for anything but a well-formed loss file of this format version.
    """
    path = Path(path)
    found = {}

    def check(meta, declared):  # the metadata and the declared tensors, before any tensor is read
        if sorted(meta) != sorted(_KEYS):
            raise ExportFormatError(f"{path}: metadata keys {clip_text(sorted(meta), 120)}; expected {sorted(_KEYS)}")
        try:
            parsed = {k: json.loads(meta[k]) for k in ("loss_config", "spec", "summary")}
        except (ValueError, RecursionError):  # JSONDecodeError, over-long integers, too deep nesting
            raise ExportFormatError(f"{path}: metadata is not valid JSON (file tampered with?)") from None
        if not all(isinstance(v, dict) for v in parsed.values()):
            raise ExportFormatError(f"{path}: metadata values must be JSON objects")
        try:
            # files written before LossConfig.scale_free existed were trained on raw values
            config = from_table(LossConfig, {"scale_free": False, **parsed["loss_config"]}, "loss_config")
        except SpecError as e:
            raise ExportFormatError(clip_text(f"{path}: invalid {e}", 300)) from None
        if meta["task_kind"] not in ("regression", "classification"):
            raise ExportFormatError(f"{path}: task_kind {clip_text(repr(meta['task_kind']), 40)}; expected "
                                    "regression or classification")
        module = make_loss(meta["task_kind"], config)
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        got = {k: shape for k, (_, shape) in declared.items()}
        if got != expected:
            raise ExportFormatError(f"{path}: tensors {clip_text(sorted(got.items()), 160)}; expected "
                                    f"{sorted(expected.items())}")
        bad = [k for k, (dtype, _) in declared.items() if dtype != torch.float32]
        if bad:
            raise ExportFormatError(f"{path}: tensor {bad[0]!r} must be finite float32")
        found.update(parsed=parsed, config=config, module=module)

    meta, tensors = read_safetensors(path, LOSS_FORMAT, LOSS_FORMAT_VERSION, check=check)
    parsed, config, module = found["parsed"], found["config"], found["module"]
    for k, t in tensors.items():
        if not torch.isfinite(t).all():
            raise ExportFormatError(f"{path}: tensor {k!r} must be finite float32")
    module.load_state_dict(tensors)
    module.requires_grad_(False).eval()
    return ExportedLoss(module=module, config=config, task_kind=meta["task_kind"], spec=parsed["spec"],
                        summary=parsed["summary"])


def load_loss(path: str | Path) -> torch.nn.Module:
    """Load an exported learned loss as an ``nn.Module``: ``loss(pred, target, step_fraction)``.

    ``step_fraction`` is the fraction of training done (``t / T``, default 0); the module's
    parameters are frozen. Example::

        loss_fn = metascale.load_loss("runs/sine-loss/loss.safetensors")
        loss_fn(model(x), y, step / total_steps).backward()
    """
    return read_loss(path).module
