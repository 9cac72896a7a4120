"""A mixture of task families, each drawn with a weight: one meta-training distribution over
several kinds of problems (datasets, architectures, weight scales).

.. code-block:: toml

    [family]
    name = "mixture"
    members = ["mnist", "mnist_1d", "digits"]
    weights = [2, 1, 1]              # drawn with probability weight / sum(weights)
    [family.configs.mnist]           # each member's own table (its defaults when absent)
    resolution = 8
    width = [16, 32]

A draw first picks a member with the task's generator, then lets the member sample and build
its task from the same generator, so a draw is as reproducible as the member's own. The
sampled config records the member (``{"member": name, ...}``).
"""
from __future__ import annotations

import dataclasses

import torch

from ..config import check, from_table


@dataclasses.dataclass(frozen=True)
class MixtureConfig:
    """The members, their weights and their tables.

    Attributes:
        members: family names (from ``metascale.tasks.FAMILIES``; not ``mixture``).
        weights: one positive weight per member.
        configs: ``{member: table}``, each validated by the member's config class.
    """

    members: tuple = dataclasses.field(default=("sine",), metadata=check("str_list", choices=()))
    weights: tuple = dataclasses.field(default=(1.0,), metadata=check("float_list", 1e-6, 1e6))
    configs: dict = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        """Raise ``ValueError`` for a weight count that differs from the member count or a
        table of a family that is not a member."""
        if len(self.weights) != len(self.members):
            raise ValueError(f"{len(self.weights)} weights for {len(self.members)} members")
        if not isinstance(self.configs, dict) or any(not isinstance(v, dict) for v in self.configs.values()):
            raise ValueError("configs must map member names to tables")
        extra = [k for k in self.configs if k not in self.members]
        if extra:
            raise ValueError(f"configs for {extra[0]!r}, which is not a member")
        from . import FAMILIES  # the table this module is listed in
        for name in self.members:
            if name not in FAMILIES or name == MixtureFamily.name:
                raise ValueError(f"member {name!r} is not a task family; choose from "
                                 + ", ".join(f for f in FAMILIES if f != MixtureFamily.name))
            from_table(FAMILIES[name][1], self.configs.get(name), f"[family.configs.{name}]")


class MixtureFamily:
    """Tasks of several families, each member drawn with its weight (see the module doc)."""

    name = "mixture"
    description = "a weighted mixture of task families"

    def __init__(self, cfg: MixtureConfig):
        from . import FAMILIES  # the table this module is listed in
        self.cfg = cfg
        self.members = {}
        for name in cfg.members:
            cls, config_cls = FAMILIES[name]
            self.members[name] = cls(from_table(config_cls, cfg.configs.get(name), f"[family.configs.{name}]"))
        total = sum(cfg.weights)
        self.probs = torch.tensor([w / total for w in cfg.weights], dtype=torch.float64)

    def sample(self, g: torch.Generator, split: str) -> dict:
        """A member drawn by weight, then its own sampled configuration."""
        k = int(torch.multinomial(self.probs, 1, generator=g))
        name = self.cfg.members[k]
        return {"member": name, **self.members[name].sample(g, split)}

    def build(self, config: dict, g: torch.Generator, batch_size: int) -> dict:
        """The member's task from its part of ``config``."""
        sub = {k: v for k, v in config.items() if k != "member"}
        return self.members[config["member"]].build(sub, g, batch_size)
