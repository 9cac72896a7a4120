"""Learnable optimizers: pure update rules, their frozen ``torch.optim`` front end and their
differentiable ``higher`` twin."""
from .groups import MAPPING_RULE, ROLES, GroupInfo, anchor_weights, group_parameters
from .layerwise import (DifferentiableLayerwise, LayerwiseConfig, LayerwiseOptimizer,
                        differentiable_override, folded_schedules, group_schedules, init_meta,
                        layerwise_update)

__all__ = ["MAPPING_RULE", "ROLES", "GroupInfo", "anchor_weights", "group_parameters",
           "DifferentiableLayerwise", "LayerwiseConfig", "LayerwiseOptimizer",
           "differentiable_override", "folded_schedules", "group_schedules", "init_meta", "layerwise_update"]
