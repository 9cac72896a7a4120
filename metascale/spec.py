"""Task-distribution specs: one TOML file per distribution, mapped onto dataclasses.

A spec has these tables (every key optional except ``family.name``)::

    description = "one line shown by `metascale tasks`"
    [family]     name = "sine", then the family's own ranges (see its config dataclass)
    [inner]      steps (K), batch_size, objective, engine, windows -> InnerConfig
    [meta]       batch_size, steps, lr, net_lr, loss_lr, clip, task_clip, select_every,
                 select_tasks -> MetaConfig
    [optimizer]  init_lr, momentum, nesterov, per_step, depth_bins -> LayerwiseConfig (--rule layerwise)
    [adaptive]   init_lr, momentum, nesterov, hidden, beta, bound, table_steps, depth_bins
                 -> AdaptiveConfig (--rule adaptive[-momentum])
    [evaluate]   tasks, steps, tune_tasks, lr_min, lr_max, points_per_decade -> EvaluateConfig

Unknown keys and out-of-range values raise :class:`~metascale.errors.SpecError` naming the
key and the allowed values.
"""
from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

from .config import from_table, to_dict
from .errors import SpecError
from .evaluate import EvaluateConfig
from .inner.higher_engine import InnerConfig
from .meta.trainer import MetaConfig
from .optim.adaptive import AdaptiveConfig
from .optim.layerwise import LayerwiseConfig
from .tasks import FAMILIES
from .tasks.base import TaskSampler

TABLES = ("description", "family", "inner", "meta", "optimizer", "adaptive", "evaluate")
EXTERNAL = "external"
"""``[family] name`` of tasks drawn outside metascale (:mod:`metascale.interop`): the family
table is a JSON record of where they came from, kept as it is; such a spec draws no tasks itself."""


@dataclasses.dataclass(frozen=True)
class Spec:
    """A parsed, validated task-distribution spec."""

    name: str
    description: str
    family_name: str
    family: Any
    inner: InnerConfig
    meta: MetaConfig
    optimizer: LayerwiseConfig
    evaluate: EvaluateConfig
    path: str | None = None
    adaptive: AdaptiveConfig = AdaptiveConfig()

    def make_family(self):
        """A family instance built from the ``[family]`` table."""
        if self.family_name == EXTERNAL:
            raise SpecError(f"spec {self.name!r} records tasks drawn outside metascale ({self.family}); "
                            "draw them with the sampler they came from (metascale.interop)")
        if self.family_name not in FAMILIES:
            raise SpecError(f"spec {self.name!r}: task family {self.family_name!r} is not registered in this "
                            f"process (metascale.tasks.FAMILIES); register it before drawing its tasks")
        return FAMILIES[self.family_name][0](self.family)

    def sampler(self, split: str, seed: int) -> TaskSampler:
        """Task sampler of ``split`` (``"train"`` or ``"test"``) with the inner batch size."""
        return TaskSampler(self.make_family(), split, seed, self.inner.batch_size)

    def to_dict(self) -> dict:
        """JSON-able dict that :func:`spec_from_dict` turns back into an equal spec."""
        return {"name": self.name, "description": self.description,
                "family": {"name": self.family_name,
                           **(dict(self.family) if isinstance(self.family, dict) else to_dict(self.family))},
                "inner": to_dict(self.inner), "meta": to_dict(self.meta),
                "optimizer": to_dict(self.optimizer), "adaptive": to_dict(self.adaptive),
                "evaluate": to_dict(self.evaluate)}


def spec_from_dict(data: dict, name: str, where: str, path: str | None = None, *,
                   unknown_family_ok: bool = False) -> Spec:
    """Validate a spec given as a dict (parsed TOML, or the copy stored in an export).

    ``unknown_family_ok``: a family name this process has not registered (a family registered
    in ``FAMILIES`` by the process that meta-trained) keeps its ``[family]`` table unvalidated,
    as the ``external`` source does; for reading exported files, whose spec is a record."""
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected a table")
    data = {k: v for k, v in data.items() if k != "name"}
    unknown = [k for k in data if k not in TABLES]
    if unknown:
        raise SpecError(f"{where}: unknown key {unknown[0]!r}; allowed top-level keys: {', '.join(TABLES)}")
    for key in TABLES[1:]:
        if key in data and not isinstance(data[key], dict):
            raise SpecError(f"{where}: {key!r} must be a table ([{key}])")
    family = dict(data.get("family") or {})
    fname = family.pop("name", None)
    opaque = fname == EXTERNAL or (unknown_family_ok and isinstance(fname, str) and fname not in FAMILIES)
    if not opaque and (not isinstance(fname, str) or fname not in FAMILIES):
        raise SpecError(f"{where} [family]: name = {fname!r} is not allowed; expected one of "
                        + ", ".join(repr(f) for f in FAMILIES))
    description = data.get("description", "")
    if not isinstance(description, str):
        raise SpecError(f"{where}: description must be a string")
    return Spec(name=name, description=description, family_name=fname,
                family=family if opaque else from_table(FAMILIES[fname][1], family, f"{where} [family]"),
                inner=from_table(InnerConfig, data.get("inner"), f"{where} [inner]"),
                meta=from_table(MetaConfig, data.get("meta"), f"{where} [meta]"),
                optimizer=from_table(LayerwiseConfig, data.get("optimizer"), f"{where} [optimizer]"),
                evaluate=from_table(EvaluateConfig, data.get("evaluate"), f"{where} [evaluate]"),
                adaptive=from_table(AdaptiveConfig, data.get("adaptive"), f"{where} [adaptive]"),
                path=path)


def load_spec(path: str | Path) -> Spec:
    """Read and validate the spec at ``path`` (its file stem is the spec's name)."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such spec file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SpecError(f"{path}: malformed TOML: {e}") from None
    return spec_from_dict(data, path.stem, str(path), str(path))


def default_spec_dir() -> Path:
    """``./tasks`` if it exists, else the ``tasks/`` folder next to the installed package."""
    here = Path("tasks")
    if here.is_dir():
        return here
    return Path(__file__).resolve().parent.parent / "tasks"
