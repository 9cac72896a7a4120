"""Task families and the seeded sampler.

``FAMILIES`` maps each family name to ``(family class, config class)``; a spec's family table
is validated into the config class with :func:`metascale.config.from_table` and the family is
``family_cls(cfg)``. The digits family imports scikit-learn only when it draws a task.
"""
from __future__ import annotations

from .base import Task, TaskSampler, mix_seed
from .digits import DigitsConfig, DigitsFamily
from .gaussian_mixture import GaussianMixtureConfig, GaussianMixtureFamily
from .quadratic import QuadraticConfig, QuadraticFamily
from .sine import SineConfig, SineFamily
from .teacher_mlp import TeacherMLPConfig, TeacherMLPFamily

FAMILIES: dict[str, tuple[type, type]] = {
    "sine": (SineFamily, SineConfig),
    "teacher_mlp": (TeacherMLPFamily, TeacherMLPConfig),
    "quadratic": (QuadraticFamily, QuadraticConfig),
    "gaussian_mixture": (GaussianMixtureFamily, GaussianMixtureConfig),
    "digits": (DigitsFamily, DigitsConfig),
}

__all__ = [
    "FAMILIES", "Task", "TaskSampler", "mix_seed",
    "SineFamily", "SineConfig", "TeacherMLPFamily", "TeacherMLPConfig",
    "QuadraticFamily", "QuadraticConfig", "GaussianMixtureFamily", "GaussianMixtureConfig",
    "DigitsFamily", "DigitsConfig",
]
