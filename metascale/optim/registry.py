"""Every rule by name: the one place that knows the names.

The command line's ``--rule`` choices, the spec's rule tables, the trainer, the export format,
checkpoints, ``metascale info`` and the frozen optimizer all read :data:`RULES`. Adding a rule
is one file in this package and one entry here.
"""
from __future__ import annotations

from typing import Any

from .adaptive import AdaptiveRule
from .adaptive_rms import AdaptiveRmsRule
from .adaptive_sign import AdaptiveSignRule
from .layerwise import LayerwiseRule
from .layerwise_adam import LayerwiseAdamRule
from .rule import Rule

RULES: dict[str, Rule] = {r.name: r for r in (
    LayerwiseRule(),
    AdaptiveRule("adaptive", with_momentum=False),
    AdaptiveRule("adaptive-momentum", with_momentum=True),
    AdaptiveSignRule(),
    AdaptiveRmsRule(),
    LayerwiseAdamRule(),
)}
DEFAULT_RULE = "layerwise"
"""What ``metascale meta-train`` and ``scripts/run.sh`` meta-train when no rule is named."""


def get_rule(name: str) -> Rule:
    """The rule called ``name``; ``ValueError`` naming the choices otherwise."""
    if name not in RULES:
        raise ValueError(f"unknown rule {name!r}; choose from {', '.join(RULES)}")
    return RULES[name]


def rule_for(config: Any) -> Rule:
    """The rule a (resolved) config belongs to; ``TypeError`` for a config of no rule."""
    for rule in RULES.values():
        if rule.owns(config):
            return rule
    raise TypeError(f"{type(config).__name__} is the config of no registered rule")


def sgd_config(lr: float) -> Any:
    """The config of plain SGD at step size ``lr``: the layer-wise rule at unit meta-parameters
    without momentum (the inner optimizer of a learned loss trained alone)."""
    return RULES["layerwise"].config_type(init_lr=lr, momentum=0.0, per_step=False)


def spec_tables() -> dict[str, type]:
    """The spec tables the rules read, with their config types (one table may serve several
    rules)."""
    return {r.table: r.config_type for r in RULES.values()}
