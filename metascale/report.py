"""Plots and a markdown summary of one run folder: ``metascale report RUN_DIR``.

A run folder is what ``metascale meta-train --out RUN_DIR`` writes (``metrics.jsonl``,
``optimizer.safetensors`` and/or ``loss.safetensors``), plus ``eval.json`` when
``metascale evaluate ... --json RUN_DIR/eval.json`` was run on it. :func:`make_report` writes
into ``out`` (default: the run folder):

==================  ===================================================================
``meta_loss.png``   meta-loss per meta-step (raw and moving average), meta-gradient norm
                    with the clip level, meta-steps with skipped tasks marked
``schedules.png``   step size ``eta``, rescaling factor ``s`` and ``eta * s`` of every
                    (layer, role) group over the inner steps, *as the exported optimizer
                    applies them*: measured by training a held-out task with it
``heldout.png``     median validation loss over training steps with the interquartile band,
                    learned optimizer vs tuned baselines; final losses per task (from
                    ``eval.json``)
``NAME.toml``       the spec stored in the exported file (so the run can be reproduced and
                    evaluated even when ``tasks/NAME.toml`` has changed since)
``report.md``       spec, summary, held-out table, the images and how to read them
==================  ===================================================================

The schedule plot reads ``group["last_step_size"]`` and ``group["last_scale"]`` after every
``opt.step()`` of the loaded optimizer instead of recomputing the schedules from the
meta-parameters, so it shows what any rule does, also one whose factors depend on the
training state. matplotlib (the ``report`` extra: ``pip install -e '.[report]'`` in the repository, or ``bash scripts/setup.sh``) is imported only here, and
only its Agg canvas is used (no pyplot, no global backend switch).
"""
from __future__ import annotations

import dataclasses
import json
import math
import textwrap
from pathlib import Path

import numpy as np

from .errors import MetascaleError, MissingExtraError, install_hint

METRICS, OPTIMIZER, LOSS, EVAL = "metrics.jsonl", "optimizer.safetensors", "loss.safetensors", "eval.json"
MARKDOWN = "report.md"
IMAGES = {"meta_loss": "meta_loss.png", "schedules": "schedules.png", "heldout": "heldout.png"}

# one colour per optimizer, the same in every plot; the learned rows stand out
_COLORS = {"sgd": "tab:blue", "sgd_momentum": "tab:orange", "adam": "tab:green", "learned": "tab:red",
           "learned+learned_loss": "tab:purple", "sgd+learned_loss": "tab:purple"}
_DPI = 110


@dataclasses.dataclass
class RunData:
    """The readable content of a run folder.

    Attributes:
        folder: the run folder.
        records: the ``metrics.jsonl`` records, in file order.
        optimizer, loss: paths of the exported files that exist (else ``None``).
        spec: the spec dict stored in the exported file (``None`` without one).
        summary: the meta-training summary stored in the exported file (``{}`` without one).
        evaluation: the content of ``eval.json`` (``None`` when it does not exist).
    """

    folder: Path
    records: list[dict]
    optimizer: Path | None
    loss: Path | None
    spec: dict | None
    summary: dict
    evaluation: dict | None


@dataclasses.dataclass
class ScheduleTrace:
    """Step size and rescaling factor each group used at each step of one training run.

    ``step_size[t][k]`` and ``scale[t][k]`` belong to group ``groups[k] = (layer, role)`` at
    step ``t`` (``nan`` where the group took no step)."""

    groups: list[tuple[int, str]]
    step_size: np.ndarray
    scale: np.ndarray
    task: dict
    num_layers: int


@dataclasses.dataclass
class Report:
    """What :func:`make_report` wrote: ``markdown`` (report.md), ``images`` (by key of
    :data:`IMAGES`), ``spec_file`` (or ``None``) and ``notes`` (what is missing, and why)."""

    markdown: Path
    images: dict[str, Path]
    spec_file: Path | None
    notes: list[str]


# --------------------------------------------------------------------------- reading
def _int(text: str) -> int | float:
    """JSON integers past 18 digits as floats (``inf`` beyond float range): a metric is never a
    huge integer, and one would overflow every later conversion."""
    return int(text) if len(text.lstrip("-")) <= 18 else float(text)


def _loads(text: str):
    return json.loads(text, parse_int=_int)


def read_metrics(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` file; :class:`MetascaleError` if it is missing, empty
    or holds a line that is not a metrics record."""
    if not path.is_file():
        raise MetascaleError(f"{path}: no such file (a run folder is what `metascale meta-train --out DIR` writes)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MetascaleError(f"{path}: unreadable: {e}") from None
    records = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = _loads(line)
        except (ValueError, RecursionError):  # also nesting thousands deep
            raise MetascaleError(f"{path}: line {n} is not valid JSON (truncated, corrupted or nested too deeply?)") \
                from None
        ok = isinstance(rec, dict) and isinstance(rec.get("meta_step"), int) and (
            rec.get("meta_loss") is None or (isinstance(rec.get("meta_loss"), (int, float))
                                             and not math.isinf(rec["meta_loss"])))
        if not ok:
            raise MetascaleError(f"{path}: line {n} is not a metrics record (expected a JSON object with an integer "
                                 "meta_step and a number or null meta_loss)")
        records.append(rec)
    if not records:
        raise MetascaleError(f"{path}: holds no metrics records (did meta-training run any meta-step?)")
    return records


def load_run(run_dir: str | Path) -> RunData:
    """Read and validate a run folder (see the module doc); raises :class:`MetascaleError`
    (or its :class:`~metascale.errors.ExportFormatError`) for anything unreadable."""
    from .export import read_loss, read_optimizer
    folder = Path(run_dir)
    if not folder.exists():
        raise MetascaleError(f"{folder}: no such run folder")
    if not folder.is_dir():
        raise MetascaleError(f"{folder}: is not a folder (give the folder `metascale meta-train --out` wrote)")
    records = read_metrics(folder / METRICS)
    opt_path, loss_path = folder / OPTIMIZER, folder / LOSS
    opt_path = opt_path if opt_path.exists() else None
    loss_path = loss_path if loss_path.exists() else None
    spec, summary = None, {}
    if loss_path is not None:
        exp = read_loss(loss_path)
        spec, summary = exp.spec, exp.summary
    if opt_path is not None:
        exp = read_optimizer(opt_path)
        spec, summary = exp.spec, exp.summary
    evaluation = None
    eval_path = folder / EVAL
    if eval_path.exists():
        try:
            evaluation = _loads(eval_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise MetascaleError(f"{eval_path}: not readable JSON ({type(e).__name__}); rerun "
                                 f"`metascale evaluate ... --json {eval_path}`") from None
        opts = evaluation.get("optimizers") if isinstance(evaluation, dict) else None
        if not isinstance(opts, dict) or not opts or not all(
                isinstance(r, dict) and isinstance(r.get("median_curve"), list) for r in opts.values()):
            raise MetascaleError(f"{eval_path}: not the output of `metascale evaluate --json` "
                                 "(no optimizers with a median_curve)")
    return RunData(folder, records, opt_path, loss_path, spec, summary, evaluation)


def trace_schedules(path: str | Path, spec: dict, *, steps: int | None = None, seed: int = 0,
                    index: int = 0) -> ScheduleTrace:
    """Train a model of held-out draw ``index`` (split ``"test"``, ``seed``) of ``spec`` with the
    exported optimizer at ``path`` for ``steps`` steps (default: the meta-training horizon) and
    record the step size and rescaling factor every group used at every step.

    Works for any rule whose optimizer records ``last_step_size`` / ``last_scale`` and carries
    ``layer`` / ``role`` in its parameter groups (all metascale rules do)."""
    from .export import load_optimizer
    from .spec import spec_from_dict
    sp = spec_from_dict(spec, str(spec.get("name", "spec")), f"{path}: stored spec")
    task = sp.sampler("test", seed).task(index)
    steps = steps or sp.inner.horizon
    model = task.make_model()
    opt = load_optimizer(path, model.parameters(), total_steps=steps)  # total_steps: the adaptive rule's budget
    groups = [(int(g["layer"]), str(g["role"])) for g in opt.param_groups]
    eta = np.full((steps, len(groups)), np.nan)
    scale = np.full((steps, len(groups)), np.nan)
    for t in range(steps):
        x, y = task.train_batch(t)
        opt.zero_grad(set_to_none=True)
        task.loss(model(x), y).backward()
        for g in opt.param_groups:  # a group that takes no step this time records nothing
            g.pop("last_step_size", None)
            g.pop("last_scale", None)
        opt.step()
        for k, g in enumerate(opt.param_groups):
            eta[t, k] = float(g.get("last_step_size", math.nan))
            scale[t, k] = float(g.get("last_scale", math.nan))
    num_layers = int(opt.param_groups[0].get("num_layers", 1 + max(layer for layer, _ in groups)))
    return ScheduleTrace(groups, eta, scale, {"split": "test", "seed": seed, "index": index, **task.config},
                         num_layers)


# --------------------------------------------------------------------------- plotting
def _figure(**kw):
    """A matplotlib figure on an Agg canvas (no pyplot, no global backend state)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingExtraError(f"metascale report needs matplotlib: {install_hint('report')}") from None
    fig = Figure(**kw)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=_DPI)
    return path


def _finite(values) -> np.ndarray:
    """Float array with ``None``/non-finite entries as ``nan`` (matplotlib leaves a gap)."""
    a = np.array([math.nan if v is None else v for v in values], dtype=np.float64)
    a[~np.isfinite(a)] = math.nan
    return a


def _positive(values) -> np.ndarray:
    a = _finite(values)
    a[a <= 0] = math.nan
    return a


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` finite values (``nan`` entries are skipped, not
    counted; the first entries average what there is)."""
    out = np.full(values.shape, math.nan)
    buf: list[float] = []
    for i, v in enumerate(values):
        if math.isfinite(v):
            buf.append(v)
            buf = buf[-window:]
        if buf:
            out[i] = sum(buf) / len(buf)
    return out


def plot_meta_loss(records: list[dict], path: Path, *, objective: str | None = None,
                   clip: float | None = None, batch_size: int | None = None, selected: int | None = None) -> Path:
    """Meta-loss (raw, moving average) and meta-gradient norm over meta-steps, with the
    meta-steps that skipped tasks marked, the selection measures (``[meta] select_every``)
    and the exported meta-step ``selected`` (meta-steps done; ``None``: not selected)."""
    x = np.array([r["meta_step"] for r in records])
    loss = _finite([r.get("meta_loss") for r in records])
    gnorm = _positive([r.get("meta_grad_norm") for r in records])
    total = [r.get("skipped_total") or 0 for r in records]
    skipped = np.diff(np.array([0] + total))
    window = min(50, max(3, len(records) // 10)) if len(records) >= 6 else 1
    fig = _figure(figsize=(12, 4.2), layout="constrained")
    ax, bx = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    ax.plot(x, loss, color="tab:blue", alpha=0.35, lw=0.9, marker="." if len(x) <= 60 else None,
            label="meta-loss (mean over the meta-batch)")
    if window > 1:
        ax.plot(x, moving_average(loss, window), color="tab:blue", lw=2.2,
                label=f"moving average ({window} meta-steps)")
    if objective and not objective.startswith("log") and np.nanmin(loss, initial=np.inf) > 0:
        ax.set_yscale("log")
    sel = [(r["meta_step"], r["selection_loss"]) for r in records if isinstance(r.get("selection_loss"), (int, float))]
    if sel:
        ax.plot(*zip(*sel), color="tab:green", lw=1.2, marker="o", ms=3.5,
                label="selection measure (fixed meta-train draws)")
    if selected is not None:
        ax.axvline(selected - 1, color="tab:green", ls="--", lw=1.2, label=f"exported: after meta-step {selected}")
    ax.set_xlabel("meta-step")
    _integer_x(ax)
    ylabel = {"log_mean": "log(mean validation loss over the unroll)", "mean": "mean validation loss over the unroll",
              "final": "final validation loss", "log_final": "log(final validation loss)"}
    ax.set_ylabel("meta-loss: " + ylabel.get(objective or "", "meta-objective"))
    bad = np.flatnonzero(skipped > 0)
    if len(bad):
        trans = ax.get_xaxis_transform()  # x in data, y in axes coordinates
        ax.scatter(x[bad], np.full(len(bad), 0.03), transform=trans, marker="v", s=40, color="tab:red", zorder=5,
                   label=f"meta-step with skipped tasks ({int(total[-1])} tasks in all)")
        for i in bad:
            ax.axvline(x[i], color="tab:red", lw=0.6, alpha=0.4)
            if len(bad) <= 30:  # how many of the meta-batch were skipped
                ax.annotate(str(int(skipped[i])), (x[i], 0.03), xycoords=trans, xytext=(0, 7),
                            textcoords="offset points", ha="center", fontsize=7, color="tab:red")
        bx.scatter(x[bad], np.full(len(bad), 0.03), transform=bx.get_xaxis_transform(), marker="v", s=40,
                   color="tab:red", zorder=5)
    ax.set_title("meta-loss per meta-step" + ("" if len(bad) else "  (no task skipped)"), fontsize=11)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    bx.plot(x, gnorm, color="tab:gray", lw=1, label="meta-gradient norm (before clipping)")
    if clip:
        bx.axhline(clip, color="black", ls="--", lw=1, label=f"clip = {clip:g}")
    if np.isfinite(gnorm).any():
        bx.set_yscale("log")
    bx.set_xlabel("meta-step")
    _integer_x(bx)
    bx.set_ylabel("global norm")
    bx.set_title("meta-gradient norm", fontsize=11)
    bx.legend(fontsize=8, loc="best")
    bx.grid(alpha=0.3, which="both")
    if batch_size:
        fig.suptitle(f"{len(records)} meta-steps, {batch_size} tasks per meta-step", fontsize=10)
    return _save(fig, path)


def _group_styles(groups: list[tuple[int, str]], num_layers: int):
    """Colour by layer (in depth order), line style by role."""
    from matplotlib import colormaps
    cmap = colormaps["tab10"] if num_layers <= 10 else colormaps["viridis"]
    styles = {}
    for layer, role in groups:
        color = cmap(layer) if num_layers <= 10 else cmap(layer / max(1, num_layers - 1))
        styles[(layer, role)] = {"color": color, "ls": "-" if role == "matrix" else "--",
                                 "marker": "osD^vP*X"[layer % 8], "mfc": color if role == "matrix" else "white"}
    return styles


def plot_schedules(trace: ScheduleTrace, path: Path, *, title: str = "") -> Path:
    """Three panels over the inner steps, log-y: step size ``eta``, rescaling factor ``s`` and
    the product ``eta * s`` (the effective step size without momentum), one line per group."""
    steps = np.arange(trace.step_size.shape[0])
    panels = [("step size $\\eta$", trace.step_size), ("rescaling factor $s$", trace.scale),
              ("effective step $\\eta \\cdot s$", trace.step_size * trace.scale)]
    styles = _group_styles(trace.groups, trace.num_layers)
    fig = _figure(figsize=(14, 4.6), layout="constrained")
    axes = fig.subplots(1, 3, sharex=True)
    every = max(len(trace.groups), len(steps) // 8, 1)  # each group its own marker positions
    for ax, (name, data) in zip(axes, panels):
        for k, group in enumerate(trace.groups):
            layer, role = group
            depth = layer / (trace.num_layers - 1) if trace.num_layers > 1 else 0.0
            # markers staggered per group, so lines lying on top of each other stay visible
            ax.plot(steps, _positive(data[:, k]), lw=1.6, ms=4.5, markevery=(k % every, every), alpha=0.9,
                    **styles[group],
                    label=f"layer {layer} (depth {depth:.2f}) {role}")
        ax.set_yscale("log")
        _readable_log_axis(ax, data)
        _integer_x(ax)
        ax.set_title(name, fontsize=11)
        ax.set_xlabel("inner step t")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("value used by opt.step() (log scale)")
    handles, labels = axes[0].get_legend_handles_labels()
    layers = len({layer for layer, _ in trace.groups})
    fig.legend(handles, labels, loc="outside lower center", ncol=layers if layers <= 6 else 4, fontsize=8,
               title="group: layer (relative depth) and role; "
                     "solid, filled = matrix weights; dashed, open = vectors (biases)",
               title_fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _readable_log_axis(ax, data) -> None:
    """Plain-number labels (0.007, 0.01, 0.02) on a log axis, ticks dense enough to read a
    value off it; a view spanning less than a factor 4 is widened to a factor 4 around the
    data (matplotlib would show one label or none there)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    vals = _positive(np.asarray(data, dtype=object).ravel().tolist())
    if not np.isfinite(vals).any():
        return
    lo, hi = float(np.nanmin(vals)), float(np.nanmax(vals))
    if hi / lo < 4:
        mid = math.sqrt(lo * hi)
        lo, hi = mid / 2, mid * 2
        ax.set_ylim(lo, hi)
    decades = math.log10(hi / lo)
    subs = (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.0) if decades < 1 else (1.0, 2.0, 5.0) if decades < 2.5 else (1.0,)
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _integer_x(ax) -> None:
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _curve(ax, row: dict, color, label: str, *, lw: float, band: bool) -> None:
    med = _positive(row["median_curve"])
    t = np.arange(len(med))
    ax.plot(t, med, color=color, lw=lw, label=label)
    if band and "q25_curve" in row and "q75_curve" in row:
        lo, hi = _positive(row["q25_curve"]), _positive(row["q75_curve"])
        ok = np.isfinite(lo) & np.isfinite(hi)
        ax.fill_between(t, lo, hi, where=ok, color=color, alpha=0.18, lw=0)
        ax.plot(t, lo, color=color, lw=0.6, alpha=0.6)
        ax.plot(t, hi, color=color, lw=0.6, alpha=0.6)


def _curve_axes(ax, evaluation: dict, values: list) -> None:
    horizon, steps = evaluation.get("meta_train_horizon"), evaluation.get("steps")
    if horizon and steps and steps > horizon:
        ax.axvline(horizon, color="black", ls=":", lw=1)
        ax.text(horizon, 0.98, " meta-training horizon", transform=ax.get_xaxis_transform(), va="top", fontsize=8)
    ax.set_yscale("log")
    _readable_log_axis(ax, values)
    _integer_x(ax)
    if steps:
        ax.set_xlim(0, steps)
    ax.set_xlabel("training step")
    ax.grid(alpha=0.3, which="both")


def plot_heldout(evaluation: dict, path: Path) -> Path:
    """Top left: median validation loss over training steps on the held-out tasks, every
    optimizer (log-y). Top right: per task, the learned optimizer's final loss divided by each
    baseline's (the tasks and inits are the same for all; box = quartiles, points = tasks,
    log-y). Bottom: the learned optimizer(s) against each baseline alone, with
    the interquartile band (25th-75th percentile over tasks) where ``eval.json`` has it."""
    opts = evaluation["optimizers"]
    names = list(opts)
    learned = [n for n in names if "learned" in n]
    baselines = [n for n in names if n not in learned]
    extra = iter(["tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"])
    colors = {n: _COLORS.get(n) or next(extra, "tab:gray") for n in names}
    pairs = baselines if learned else []
    fig = _figure(figsize=(13, 8.6 if pairs else 4.8), layout="constrained")
    grid = fig.add_gridspec(2 if pairs else 1, max(1, len(pairs)) * 2)
    half = max(1, len(pairs))
    ax = fig.add_subplot(grid[0, :half + half // 2] if half > 1 else grid[0, 0])
    bx = fig.add_subplot(grid[0, half + half // 2:] if half > 1 else grid[0, 1])
    every = [v for n in names for k in ("median_curve", "q25_curve", "q75_curve") for v in opts[n].get(k, [])]
    steps = evaluation.get("steps")
    for n in baselines + learned:
        lr = f", tuned lr {opts[n]['tuned_lr']:.3g}" if "tuned_lr" in opts[n] else ""
        _curve(ax, opts[n], colors[n], f"{n}{lr}", lw=2.4 if n in learned else 1.6, band=False)
    _curve_axes(ax, evaluation, [v for n in names for v in opts[n]["median_curve"]])
    ax.set_ylabel("validation loss (median over tasks)")
    ax.set_title(f"held-out tasks ({evaluation.get('tasks', '?')}): median validation loss", fontsize=11)
    ax.legend(fontsize=8, loc="best")
    has_band = any("q25_curve" in opts[n] for n in names)
    first = None
    for i, base in enumerate(pairs):
        cx = fig.add_subplot(grid[1, 2 * i:2 * i + 2], sharey=first)  # one y-range: panels compare
        first = first or cx
        for n in [base] + learned:  # bands for the pair only: a third one would hide the others
            _curve(cx, opts[n], colors[n], n, lw=2.0, band=n in (base, learned[0]))
        _curve_axes(cx, evaluation, every)
        if i == 0:
            cx.set_ylabel("validation loss: median" + (" and 25th-75th percentile" if has_band else ""))
        cx.set_title(f"{', '.join(learned)} vs {base}", fontsize=10)
        cx.legend(fontsize=8, loc="best")
    if learned and len(names) > 1:
        _plot_ratios(bx, opts, learned[0], [n for n in names if n != learned[0]], colors, steps)
    else:
        _plot_finals(bx, opts, names, colors, steps)
    return _save(fig, path)


def _boxes(ax, groups: list[np.ndarray], labels: list[str], colors: list) -> None:
    """Box (quartiles, whiskers to 1.5 IQR) and every point of each group, log-y."""
    pos = np.arange(1, len(groups) + 1)
    ax.boxplot([g if len(g) else [math.nan] for g in groups], positions=pos, widths=0.5, showfliers=False,
               medianprops={"color": "black"})
    rng = np.random.default_rng(0)
    for p, g, c in zip(pos, groups, colors):
        ax.scatter(p + rng.uniform(-0.15, 0.15, len(g)), g, s=9, color=c, alpha=0.7, zorder=3)
    ax.set_xticks(pos, labels, fontsize=8)
    ax.set_yscale("log")
    _readable_log_axis(ax, np.concatenate(groups) if groups else [])
    ax.grid(alpha=0.3, which="both", axis="y")


def _plot_ratios(ax, opts: dict, primary: str, others: list[str], colors: dict, steps) -> None:
    """Per task (the same held-out tasks, same inits for every optimizer): final loss of the
    learned optimizer ``primary`` divided by each other optimizer's; below 1 = ``primary`` is
    better on that task."""
    groups, labels, cols, notes = [], [], [], []
    mine = np.array(opts[primary].get("final_losses", []), dtype=np.float64)
    for b in others:
        theirs = np.array(opts[b].get("final_losses", []), dtype=np.float64)
        if len(theirs) != len(mine) or not len(mine):
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            r = mine / theirs
        ok = np.isfinite(r) & (r > 0)
        groups.append(r[ok])
        labels.append(f"/ {b}")
        cols.append(colors[b])
        notes.append(f"lower on\n{int(np.sum(mine < theirs))} of {len(mine)}"
                     + (f"\n{int((~ok).sum())} not finite" if (~ok).any() else ""))
    if not groups:
        return _plot_finals(ax, opts, [primary] + others, colors, steps)
    _boxes(ax, groups, labels, cols)
    if max(map(len, labels)) * len(labels) > 60:  # long names: slant them so they do not overlap
        for t in ax.get_xticklabels():
            t.set_rotation(20)
            t.set_horizontalalignment("right")
    ax.axhline(1.0, color="black", lw=1, ls="--")
    for p, text in zip(range(1, len(groups) + 1), notes):
        ax.text(p, 0.98, text, transform=ax.get_xaxis_transform(), ha="center", va="top", fontsize=7)
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi * 1.6)  # room for the notes above the boxes
    ax.set_ylabel(f"final loss of {primary} / the other's, per task")
    ax.set_title(f"paired per task, step {steps} (below 1: {primary} better)", fontsize=11)


def _plot_finals(ax, opts: dict, names: list[str], colors: dict, steps) -> None:
    finals = [_positive(opts[n].get("final_losses", [])) for n in names]
    finals = [f[np.isfinite(f)] for f in finals]
    if not any(len(f) for f in finals):
        return
    _boxes(ax, finals, [n.replace("+", "+\n") for n in names], [colors[n] for n in names])
    for p, n, f in zip(range(1, len(names) + 1), names, finals):
        d = len(opts[n].get("final_losses", [])) - len(f)
        if d:
            ax.text(p, 0.02, f"{d} diverged", transform=ax.get_xaxis_transform(), ha="center", fontsize=7,
                    color="tab:red")
    ax.set_ylabel("final validation loss")
    ax.set_title(f"final loss per task (step {steps})", fontsize=11)


# --------------------------------------------------------------------------- markdown
def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def spec_toml(spec: dict) -> str:
    """A spec dict (``Spec.to_dict()``, as stored in exported files) as TOML that
    :func:`metascale.load_spec` reads back into the same spec (``name`` is the file stem)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in spec.items() if k != "name" and not isinstance(v, dict)]
    for k, v in spec.items():
        if isinstance(v, dict):
            lines.append(f"\n[{k}]")
            lines += [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


def _num(v, fmt: str = ".4g") -> str:
    return "-" if v is None else format(v, fmt)


def heldout_table(evaluation: dict) -> str:
    """The held-out results as a markdown table (the numbers of ``metascale evaluate``)."""
    lines = ["| optimizer | tuned lr | median final loss | IQR (q25 - q75) | steps to Adam | reached Adam | accuracy |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, row in evaluation["optimizers"].items():
        iqr = _num(row.get("iqr_final_loss"))
        if "q25_final_loss" in row and "q75_final_loss" in row:
            iqr += f" ({row['q25_final_loss']:.4g} - {row['q75_final_loss']:.4g})"
        st = row.get("median_steps_to_adam")
        steps = "never" if st is None else f"{st:.0f}"
        reached = f"{row['reached_adam_fraction']:.0%}" if "reached_adam_fraction" in row else "-"
        acc = _num(row.get("median_final_accuracy"), ".3f")
        lines.append(f"| {name} | {_num(row.get('tuned_lr'), '.3g')} | {_num(row.get('median_final_loss'), '.5g')} "
                     f"| {iqr} | {steps} | {reached} | {acc} |")
    return "\n".join(lines)


def _summary_rows(run: RunData) -> list[tuple[str, str]]:
    s, recs = run.summary, run.records
    spec = run.spec or {}
    rows = [("spec", f"`{spec.get('name', '?')}`: {spec.get('description', '')}".strip()),
            ("family", f"`{(spec.get('family') or {}).get('name', '?')}`"),
            ("learned", s.get("learn", "optimizer" if run.optimizer else "loss" if run.loss else "?")),
            ("meta-steps", f"{s.get('meta_steps', len(recs))} ({len(recs)} records in {METRICS})"),
            ("tasks per meta-step", str((spec.get("meta") or {}).get("batch_size", "?"))),
            ("inner steps (horizon)", _horizon_text(spec)),
            ("seed", str(s.get("seed", "?"))),
            ("wall time", f"{s['wall_time_s']:.1f} s" if "wall_time_s" in s
             else f"{_num(recs[-1].get('elapsed_s'), '.1f')} s (from {METRICS})"),
            ("meta-loss (mean of the first / last 10% of meta-steps)", _meta_loss_text(recs)),
            ("skipped tasks", str(s.get("skipped_tasks", recs[-1].get("skipped_total", 0)))),
            ("exported meta-parameters", f"after meta-step {s['selected_meta_step']} (lowest selection measure, "
             f"{_num(s.get('selection_loss'))})" if s.get("selected_meta_step") else "after the last meta-step"),
            ("device, torch", f"{s.get('device', '?')}, {s.get('torch_version', '?')}")]
    if "inner_lr" in s:
        rows.append(("inner SGD step size (learned loss)", f"{s['inner_lr']:.3g}"))
    return rows


def _meta_loss_text(recs: list[dict]) -> str:
    """Mean meta-loss over the first and the last tenth of the meta-steps (single meta-steps
    are too noisy to compare: every one draws other tasks)."""
    n = max(1, len(recs) // 10)

    def mean(rs):
        v = [r["meta_loss"] for r in rs if r.get("meta_loss") is not None]
        return sum(v) / len(v) if v else None
    return f"{_num(mean(recs[:n]))} -> {_num(mean(recs[-n:]))} ({n} meta-step{'s' if n > 1 else ''} each)"


def _horizon_text(spec: dict) -> str:
    inner = spec.get("inner") or {}
    k, w = inner.get("steps"), inner.get("windows", 1)
    if k is None:
        return "?"
    return f"{k * w} ({w} windows of {k})" if w and w > 1 else str(k)


def _evaluate_command(run: RunData, spec_file: Path | None) -> str:
    spec_arg = str(spec_file) if spec_file else "tasks/SPEC.toml"
    target = run.optimizer or run.loss or run.folder / OPTIMIZER
    extra = f" --loss {run.loss}" if run.optimizer and run.loss else ""
    return f"metascale evaluate {target}{extra} --spec {spec_arg} --json {run.folder / EVAL}"


HOW_TO_READ = (
    "**Meta-loss** is the meta-objective of every meta-step, averaged over its meta-batch of freshly drawn "
    "meta-train tasks; tasks differ, so the raw line is noisy and the moving average is what should go down. "
    "Red triangles mark meta-steps where a task's meta-loss or meta-gradient was not finite and the task was "
    "skipped; a few are harmless, many mean the step sizes are too large for part of the task distribution. "
    "A meta-gradient norm that sits above the dashed clip line is being clipped on every step. "
    "**Learned schedules** are the step size `eta`, the rescaling factor `s` (the loss scale of the group) and their "
    "product, exactly as the exported optimizer applies them on a held-out task: each line is one parameter group "
    "(a layer's weight matrix or its bias), grouped by role and relative depth, not by name, so a model of another "
    "size interpolates between these lines. Without momentum only `eta * s` matters; with momentum `s` weighs what "
    "enters the momentum buffer and `eta` how far each step goes. Past the meta-training horizon the last value is "
    "held. **Held-out comparison** trains fresh models on meta-test tasks (never seen in meta-training) with the "
    "learned optimizer and with SGD, SGD+momentum and Adam at learning rates tuned on meta-train tasks; lower is "
    "better. Tasks differ in difficulty, so the spread across tasks (the bands: 25th-75th percentile, in the bottom "
    "panels that pair the learned optimizer with one baseline each) is wide; the top-right panel removes that by "
    "dividing, task by task (same tasks, same initial weights), the learned optimizer's final loss by each "
    "baseline's: below the dashed line at 1 the learned optimizer is better on that task. \"Steps to Adam\" is the "
    "median number of steps the optimizer needs to reach tuned Adam's final loss "
    "on the same task (\"never\" when fewer than half the tasks reach it).")


def _describe_task(config: dict) -> str:
    """The readable part of a task configuration: numbers, strings and short lists (not seeds,
    not the digits family's image indices)."""
    parts = []
    for k, v in config.items():
        if k in ("split", "seed", "index", "name") or k.endswith("seed"):
            continue
        if isinstance(v, float):
            parts.append(f"{k} {v:.3g}")
        elif isinstance(v, (int, str, bool)) or (isinstance(v, list) and len(v) <= 8):
            parts.append(f"{k} {v}")
    return ", ".join(parts)


def make_report(run_dir: str | Path, out: str | Path | None = None, *, progress: bool = True) -> Report:
    """Write the plots and ``report.md`` of the run folder ``run_dir`` into ``out`` (default:
    ``run_dir``); see the module doc for what is written.

    Raises:
        MetascaleError: missing folder, missing or unreadable ``metrics.jsonl``, an unreadable
            exported file or ``eval.json``, ``out`` that is a file.
        MissingExtraError: matplotlib is not installed (the ``report`` extra).
    """
    from tqdm.auto import tqdm

    run = load_run(run_dir)
    out = Path(out) if out is not None else run.folder
    if out.exists() and not out.is_dir():
        raise MetascaleError(f"--out {out}: exists and is not a folder")
    _figure()  # fail before any work when matplotlib is missing
    out.mkdir(parents=True, exist_ok=True)
    spec = run.spec or {}
    name = str(spec.get("name", "spec"))
    images: dict[str, Path] = {}
    notes: list[str] = []
    md: dict[str, str] = {}
    bar = tqdm(total=4, desc="report", disable=not progress, dynamic_ncols=True)

    bar.set_postfix_str("meta-loss")
    images["meta_loss"] = plot_meta_loss(run.records, out / IMAGES["meta_loss"],
                                         objective=(spec.get("inner") or {}).get("objective"),
                                         clip=(spec.get("meta") or {}).get("clip"),
                                         batch_size=(spec.get("meta") or {}).get("batch_size"),
                                         selected=run.summary.get("selected_meta_step"))
    bar.update(1)

    bar.set_postfix_str("schedules")
    trace = None
    from .spec import EXTERNAL
    external = (spec.get("family") or {}).get("name") == EXTERNAL
    if run.optimizer is not None and external:
        notes.append(f"the tasks of this run were drawn outside metascale ({_describe_task(spec['family'])}): the "
                     "report cannot draw a held-out task to trace the learned step sizes on; trace them on a model of "
                     "yours: after each opt.step(), every param group holds last_step_size and last_scale")
    elif run.optimizer is not None:
        seed = int(run.summary.get("seed", 0))
        trace = trace_schedules(run.optimizer, spec, seed=seed)
        task = _describe_task(trace.task)
        title = textwrap.fill(f"{name}: learned step sizes and rescaling factors applied by the exported optimizer "
                              f"on held-out task {trace.task['index']} (seed {seed}; {task})", 150)
        images["schedules"] = plot_schedules(trace, out / IMAGES["schedules"], title=title)
        md["schedules_task"] = task
    elif run.loss is not None:
        notes.append(f"no {OPTIMIZER} in {run.folder}: this run learned a loss only, so there are no learned step "
                     "sizes or rescaling factors to plot (the inner optimizer was plain SGD at the summary's "
                     "inner step size)")
    else:
        notes.append(f"no {OPTIMIZER} or {LOSS} in {run.folder}: meta-training did not finish or export, so there "
                     f"is no spec, no learned schedule and nothing to evaluate; the summary below comes from {METRICS}")
    bar.update(1)

    bar.set_postfix_str("held-out")
    spec_file = None
    if run.spec is not None and not external:  # an external record is no spec a TOML file could draw from
        spec_file = out / f"{name}.toml"
        spec_file.write_text(f"# the spec stored in the exported file of {run.folder}\n" + spec_toml(run.spec),
                             encoding="utf-8")
    if run.evaluation is not None:
        images["heldout"] = plot_heldout(run.evaluation, out / IMAGES["heldout"])
    elif external:
        notes.append(f"no {EVAL} in {run.folder}: evaluate from Python with metascale.evaluate.evaluate on the "
                     f"spec the tasks came from (metascale.interop), write its result to {run.folder / EVAL} "
                     "as JSON and run `metascale report` again")
    elif run.spec is not None:
        notes.append(f"no {EVAL} in {run.folder}: the held-out comparison was not run. Produce it with "
                     f"`{_evaluate_command(run, spec_file)}` and run `metascale report` again")
    bar.update(1)

    bar.set_postfix_str(MARKDOWN)
    path = out / MARKDOWN
    path.write_text(_markdown(run, out, images, notes, spec_file, trace, md, external), encoding="utf-8")
    bar.update(1)
    bar.close()
    return Report(markdown=path, images=images, spec_file=spec_file, notes=notes)


def _rel(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.as_posix()


def _markdown(run: RunData, out: Path, images: dict[str, Path], notes: list[str], spec_file: Path | None,
              trace: ScheduleTrace | None, md: dict[str, str], external: bool = False) -> str:
    spec = run.spec or {}
    L = [f"# metascale report: {spec.get('name', run.folder.name)}", "",
         f"Run folder `{run.folder}`" + (f"; {spec.get('description')}" if spec.get("description") else "") + ".", ""]
    if notes:
        L += ["> **Missing pieces**", ">"] + [f"> - {n}" for n in notes] + [""]
    L += ["## Summary", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in _summary_rows(run)] + [""]
    if external:
        L += ["## Spec", "", "As stored in the exported file (tasks drawn outside metascale):", "",
              "```json", json.dumps(run.spec, indent=1), "```", ""]
    elif run.spec is not None:
        L += ["## Spec", "", f"As stored in the exported file (also written to `{_rel(spec_file, out)}`):", "",
              "```toml", spec_toml(run.spec).rstrip(), "```", ""]
    L += ["## Held-out results", ""]
    ev = run.evaluation
    if ev is not None:
        L += [f"{ev.get('tasks', '?')} meta-test tasks, {ev.get('steps', '?')} training steps (meta-training horizon "
              f"{ev.get('meta_train_horizon', '?')}), seed {ev.get('seed', '?')}; baselines' learning rates tuned on "
              f"meta-train tasks over a log grid of {len(ev.get('lr_grid', []))} rates; final validation loss "
              f"(from `{EVAL}`).", "", heldout_table(ev), "",
              f"![held-out comparison]({_rel(images['heldout'], out)})", ""]
    elif external:
        L += [f"**Not evaluated yet**: `{EVAL}` is missing from the run folder (see *Missing pieces* above).", ""]
    elif run.spec is not None:
        L += [f"**Not evaluated yet**: `{EVAL}` is missing from the run folder. Produce it with", "", "```bash",
              _evaluate_command(run, spec_file), "```", "", "then run `metascale report` again.", ""]
    else:
        L += ["**Not evaluated**: there is no exported file to evaluate (see *Missing pieces* above).", ""]
    L += ["## Meta-training", "", f"![meta-loss]({_rel(images['meta_loss'], out)})", ""]
    L += ["## Learned step sizes and rescaling factors", ""]
    if trace is not None:
        T = trace.step_size.shape[0]
        L += [f"Measured by training held-out task {trace.task['index']} (seed {trace.task['seed']}; "
              f"{md.get('schedules_task', '')}) for {T} steps with the exported optimizer, reading each group's "
              "`last_step_size` and `last_scale` after every `opt.step()`.", "",
              f"![learned schedules]({_rel(images['schedules'], out)})", "",
              "| layer | role | step size eta (first -> last) | rescaling s (first -> last) "
              "| eta * s (first -> last) |",
              "|---:|---|---|---|---|"]
        for k, (layer, role) in enumerate(trace.groups):
            e, s = trace.step_size[:, k], trace.scale[:, k]
            L.append(f"| {layer} | {role} | {e[0]:.3g} -> {e[-1]:.3g} | {s[0]:.3g} -> {s[-1]:.3g} "
                     f"| {e[0] * s[0]:.3g} -> {e[-1] * s[-1]:.3g} |")
        L.append("")
    else:
        L += ["Not plotted (see *Missing pieces* above).", ""]
    L += ["## How to read this", "", HOW_TO_READ, ""]
    return "\n".join(L)
