"""Learnable optimizers: pure update rules, their frozen ``torch.optim`` front end and their
differentiable ``higher`` twin."""
from .adaptive import (AdaptiveConfig, AdaptiveOptimizer, DifferentiableAdaptive, adaptive_factors,
                       adaptive_features, adaptive_step)
from .groups import MAPPING_RULE, ROLES, GroupInfo, anchor_weights, group_parameters
from .layerwise import (DifferentiableLayerwise, LayerwiseConfig, LayerwiseOptimizer,
                        differentiable_override, folded_schedules, group_schedules, init_meta,
                        layerwise_update)
from .rules import RULES, frozen_optimizer, init_rule_meta, rule_config, rule_name

__all__ = ["MAPPING_RULE", "ROLES", "GroupInfo", "anchor_weights", "group_parameters",
           "DifferentiableLayerwise", "LayerwiseConfig", "LayerwiseOptimizer",
           "differentiable_override", "folded_schedules", "group_schedules", "init_meta", "layerwise_update",
           "AdaptiveConfig", "AdaptiveOptimizer", "DifferentiableAdaptive", "adaptive_factors",
           "adaptive_features", "adaptive_step", "RULES", "frozen_optimizer", "init_rule_meta", "rule_config",
           "rule_name"]
