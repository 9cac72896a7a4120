"""The learnable rules by name, and the few places that need to tell them apart.

=====================  ==========================================================  =====================
``--rule``             what is learned                                             per-parameter state
=====================  ==========================================================  =====================
``layerwise``          a step size and rescaling factor per (role, depth, step)    momentum buffer
``adaptive``           a shared network: layer statistics -> step size, factor     none
``adaptive-momentum``  the same network, with heavy-ball momentum                  momentum buffer
=====================  ==========================================================  =====================

Explicit ``isinstance`` dispatch, no registry: adding a rule means adding a branch here.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

import torch

from .adaptive import AdaptiveConfig, AdaptiveOptimizer, init_net
from .layerwise import LayerwiseConfig, LayerwiseOptimizer, init_meta

RULES = ("layerwise", "adaptive", "adaptive-momentum")
RuleConfig = LayerwiseConfig | AdaptiveConfig


def rule_config(spec, name: str) -> RuleConfig:
    """The config of rule ``name`` for ``spec``: its ``[optimizer]`` table for ``layerwise``;
    its ``[adaptive]`` table for ``adaptive-momentum``, with ``momentum = 0`` for ``adaptive``."""
    if name == "layerwise":
        return spec.optimizer
    if name == "adaptive":
        return dataclasses.replace(spec.adaptive, momentum=0.0, nesterov=False)
    if name == "adaptive-momentum":
        if spec.adaptive.momentum == 0:
            raise ValueError("rule adaptive-momentum needs [adaptive] momentum > 0")
        return spec.adaptive
    raise ValueError(f"unknown rule {name!r}; choose from {', '.join(RULES)}")


def rule_name(config: RuleConfig) -> str:
    """``"layerwise"``, ``"adaptive"`` or ``"adaptive-momentum"``."""
    return config.variant if isinstance(config, AdaptiveConfig) else "layerwise"


def init_rule_meta(config: RuleConfig, horizon: int, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """The untrained meta-parameters of a rule (both start as SGD at ``init_lr``)."""
    if isinstance(config, AdaptiveConfig):
        return init_net(config, seed, dtype, device)
    return init_meta(config, horizon, dtype, device)


def frozen_optimizer(params: Iterable[torch.Tensor], meta: dict[str, torch.Tensor], config: RuleConfig, *,
                     total_steps: int, lr: float = 1.0, foreach: bool | None = None) -> torch.optim.Optimizer:
    """The frozen ``torch.optim.Optimizer`` of a rule (``total_steps``: the run's budget, used
    by the adaptive rule's fraction-done feature; the layer-wise schedules ignore it)."""
    if isinstance(config, AdaptiveConfig):
        return AdaptiveOptimizer(params, meta, config, total_steps=total_steps, lr=lr, foreach=foreach)
    return LayerwiseOptimizer(params, meta, momentum=config.momentum, nesterov=config.nesterov, lr=lr,
                              foreach=foreach)
