"""metascale: meta-learn layer-wise step sizes and rescaling factors; ship them as a frozen
``torch.optim.Optimizer``.

Quick use of an exported optimizer::

    import metascale
    opt = metascale.load_optimizer("runs/sine/optimizer.safetensors", model.parameters())

The names below are imported on first use, so ``import metascale`` (or loading a spec) does
not import the meta-training machinery (``higher``).
"""
from __future__ import annotations

import importlib

from .errors import CheckpointError, ExportFormatError, MetascaleError, MissingExtraError, SpecError

__version__ = "0.1.0"

_LAZY = {
    "load_optimizer": "export", "read_optimizer": "export", "save_optimizer": "export",
    "load_loss": "export", "save_loss": "export",
    "MetaTrainer": "meta",
    "AdaptiveConfig": "optim", "LayerwiseConfig": "optim", "LearnedOptimizer": "optim", "RULES": "optim",
    "load_spec": "spec", "custom_spec": "interop.custom",
}

__all__ = ["CheckpointError", "ExportFormatError", "MetascaleError", "MissingExtraError", "SpecError",
           "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'metascale' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
