"""Learnable optimizers: rules behind one protocol (:mod:`.rule`), their kernels
(:mod:`.kernels`), the registry (:data:`RULES`) and the frozen ``torch.optim`` front end
(:class:`LearnedOptimizer`). The differentiable front ends live in :mod:`metascale.inner`."""
from .adaptive import AdaptiveConfig
from .adaptive_rms import RmsConfig
from .adaptive_sign import SignConfig
from .frozen import LearnedOptimizer, group_infos
from .groups import MAPPING_RULE, ROLES, GroupInfo, anchor_weights, group_parameters
from .layerwise import LayerwiseConfig
from .registry import DEFAULT_RULE, RULES, get_rule, rule_for, sgd_config, spec_tables
from .rule import GroupState, GroupUpdate, GroupView, Rule

__all__ = ["AdaptiveConfig", "RmsConfig", "SignConfig", "LayerwiseConfig", "LearnedOptimizer", "group_infos",
           "MAPPING_RULE", "ROLES", "GroupInfo", "anchor_weights", "group_parameters", "DEFAULT_RULE", "RULES", "get_rule",
           "rule_for", "sgd_config", "spec_tables", "GroupState", "GroupUpdate", "GroupView", "Rule"]
