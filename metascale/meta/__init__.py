"""The outer meta-trainer."""
from ..spec import MetaConfig
from .trainer import MetaResult, MetaTrainer, resolve_device

__all__ = ["MetaConfig", "MetaTrainer", "MetaResult", "resolve_device"]
