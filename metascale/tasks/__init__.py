"""Task families and the seeded sampler.

``FAMILIES`` maps each family name to ``(family class, config class)``; a spec's family table
is validated into the config class with :func:`metascale.config.from_table` and the family is
``family_cls(cfg)``. The digits family imports scikit-learn only when it draws a task; the real-data families
(mnist, mnist_1d, tabular: the ``data`` extra; char_lm: the stdlib's own source) likewise.
"""
from __future__ import annotations

from .base import Task, TaskSampler, mix_seed
from .digits import DigitsConfig, DigitsFamily
from .gaussian_mixture import GaussianMixtureConfig, GaussianMixtureFamily
from .quadratic import QuadraticConfig, QuadraticFamily
from .sine import SineConfig, SineFamily
from .teacher_mlp import TeacherMLPConfig, TeacherMLPFamily
from .mnist import MnistConfig, MnistFamily
from .mnist_1d import Mnist1DConfig, Mnist1DFamily
from .tabular import TabularConfig, TabularFamily
from .char_lm import CharLMConfig, CharLMFamily
from .mixture import MixtureConfig, MixtureFamily

FAMILIES: dict[str, tuple[type, type]] = {
    "sine": (SineFamily, SineConfig),
    "teacher_mlp": (TeacherMLPFamily, TeacherMLPConfig),
    "quadratic": (QuadraticFamily, QuadraticConfig),
    "gaussian_mixture": (GaussianMixtureFamily, GaussianMixtureConfig),
    "digits": (DigitsFamily, DigitsConfig),
    "mnist": (MnistFamily, MnistConfig),
    "mnist_1d": (Mnist1DFamily, Mnist1DConfig),
    "tabular": (TabularFamily, TabularConfig),
    "char_lm": (CharLMFamily, CharLMConfig),
    "mixture": (MixtureFamily, MixtureConfig),
}

__all__ = [
    "FAMILIES", "Task", "TaskSampler", "mix_seed",
    "SineFamily", "SineConfig", "TeacherMLPFamily", "TeacherMLPConfig",
    "QuadraticFamily", "QuadraticConfig", "GaussianMixtureFamily", "GaussianMixtureConfig",
    "DigitsFamily", "DigitsConfig", "MnistFamily", "MnistConfig", "Mnist1DFamily", "Mnist1DConfig",
    "TabularFamily", "TabularConfig", "CharLMFamily", "CharLMConfig",
]
