"""Held-out evaluation of an optimizer against tuned baselines.

Protocol: the baselines' learning rates (SGD, SGD with momentum 0.9, Adam) are tuned on
*meta-train* draws over a log grid (``points_per_decade`` points per decade in
``[lr_min, lr_max]``), choosing the rate with the lowest median final validation loss. Then
every optimizer trains a fresh model on each of ``N`` *meta-test* draws for ``T`` steps, the
same init for all optimizers on a task. Reported per optimizer: median and interquartile range
of the final validation loss and the median number of steps to reach tuned Adam's final loss
on the same task (``None`` when fewer than half of the tasks reach it).

``evaluate(..., jobs=N)`` spreads the training runs (the tuning grid, then the held-out runs)
over ``N`` spawned processes (:mod:`metascale.parallel`); each worker redraws its tasks from
the spec and seed, so the result is exactly that of ``jobs=1`` at the same thread count.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import pickle
from typing import Any, Callable, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from .spec import BASELINE_NAMES, DEFAULT_BASELINES, EvaluateConfig  # noqa: F401 (the latter two: re-exported)
from .parallel import DEFAULT_THREADS, Workers
from .tasks.base import Task, mix_seed

OptFactory = Callable[[Iterable[torch.Tensor], float], torch.optim.Optimizer]

def _extra(module: str, cls: str, extra: str):
    """Import ``module.cls`` from an optional package, or raise MissingExtraError."""
    import importlib
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError:
        from .errors import MissingExtraError, install_hint
        raise MissingExtraError(f"baseline needs the {module!r} package: {install_hint(extra)}") from None


def _prodigy(params, lr: float) -> torch.optim.Optimizer:
    """Prodigy (Mishchenko & Defazio): learning-rate free; ``lr`` = 1 is its intended value."""
    return _extra("prodigyopt", "Prodigy", "baselines")(params, lr=lr)


def _schedulefree_adamw(params, lr: float) -> torch.optim.Optimizer:
    """Schedule-Free AdamW (Defazio et al.), in train mode; :func:`train_run` switches it to
    eval mode (the averaged iterate) whenever it measures the validation loss."""
    opt = _extra("schedulefree", "AdamWScheduleFree", "baselines")(params, lr=lr)
    opt.train()
    return opt


BASELINES: dict[str, OptFactory] = {
    "sgd": lambda p, lr: torch.optim.SGD(p, lr=lr),
    "sgd_momentum": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9),
    "adam": lambda p, lr: torch.optim.Adam(p, lr=lr),
    "adafactor": lambda p, lr: torch.optim.Adafactor(p, lr=lr),
    "prodigy": _prodigy,
    "schedulefree_adamw": _schedulefree_adamw,
}
# learning-rate-free baselines run at this lr instead of a tuned one
LR_FREE = {"prodigy": 1.0}
if tuple(BASELINES) != BASELINE_NAMES:  # the spec layer validates [evaluate] baselines by these names
    raise ImportError("metascale.spec.BASELINE_NAMES must list metascale.evaluate.BASELINES in order")


def _set_mode(opt: torch.optim.Optimizer, mode: str) -> None:
    """Switch an optimizer with train/eval modes (Schedule-Free) to ``mode``; no-op otherwise."""
    fn = getattr(opt, mode, None)
    if callable(fn):
        fn()


def train_curve(task: Task, make_opt: Callable[[Iterable[torch.Tensor]], torch.optim.Optimizer],
                steps: int, device: torch.device | str | None = None, train_loss=None) -> list[float]:
    """Train a fresh model of ``task`` for ``steps`` steps; return validation losses
    ``[L_0, ..., L_T]`` of the task's true loss (``inf`` from the first non-finite value on).
    ``train_loss(pred, target, t / steps)`` replaces the task loss for the training steps."""
    return train_run(task, make_opt, steps, device, train_loss)[0]


def train_run(task: Task, make_opt, steps: int, device=None, train_loss=None) -> tuple[list[float], float | None]:
    """:func:`train_curve` plus the final validation accuracy (classification tasks, else ``None``)."""
    task = task.to(device=device)
    model = task.make_model(device=device)
    opt = make_opt(model.parameters())
    curve = []
    with torch.no_grad():
        curve.append(float(task.loss(model(task.x_val), task.y_val)))
    for t in range(steps):
        _set_mode(opt, "train")
        x, y = task.train_batch(t)
        opt.zero_grad(set_to_none=True)
        pred = model(x)
        loss = task.loss(pred, y) if train_loss is None else train_loss(pred, y, t / steps)
        if not torch.isfinite(loss):
            curve.extend([math.inf] * (steps - t))
            break
        loss.backward()
        opt.step()
        _set_mode(opt, "eval")
        with torch.no_grad():
            v = float(task.loss(model(task.x_val), task.y_val))
        curve.append(v if math.isfinite(v) else math.inf)
    acc = None
    if task.kind == "classification":
        with torch.no_grad():
            acc = float((model(task.x_val).argmax(-1) == task.y_val).double().mean())
    return curve, acc


def tune_lr(factory: OptFactory, tasks: list[Task], steps: int, grid: list[float],
            device: torch.device | str | None = None) -> tuple[float, dict[str, float]]:
    """Pick the grid learning rate with the lowest median final validation loss on ``tasks``."""
    scores = {}
    for lr in grid:
        finals = [train_curve(t, lambda p: factory(p, lr), steps, device)[-1] for t in tasks]
        scores[f"{lr:.3g}"] = float(np.median(finals))
    best = min(range(len(grid)), key=lambda i: (scores[f"{grid[i]:.3g}"], i))
    return grid[best], scores


def tuning_tasks(spec, seed: int) -> list[Task]:
    """The meta-train draws on which :func:`evaluate` tunes the baselines' learning rates."""
    return spec.sampler("train", mix_seed(seed, 0x70E)).tasks(spec.evaluate.tune_tasks)


@dataclasses.dataclass(frozen=True)
class FileOptimizer:
    """A picklable optimizer factory ``(params, lr) -> load_optimizer(path, params, lr=lr,
    total_steps=total_steps)``: what :func:`evaluate` with ``jobs > 1`` can send to its workers
    (a lambda cannot travel to another process)."""

    path: str
    total_steps: int | None = None

    def __call__(self, params: Iterable[torch.Tensor], lr: float = 1.0) -> torch.optim.Optimizer:
        from .export import load_optimizer
        # no divergence guard: evaluate records a run's non-finite losses itself (one warning per run would flood)
        return load_optimizer(self.path, params, lr=lr, total_steps=self.total_steps, check_finite=False)


@functools.lru_cache(maxsize=8)
def _sampler(spec_bytes: bytes, split: str, seed: int):
    return pickle.loads(spec_bytes).sampler(split, seed)


@functools.lru_cache(maxsize=64)
def _draw(spec_bytes: bytes, split: str, seed: int, index: int) -> Task:
    """Draw ``index`` of ``(split, seed)`` (the same task in every process; cached for the
    work items of one evaluation that share it)."""
    return _sampler(spec_bytes, split, seed).task(index)


@dataclasses.dataclass(frozen=True)
class _Runs:
    """Work item of :func:`evaluate`: training runs on draw ``index`` of ``(split, seed)``; each
    run is ``(baseline name or None, lr, learned factory or None, training loss or None)``."""

    spec_bytes: bytes
    split: str
    seed: int
    index: int
    steps: int
    device: Any
    runs: tuple


def _do_runs(item: _Runs) -> list[tuple[list[float], float | None]]:
    task = _draw(item.spec_bytes, item.split, item.seed, item.index)
    out = []
    for baseline, lr, factory, loss_fn in item.runs:
        fac = (lambda p, f=BASELINES[baseline], lr=lr: f(p, lr)) if baseline is not None else \
            (lambda p, f=factory, lr=lr: f(p, lr))
        out.append(train_run(task, fac, item.steps, item.device, loss_fn))
    return out


def _steps_to(curve: list[float], target: float) -> float:
    """First step ``t >= 1`` with ``curve[t] <= target``; ``inf`` if never."""
    for t, v in enumerate(curve[1:], start=1):
        if v <= target:
            return float(t)
    return math.inf


def summarize(curves: dict[str, list[list[float]]], accuracies: dict[str, list] | None = None) -> dict[str, dict]:
    """Per optimizer: median/IQR of final loss, steps to reach Adam's final loss, and the
    median final validation accuracy and the per-task accuracies (classification)."""
    adam_final = [c[-1] for c in curves["adam"]] if "adam" in curves else None
    out = {}
    for name, cs in curves.items():
        finals = np.array([c[-1] for c in cs], dtype=np.float64)
        q25, q50, q75 = (float(np.percentile(finals, q)) for q in (25, 50, 75))
        stack = np.array(cs, dtype=np.float64)
        with np.errstate(invalid="ignore"):  # a diverged task (inf) may make a quartile nan
            q25_curve, q75_curve = (np.percentile(stack, q, axis=0).tolist() for q in (25, 75))
        row = {"median_final_loss": q50, "iqr_final_loss": q75 - q25, "q25_final_loss": q25,
               "q75_final_loss": q75, "final_losses": finals.tolist(),
               "median_curve": np.median(stack, axis=0).tolist(), "q25_curve": q25_curve, "q75_curve": q75_curve}
        if adam_final is not None:
            steps = [_steps_to(c, a) for c, a in zip(cs, adam_final)]
            med = float(np.median(steps))
            row["median_steps_to_adam"] = med if math.isfinite(med) else None
            row["reached_adam_fraction"] = float(np.mean([math.isfinite(s) for s in steps]))
        accs = (accuracies or {}).get(name)
        if accs and accs[0] is not None:
            row["median_final_accuracy"] = float(np.median(accs))
            row["final_accuracies"] = [float(a) for a in accs]
        out[name] = row
    return out


def evaluate(learned: dict[str, OptFactory], spec, *, n_tasks: int | None = None,
             steps: int | None = None, seed: int = 0, device: torch.device | str | None = None,
             progress: bool = True, losses: dict[str, tuple[str, Callable]] | None = None,
             baselines: Iterable[str] | None = None, jobs: int = 1,
             threads: int | None = DEFAULT_THREADS) -> dict:
    """Compare ``learned`` optimizers (name -> factory ``(params, lr_multiplier)``) with the
    tuned baselines on held-out tasks of ``spec``; returns the JSON-able result.

    ``baselines`` (default: the spec's ``[evaluate] baselines``) picks from :data:`BASELINES`;
    each has its learning rate tuned on meta-train draws, except those in :data:`LR_FREE`.
    A learned optimizer's horizon argument (e.g. the adaptive rule's ``total_steps``) should be
    :func:`eval_steps` ``(spec, steps)``, the ``T`` used here.

    ``losses`` adds runs that train on a learned loss: name -> (optimizer name, loss), where the
    optimizer is a baseline (at its learning rate tuned on the task loss: "equal tuned step
    size") or a key of ``learned``. Every curve is the task's true validation loss.

    ``jobs > 1`` runs the training runs in that many spawned processes at ``threads``
    intra-op threads each (one work item per task: its tuning grid of one baseline, or all its
    held-out runs); the learned factories and losses must then be picklable (e.g.
    :class:`FileOptimizer`, not a lambda). The result equals ``jobs=1``'s exactly when this
    process runs at the same thread count."""
    cfg = spec.evaluate
    n = n_tasks or cfg.tasks
    T = eval_steps(spec, steps)
    grid = cfg.grid()
    baselines = list(cfg.baselines if baselines is None else baselines)
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline {unknown[0]!r}; choose from {', '.join(BASELINES)}")
    for b in baselines:  # a missing optional package fails now, not after an hour of tuning
        if b in ("prodigy", "schedulefree_adamw"):
            BASELINES[b]([torch.zeros(1, requires_grad=True)], 1e-3)
    losses = losses or {}
    if jobs > 1:
        try:
            pickle.dumps((learned, losses))
        except Exception as e:
            raise ValueError(f"evaluate(jobs={jobs}) sends the learned optimizers and losses to worker processes, "
                             f"and they must be picklable (e.g. FileOptimizer(path), not a lambda): {e}") from None
    to_tune = [b for b in baselines if b not in LR_FREE]
    spec_bytes = pickle.dumps(spec)
    dev = str(device) if isinstance(device, torch.device) else device
    tune_split, tune_seed, n_tune = "train", mix_seed(seed, 0x70E), cfg.tune_tasks
    result = {"spec": spec.name, "tasks": n, "steps": T, "seed": seed, "meta_train_horizon": spec.inner.horizon,
              "lr_grid": grid, "optimizers": {}}
    names = baselines + list(learned) + list(losses)
    bar = tqdm(total=len(to_tune) * len(grid) * n_tune + len(names) * n, desc="evaluate", disable=not progress,
               dynamic_ncols=True)
    tick = lambda i, r: bar.update(len(r))
    tuned = {}
    with Workers(max(1, min(jobs, max(n_tune * len(to_tune), n))), threads=threads) as pool:
        # the tuning grid: one item per (meta-train draw, baseline)
        items = [_Runs(spec_bytes, tune_split, tune_seed, i, T, dev, tuple((b, lr, None, None) for lr in grid))
                 for b in to_tune for i in range(n_tune)]
        finals = pool.map(_do_runs, items, tick)
        for k, name in enumerate(to_tune):
            per_task = finals[k * n_tune:(k + 1) * n_tune]
            scores = {f"{lr:.3g}": float(np.median([runs[g][0][-1] for runs in per_task])) for g, lr in enumerate(grid)}
            best = min(range(len(grid)), key=lambda i: (scores[f"{grid[i]:.3g}"], i))
            tuned[name] = (grid[best], scores)
        for name in baselines:
            if name in LR_FREE:
                tuned[name] = (LR_FREE[name], {})
        # the held-out runs: one item per meta-test draw, every optimizer on it
        row = []
        for name in names:
            opt_name, loss_fn = losses.get(name, (name, None))
            if opt_name in BASELINES:
                row.append((opt_name, tuned[opt_name][0], None, loss_fn))
            else:
                row.append((None, 1.0, learned[opt_name], loss_fn))
        runs = pool.map(_do_runs, [_Runs(spec_bytes, "test", seed, i, T, dev, tuple(row)) for i in range(n)], tick)
    bar.close()
    curves = {name: [runs[i][k][0] for i in range(n)] for k, name in enumerate(names)}
    accs = {name: [runs[i][k][1] for i in range(n)] for k, name in enumerate(names)}
    result["optimizers"] = summarize(curves, accs)
    for name, (opt_name, _) in losses.items():
        if opt_name in tuned:
            result["optimizers"][name]["tuned_lr"] = tuned[opt_name][0]
    for name, (lr, scores) in tuned.items():
        result["optimizers"][name]["tuned_lr"] = lr
        if scores:
            result["optimizers"][name]["tuning_median_final_loss"] = scores
        else:
            result["optimizers"][name]["lr_free"] = True
    return result


def eval_steps(spec, steps: int | None = None) -> int:
    """The training budget ``T`` of an evaluation: ``steps``, else the spec's ``[evaluate]
    steps``, else its meta-training horizon."""
    return steps or spec.evaluate.steps or spec.inner.horizon


def format_table(result: dict) -> str:
    """A plain-text table of :func:`evaluate`'s result."""
    lines = [f"held-out evaluation: spec={result['spec']} tasks={result['tasks']} steps={result['steps']} "
             f"(meta-train horizon {result['meta_train_horizon']}), seed={result['seed']}",
             f"{'optimizer':<18}{'tuned lr':>10}{'median final':>15}{'IQR':>12}{'steps to Adam':>15}{'reached':>9}"
             f"{'accuracy':>10}"]
    for name, row in result["optimizers"].items():
        lr = f"{row['tuned_lr']:.3g}" if "tuned_lr" in row else "-"
        st = row.get("median_steps_to_adam")
        acc = f"{row['median_final_accuracy']:.3f}" if "median_final_accuracy" in row else "-"
        lines.append(f"{name:<18}{lr:>10}{row['median_final_loss']:>15.5g}{row['iqr_final_loss']:>12.4g}"
                     f"{('never' if st is None else f'{st:.0f}'):>15}{row.get('reached_adam_fraction', 0):>9.0%}{acc:>10}")
    return "\n".join(lines)
