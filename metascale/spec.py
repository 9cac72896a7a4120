"""Task-distribution specs: one TOML file per distribution, mapped onto dataclasses.

A spec has these tables (every key optional except ``family.name``)::

    description = "one line shown by `metascale tasks`"
    [family]     name = "sine", then the family's own ranges (see its config dataclass)
    [inner]      steps (K), batch_size, objective, engine, windows -> InnerConfig
    [meta]       batch_size, steps, lr, net_lr, loss_lr, clip, task_clip, select_every,
                 select_tasks -> MetaConfig
    [evaluate]   tasks, steps, tune_tasks, lr_min, lr_max, points_per_decade, baselines -> EvaluateConfig
    [<rule table>]  one table per rule config (metascale.optim.RULES: each rule names its
                 table and config type), e.g. [optimizer] for the layer-wise rule, [adaptive]
                 for the adaptive ones

Unknown keys and out-of-range values raise :class:`~metascale.errors.SpecError` naming the
key and the allowed values.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import sys
import tomllib
from pathlib import Path
from typing import Any

from .config import check, from_table, to_dict
from .errors import SpecError
from .optim.registry import spec_tables
from .tasks import FAMILIES
from .tasks.base import TaskSampler

OBJECTIVES = ("mean", "log_mean", "final", "log_final")
ENGINES = ("higher", "func")
LEARN = ("optimizer", "loss", "both")
ESTIMATORS = ("backprop", "truncated", "es", "pes")
BASELINE_NAMES = ("sgd", "sgd_momentum", "adam", "adafactor", "prodigy", "schedulefree_adamw")
"""Names of the tuned baselines (their factories: :data:`metascale.evaluate.BASELINES`)."""
DEFAULT_BASELINES = ("sgd", "sgd_momentum", "adam")
MAX_HORIZON = 100_000
"""The largest meta-training horizon ``windows * steps`` (also the largest ``horizon`` an exported
file may declare): the layer-wise rule's per-step schedules hold ``4 * depth_bins`` numbers per
step, and an unroll keeps every step's state."""
EXTERNAL = "external"
"""``[family] name`` of tasks drawn outside metascale (:mod:`metascale.interop`): the family
table is a JSON record of where they came from, kept as it is; such a spec draws no tasks itself."""


@dataclasses.dataclass(frozen=True)
class InnerConfig:
    """The ``[inner]`` table.

    Attributes:
        steps: inner steps ``K`` per window (the whole unroll when ``windows = 1``).
        batch_size: inner minibatch size.
        objective: the meta-objective (:func:`metascale.inner.meta_objective`), per window.
        engine: ``"higher"`` (default) or ``"func"`` (``torch.func``); same rule, same numbers.
        windows: ``N``: meta-train over an inner horizon of ``N * K`` steps by backpropagating
            through windows of ``K`` steps, the inner state carried across windows and the graph
            cut between them (truncated unrolls; uses the ``func`` engine, which carries state).
        tail: the fraction of the horizon whose windows the meta-objective counts: the last
            ``n = max(1, round(tail * windows))`` windows, each weighted ``windows / n`` (so the
            meta-loss is the mean over the counted windows). ``1`` counts every window; a small
            ``tail`` makes the meta-objective track the end of a run (the final loss a user
            judges an optimizer by) while the earlier windows still run and carry the state
            (their effect reaches the counted windows through PES's perturbation sums, or
            through the carried graph of full backpropagation; truncated backpropagation
            gets no gradient from them).
        tail_share: the share of the meta-objective on the ``tail`` windows; the rest weighs
            every window alike: window ``k`` of ``N`` weighs ``(1 - share) + share * N / n`` if it
            is one of the last ``n``, else ``1 - share`` (the weights average 1). ``1`` (default)
            counts the tail alone; e.g. ``0.5`` with ``tail = 0.2`` is half the whole run's mean
            (reaching a low loss early) and half the last fifth's (the end).
        mixed_windows: window counts ``N_1 .. N_n`` to meta-train over several horizons at once:
            the meta-batch is cut into ``n`` consecutive blocks and task ``j`` of ``B`` runs
            ``mixed_windows[floor(j n / B)]`` windows (:meth:`for_task`; consecutive blocks share
            the horizons evenly between ranks, which take every ``size``-th task). ``windows``
            stays the default horizon (of an exported file, evaluation and the selection
            measure). Unset: every task runs ``windows``. Not with the PES estimator, whose
            particles carry one horizon.
        mixed_tails: one ``tail`` per entry of ``mixed_windows``: the block that runs
            ``mixed_windows[i]`` windows counts the last ``mixed_tails[i]`` of its run, e.g. the
            whole run at the short horizon (speed) and the second half at the long one (the end
            of a long run). Unset: every block uses ``tail``.
    """

    steps: int = dataclasses.field(default=20, metadata=check("int", 1, 10_000))
    batch_size: int = dataclasses.field(default=10, metadata=check("int", 1, 1_000_000))
    objective: str = dataclasses.field(default="log_mean", metadata=check("str", choices=OBJECTIVES))
    engine: str = dataclasses.field(default="higher", metadata=check("str", choices=ENGINES))
    windows: int = dataclasses.field(default=1, metadata=check("int", 1, 1_000_000))
    tail: float = dataclasses.field(default=1.0, metadata=check("float", 1e-6, 1.0))
    tail_share: float = dataclasses.field(default=1.0, metadata=check("float", 0.0, 1.0))
    mixed_windows: tuple | None = dataclasses.field(default=None, metadata=check("int_list", 1, 1_000_000))
    mixed_tails: tuple | None = dataclasses.field(default=None, metadata=check("float_list", 1e-6, 1.0))

    def validate(self) -> None:
        """Raise ``ValueError`` for a horizon past :data:`MAX_HORIZON` (per-step meta-parameters,
        schedules and trajectories grow with it)."""
        for windows in (self.windows, *(self.mixed_windows or ())):
            if windows * self.steps > MAX_HORIZON:
                raise ValueError(f"windows * steps = {windows} * {self.steps} = {windows * self.steps} inner "
                                 f"steps; at most {MAX_HORIZON}")
        if self.mixed_tails is not None and self.mixed_windows is None:
            raise ValueError("mixed_tails is set without mixed_windows; it holds one tail per entry of "
                             "mixed_windows (for one horizon, set tail)")
        if self.mixed_tails is not None and len(self.mixed_tails) != len(self.mixed_windows):
            raise ValueError(f"mixed_tails has {len(self.mixed_tails)} entries; it needs one per entry of "
                             f"mixed_windows ({len(self.mixed_windows)})")

    def for_task(self, j: int, batch: int) -> "InnerConfig":
        r"""The config task ``j`` of a meta-batch of ``batch`` runs: ``windows`` replaced by
        ``mixed_windows[i]`` and ``tail`` by ``mixed_tails[i]`` (when set), ``i = floor(j n /
        batch)`` (``n`` counts; this config when ``mixed_windows`` is unset)."""
        if self.mixed_windows is None:
            return self
        i = j * len(self.mixed_windows) // batch
        tail = self.tail if self.mixed_tails is None else self.mixed_tails[i]
        return dataclasses.replace(self, windows=self.mixed_windows[i], tail=tail, mixed_windows=None,
                                   mixed_tails=None)

    @property
    def horizon(self) -> int:
        """Inner steps per task in meta-training: ``windows * steps``."""
        return self.windows * self.steps

    def window_weight(self, start: int) -> float:
        r"""The weight of the window that starts at inner step ``start`` in the meta-objective
        :math:`\frac1N\sum_k w_k L_k`: with ``n = max(1, round(tail N))`` and ``a =
        tail_share``, :math:`w_k = (1 - a) + a N / n` for the last ``n`` windows and
        :math:`1 - a` before them (``tail = 1`` or ``a = 0``: 1 for every window; ``a = 1``:
        the tail alone)."""
        counted = max(1, round(self.tail * self.windows))
        in_tail = start // self.steps >= self.windows - counted
        return (1.0 - self.tail_share) + (self.tail_share * self.windows / counted if in_tail else 0.0)


@dataclasses.dataclass(frozen=True)
class MetaConfig:
    """The ``[meta]`` table.

    Attributes:
        batch_size: tasks per meta-step.
        steps: meta-steps.
        lr: Adam step size on the (log-space) meta-parameters of the optimizer.
        net_lr: Adam step size on the weights of a rule's network that read the training state
            (the adaptive rules); its outputs feed back into the gradients it reads, so it needs
            a smaller step than log step sizes (docs/benchmarks.md).
        loss_lr: Adam step size on the weights of a learned loss network (``--learn loss|both``).
        clip: global-norm clip of the meta-gradient (0 disables).
        task_clip: clip each task's meta-gradient to this global norm before the tasks are
            averaged (0 disables), so that one task in a chaotic region of the inner dynamics
            cannot set the direction of the meta-step.
        select_every: every this many meta-steps (and after the last), measure the mean
            meta-loss of the current meta-parameters on ``select_tasks`` fixed meta-train draws
            (a stream apart from the training draws and from evaluation's tuning draws) and
            export the best ones seen (0: export the last). A guard against a late collapse;
            it costs about ``select_tasks / (3 * batch_size * select_every)`` of the run. Only
            with ``learn="optimizer"``: with a learned loss every run exports the last weights.
        select_tasks: tasks of that selection measure.
        estimator: how the meta-gradient is estimated over the inner horizon
            ``windows * steps`` (:mod:`metascale.meta.estimators`): ``"truncated"``
            backpropagates through each window of ``steps`` inner steps, the state carried and
            the graph cut between windows (one window: exact); ``"backprop"`` keeps the graph
            across windows (exact, memory grows with the horizon); ``"es"`` and ``"pes"`` are
            antithetic evolution strategies (no graph through the unroll: memory flat in the
            horizon): ES over whole runs, PES (persistent ES) over windows with particles that
            carry their inner states and perturbations from one meta-step to the next.
        sigma: standard deviation of the ES/PES perturbations of the meta-parameters.
        pairs: antithetic pairs per task of ES (PES: one pair per particle; ``batch_size``
            particles).
    """

    batch_size: int = dataclasses.field(default=8, metadata=check("int", 1, 4096))
    steps: int = dataclasses.field(default=200, metadata=check("int", 0, 10_000_000))
    lr: float = dataclasses.field(default=0.03, metadata=check("float", 1e-8, 10.0))
    loss_lr: float = dataclasses.field(default=1e-3, metadata=check("float", 1e-8, 10.0))
    net_lr: float = dataclasses.field(default=3e-3, metadata=check("float", 1e-8, 10.0))
    clip: float = dataclasses.field(default=1.0, metadata=check("float", 0.0, 1e9))
    task_clip: float = dataclasses.field(default=1.0, metadata=check("float", 0.0, 1e9))
    select_every: int = dataclasses.field(default=10, metadata=check("int", 0, 10_000_000))
    select_tasks: int = dataclasses.field(default=16, metadata=check("int", 1, 100_000))
    estimator: str = dataclasses.field(default="truncated", metadata=check("str", choices=ESTIMATORS))
    sigma: float = dataclasses.field(default=0.01, metadata=check("float", 1e-8, 10.0))
    pairs: int = dataclasses.field(default=1, metadata=check("int", 1, 100_000))


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """The ``[evaluate]`` table.

    Attributes:
        tasks: held-out (meta-test) tasks ``N``.
        steps: training steps ``T``; 0 means the meta-training horizon ``K``.
        tune_tasks: meta-train draws used to tune the baselines' learning rates.
        lr_min, lr_max, points_per_decade: the log grid of learning rates.
        baselines: which baselines to run (learning rates tuned on the grid, except the
            learning-rate-free ones); ``adafactor`` is torch's, ``prodigy`` and
            ``schedulefree_adamw`` need the ``baselines`` extra.
    """

    tasks: int = dataclasses.field(default=20, metadata=check("int", 1, 100_000))
    steps: int = dataclasses.field(default=0, metadata=check("int", 0, 1_000_000))
    tune_tasks: int = dataclasses.field(default=8, metadata=check("int", 1, 10_000))
    lr_min: float = dataclasses.field(default=1e-4, metadata=check("float", 1e-10, 100.0))
    lr_max: float = dataclasses.field(default=1.0, metadata=check("float", 1e-10, 100.0))
    points_per_decade: int = dataclasses.field(default=2, metadata=check("int", 1, 20))
    baselines: tuple = dataclasses.field(default=DEFAULT_BASELINES, metadata=check("str_list", choices=BASELINE_NAMES))

    def validate(self) -> None:
        """Raise ``ValueError`` if the grid is empty."""
        if self.lr_min > self.lr_max:
            raise ValueError(f"lr_min = {self.lr_min} must not exceed lr_max = {self.lr_max}")

    def grid(self) -> list[float]:
        """The log grid ``lr_min * 10**(k / points_per_decade)`` up to ``lr_max``."""
        n = int(math.floor(math.log10(self.lr_max / self.lr_min) * self.points_per_decade + 1e-9))
        return [self.lr_min * 10 ** (k / self.points_per_decade) for k in range(n + 1)]


FIXED_TABLES = ("description", "family", "inner", "meta", "evaluate")


def tables() -> tuple[str, ...]:
    """The top-level keys a spec may have: the fixed tables and every rule's table."""
    return FIXED_TABLES + tuple(spec_tables())


@dataclasses.dataclass(frozen=True)
class Spec:
    """A parsed, validated task-distribution spec; ``rules`` holds the config of every rule
    table (``[optimizer]``, ``[adaptive]``, ...), defaults where the file has none."""

    name: str
    description: str
    family_name: str
    family: Any
    inner: InnerConfig
    meta: MetaConfig
    evaluate: EvaluateConfig
    rules: dict[str, Any]
    path: str | None = None

    def rule_config(self, rule: str) -> Any:
        """The config of rule ``rule`` (a name in :data:`~metascale.optim.RULES`) from its table,
        resolved for this spec's horizon. Raises :class:`SpecError` when the table does not
        suit the rule (e.g. a momentum variant with ``momentum = 0``)."""
        from .optim.registry import get_rule
        try:
            r = get_rule(rule)
            return r.resolve(r.config_from(self.rules[r.table]), self.inner.horizon)
        except ValueError as e:
            raise SpecError(f"spec {self.name!r}: {e}") from None

    def with_table(self, table: str, config: Any) -> "Spec":
        """A copy with rule table ``table`` replaced by ``config``."""
        return dataclasses.replace(self, rules={**self.rules, table: config})

    def make_family(self):
        """A family instance built from the ``[family]`` table."""
        if self.family_name == EXTERNAL:
            raise SpecError(f"spec {self.name!r} records tasks drawn outside metascale ({self.family}); "
                            "draw them with the sampler they came from (metascale.interop)")
        if self.family_name in FAMILIES:
            return FAMILIES[self.family_name][0](self.family)
        if is_import_path(self.family_name) and not isinstance(self.family, dict):  # validated when loaded
            return import_family(self.family_name)[0](self.family)
        raise SpecError(f"spec {self.name!r}: task family {self.family_name!r} is not registered in this "
                        f"process (metascale.tasks.FAMILIES); register it before drawing its tasks")

    def sampler(self, split: str, seed: int) -> TaskSampler:
        """Task sampler of ``split`` (``"train"`` or ``"test"``) with the inner batch size."""
        return TaskSampler(self.make_family(), split, seed, self.inner.batch_size)

    def to_dict(self) -> dict:
        """JSON-able dict that :func:`spec_from_dict` turns back into an equal spec."""
        return {"name": self.name, "description": self.description,
                "family": {"name": self.family_name,
                           **(dict(self.family) if isinstance(self.family, dict) else to_dict(self.family))},
                "inner": to_dict(self.inner), "meta": to_dict(self.meta),
                **{t: to_dict(c) for t, c in self.rules.items()},
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
    allowed = tables()
    unknown = [k for k in data if k not in allowed]
    if unknown:
        raise SpecError(f"{where}: unknown key {unknown[0]!r}; allowed top-level keys: {', '.join(allowed)}")
    for key in allowed[1:]:
        if key in data and not isinstance(data[key], dict):
            raise SpecError(f"{where}: {key!r} must be a table ([{key}])")
    family = dict(data.get("family") or {})
    fname = family.pop("name", None)
    opaque = fname == EXTERNAL or (unknown_family_ok and isinstance(fname, str) and fname not in FAMILIES)
    entry = FAMILIES.get(fname) if isinstance(fname, str) else None
    if not opaque and entry is None and is_import_path(fname):  # never for a stored spec (unknown_family_ok)
        entry = import_family(fname, Path(path).parent if path else None, f"{where} [family]")
    if not opaque and entry is None:
        raise SpecError(f"{where} [family]: name = {fname!r} is not allowed; expected one of "
                        + ", ".join(repr(f) for f in FAMILIES) + ", or an import path 'package.module:Family'")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise SpecError(f"{where}: description must be a string")
    inner = from_table(InnerConfig, data.get("inner"), f"{where} [inner]")
    meta = from_table(MetaConfig, data.get("meta"), f"{where} [meta]")
    if inner.mixed_windows is not None and meta.estimator == "pes":
        raise SpecError(f"{where} [inner]: mixed_windows is not allowed with [meta] estimator = 'pes' (its "
                        "particles carry one horizon); use 'backprop', 'truncated' or 'es'")
    return Spec(name=name, description=description, family_name=fname,
                family=family if opaque else from_table(entry[1], family, f"{where} [family]"),
                inner=inner, meta=meta,
                evaluate=from_table(EvaluateConfig, data.get("evaluate"), f"{where} [evaluate]"),
                rules={t: from_table(cls, data.get(t), f"{where} [{t}]") for t, cls in spec_tables().items()},
                path=path)


def is_import_path(name: Any) -> bool:
    """Whether a family name is an import path ``"package.module:Name"``."""
    return isinstance(name, str) and name.count(":") == 1 and all(
        part and all(p.isidentifier() for p in part.split(".")) for part in name.split(":"))


@functools.lru_cache(maxsize=None)
def import_family(name: str, folder: Path | None = None, where: str = "[family]") -> tuple[type, type]:
    """``(family class, config class)`` of the import path ``name = "package.module:Name"``:
    ``importlib.import_module("package.module")``, then attribute ``Name``, a family class (the
    :class:`~metascale.tasks.base.TaskFamily` protocol, built from its config) whose
    ``config_type`` is the config dataclass of its ``[family]`` table. A top-level module not found
    on ``sys.path`` is looked for again in the current folder and the spec file's folder (added to
    ``sys.path``, as ``python -m`` would). No ``exec``; only a spec you load imports (a family named
    in an exported file's stored spec is never imported)."""
    module, attr = name.split(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module.split(".")[0]:
            raise SpecError(f"{where}: importing {module!r} failed: {e}") from None
        for extra in (str(Path.cwd()), *([str(folder.resolve())] if folder else [])):
            if extra not in sys.path:
                sys.path.append(extra)
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError:
            raise SpecError(f"{where}: name = {name!r}: no module {module!r} on the import path, the current "
                            "folder or the spec's folder") from None
    obj = mod
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise SpecError(f"{where}: name = {name!r}: module {module!r} has no {attr!r}")
    config = getattr(obj, "config_type", None)
    if not (isinstance(obj, type) and dataclasses.is_dataclass(config) and callable(getattr(obj, "sample", None))
            and callable(getattr(obj, "build", None))):
        raise SpecError(f"{where}: name = {name!r} must be a task family class with sample(g, split), "
                        "build(config, g, batch_size) and config_type = its config dataclass")
    return obj, config


def load_spec(path: str | Path) -> Spec:
    """Read and validate the spec at ``path`` (its file stem is the spec's name)."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such spec file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SpecError(f"{path}: malformed TOML: {e}") from None
    except RecursionError:
        raise SpecError(f"{path}: malformed TOML: nested too deeply") from None
    return spec_from_dict(data, path.stem, str(path), str(path))


def default_spec_dir() -> Path:
    """``./tasks`` if it exists, else the ``tasks/`` folder of the clone the package runs from
    (an editable install), else the specs installed with the package (``pip install .`` puts them
    in ``<prefix>/share/metascale/tasks``)."""
    here = Path("tasks")
    if here.is_dir():
        return here
    clone = Path(__file__).resolve().parent.parent / "tasks"
    if clone.is_dir():
        return clone
    return Path(sys.prefix) / "share" / "metascale" / "tasks"
