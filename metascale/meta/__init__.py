"""The outer meta-trainer."""
from .trainer import MetaConfig, MetaTrainer, MetaResult, resolve_device

__all__ = ["MetaConfig", "MetaTrainer", "MetaResult", "resolve_device"]
