"""The ``metascale`` command line. It only parses flags and TOML into the library's
dataclasses and calls the library; every error caused by bad input prints one line
``metascale: error: ...`` and exits with code 2."""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from pathlib import Path

from .errors import MetascaleError
from .safeio import clip_text

from .optim.registry import DEFAULT_RULE, RULES


def _int_at_least(lo: int):
    """argparse type: an integer >= ``lo``."""
    what = {0: "a non-negative integer", 1: "a positive integer"}.get(lo, f"an integer >= {lo}")

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v
    return parse


_positive, _nonneg = _int_at_least(1), _int_at_least(0)


def _int_in(lo: int, hi: int):
    """argparse type: an integer in ``[lo, hi]`` (the caps of the spec key of the same meaning)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer in [{lo}, {hi}], got {clip_text(repr(text), 40)}") \
                from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"expected an integer in [{lo}, {hi}], got {clip_text(v, 40)}")
        return v
    return parse


def _cap(cls: type, field: str) -> int:
    """The upper bound a spec config declares for ``field`` (:func:`metascale.config.check`)."""
    import dataclasses
    return next(f.metadata["hi"] for f in dataclasses.fields(cls) if f.name == field)


def _path_arg(flag: str, text: str | None) -> Path | None:
    """``None`` for an absent flag; refuses an empty path (it would mean the current folder)."""
    if text is None:
        return None
    if not text.strip():
        raise MetascaleError(f"{flag}: empty path; give a path")
    return Path(text)


def _check_writable_file(flag: str, path: Path) -> None:
    """Refuse now, before any work, an output file that could not be written later: the folder
    is made and a file of that exact name created (and removed again if it was not there)."""
    if path.is_dir():
        raise MetascaleError(f"{flag} {path}: is a folder; give a file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    existed = path.exists()
    with open(path, "a"):
        pass
    if not existed:
        path.unlink()


def _json_safe(value):
    """``value`` with every non-finite float as ``null`` (``NaN``/``Infinity`` are not JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _write_json(path: Path, value) -> None:
    """Write ``value`` as strict JSON (non-finite numbers as ``null``), atomically: a temporary
    file in the same folder moved over ``path``, so a concurrent writer never interleaves."""
    import tempfile
    text = json.dumps(_json_safe(value), indent=1, allow_nan=False)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


STALE = ("eval.json", "report.md", "optimizer.safetensors", "loss.safetensors", "checkpoint.safetensors",
         "metrics.jsonl")
"""What ``meta-train --force`` removes from an output folder (with the report's PNGs and
leftover temporary checkpoints): every file a previous run or its evaluation and report wrote."""


def _claim_out(out: Path, resume: bool, force: bool) -> None:
    """Called holding ``out``'s lock: refuse a folder that holds files unless resuming or
    forced; with ``force``, remove what a previous run left (:data:`STALE`)."""
    from .report import IMAGES
    from .runlock import NAME
    held = sorted(p.name for p in out.iterdir() if p.name != NAME)
    if not held or resume:
        return
    if not force:
        raise MetascaleError(f"--out {out}: holds {clip_text(', '.join(held), 120)}; pass --resume to continue its run, "
                             "--force to start afresh there (removes the previous run's files), or give another folder")
    stale = set(STALE) | set(IMAGES.values())
    for p in out.iterdir():
        if p.name in stale or (p.name.startswith("checkpoint.safetensors.") and p.name.endswith(".tmp")):
            p.unlink()


def _threads_jobs(args: argparse.Namespace, device, limit: int | None = None) -> tuple[int | None, int]:
    """Resolve ``--threads``/``--jobs`` (metascale.parallel.resolve) and set this process's
    threads. Under torchrun (WORLD_SIZE > 1) the launcher already made the processes."""
    import os

    from .parallel import resolve, set_threads
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if launched and args.jobs and args.jobs > 1:
        raise MetascaleError(f"--jobs {args.jobs}: this process is one of {os.environ['WORLD_SIZE']} started by "
                             "torchrun; use torchrun --nproc_per_node or --jobs, not both")
    try:
        threads, jobs = resolve(args.threads, 1 if launched else args.jobs, device, limit)
    except ValueError as e:  # a bad METASCALE_JOBS
        raise MetascaleError(str(e)) from None
    if device.type == "cuda" and jobs > 1:
        import torch
        if torch.cuda.device_count() < jobs:
            raise MetascaleError(f"--jobs {jobs} on CUDA needs one GPU per process; {torch.cuda.device_count()} "
                                 "visible")
    set_threads(threads)
    return threads, jobs


def cmd_tasks(args: argparse.Namespace) -> int:
    """List the specs in a folder with their one-line descriptions."""
    from .spec import default_spec_dir, load_spec
    folder = Path(args.dir) if args.dir else default_spec_dir()
    if not folder.is_dir():
        raise MetascaleError(f"{folder}: no such folder of task specs")
    files = sorted(folder.glob("*.toml"))
    if not files:
        raise MetascaleError(f"{folder}: holds no *.toml task specs")
    width = max(len(str(f)) for f in files)
    for f in files:
        spec = load_spec(f)
        k = f"K={spec.inner.steps}" + (f"x{spec.inner.windows}" if spec.inner.windows > 1 else "")
        print(f"{str(f):<{width}}  [{spec.family_name}, {k}]  {spec.description}")
    return 0


def cmd_meta_train(args: argparse.Namespace) -> int:
    """Meta-train, then export ``OUT/optimizer.safetensors`` and ``OUT/metrics.jsonl``."""
    from .spec import load_spec
    from .meta import resolve_device
    spec = load_spec(args.spec)
    if args.engine:
        import dataclasses
        spec = dataclasses.replace(spec, inner=dataclasses.replace(spec.inner, engine=args.engine))
    device = resolve_device(args.device)
    threads, jobs = _threads_jobs(args, device, spec.meta.batch_size)
    out = _path_arg("--out", args.out)
    if out.exists() and not out.is_dir():
        raise MetascaleError(f"--out {out}: exists and is not a folder")
    if args.resume and args.force:
        raise MetascaleError("--resume continues the run in --out; --force starts afresh there: give one")
    checkpoint = out / "checkpoint.safetensors"
    if args.resume:  # the file itself before any work; that it is this run's, in train()
        from .meta.checkpoint import read_checkpoint
        if not checkpoint.is_file():
            raise MetascaleError(f"--resume: no checkpoint {checkpoint} to resume from; run without --resume to start")
        read_checkpoint(checkpoint)
    # the process that writes (not a rank --jobs started, nor a torchrun rank > 0) holds the lock
    writer = not getattr(args, "rank_process", False) and os.environ.get("RANK", "0") == "0"
    if not writer:
        return _meta_train(args, spec, device, threads, jobs, out, checkpoint)
    from .runlock import folder_lock
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out):
        _claim_out(out, args.resume, args.force)
        return _meta_train(args, spec, device, threads, jobs, out, checkpoint)


def _meta_train(args, spec, device, threads, jobs, out: Path, checkpoint: Path) -> int:
    """The body of ``meta-train`` once the output folder is claimed."""
    from .export import save_optimizer
    from .meta import MetaTrainer
    from .meta.distributed import init_from_env, world
    if jobs > 1:  # --jobs N: N local ranks of one gloo group, as torchrun would start them
        from .parallel import launch
        return launch(_run, (argparse.Namespace(**{**vars(args), "jobs": None, "threads": threads,
                                                   "rank_process": True}),), jobs, threads=threads)
    init_from_env(device)  # under torchrun or --jobs: each rank unrolls its share of every meta-batch
    rank, size = world()
    from .losses import LossConfig
    inner_lr = None
    if args.learn == "loss":  # the loss trains under plain SGD at its step size tuned on the task loss
        from .evaluate import BASELINES, tune_lr, tuning_tasks
        # the same tasks, horizon and grid as `evaluate --seed S` uses for its SGD baseline
        inner_lr, _ = tune_lr(BASELINES["sgd"], tuning_tasks(spec, args.seed), spec.evaluate.steps or spec.inner.horizon,
                              spec.evaluate.grid(), device)
        print(f"inner SGD step size tuned on meta-train tasks (task loss): {inner_lr:.3g}")
    trainer = MetaTrainer(spec, seed=args.seed, device=device, meta_steps=args.meta_steps,
                          progress=not args.quiet, learn=args.learn, loss_config=LossConfig(kind=args.loss),
                          inner_lr=inner_lr, rule=args.rule)
    result = trainer.train(metrics_path=out / "metrics.jsonl", checkpoint_path=checkpoint,
                           checkpoint_every=args.checkpoint_every, resume=args.resume)
    if size > 1:
        from .meta.distributed import leave
        leave()  # after the last collective, before rank 0 writes and any rank exits
    if rank != 0:  # only rank 0 writes files and logs
        return 0
    s = result.summary
    if s["meta_steps"] > 0 and s.get("skipped_meta_steps") == s["meta_steps"] and not args.allow_diverged:
        raise MetascaleError(f"every task of all {s['meta_steps']} meta-step(s) diverged (non-finite meta-loss or "
                             "meta-gradient): the meta-parameters never moved, nothing exported (see tasks_skipped in "
                             f"{out / 'metrics.jsonl'}); lower [meta] lr or the spec's init_lr, or pass "
                             "--allow-diverged to export the untrained optimizer anyway")
    written = []
    if args.learn in ("optimizer", "both"):
        written.append(save_optimizer(out / "optimizer.safetensors", result.meta, result.rule, spec.to_dict(),
                                      result.summary))
    if args.learn in ("loss", "both"):
        from .export import save_loss
        written.append(save_loss(out / "loss.safetensors", result.loss, spec.to_dict(), result.summary))
    s = result.summary
    if size > 1:
        print(f"distributed over {size} processes (torch.distributed)")
    print(f"meta-trained {spec.name} for {s['meta_steps']} meta-steps in {s['wall_time_s']} s "
          f"(skipped tasks {s['skipped_tasks']})")
    fmt = lambda x: "-" if x is None else f"{x:.4g}"
    if s.get("selection_loss") is not None:
        print(f"  selection meta-loss ({spec.inner.objective} objective, {spec.meta.select_tasks} fixed meta-train "
              f"draws, lower is better): untrained {fmt(s.get('selection_loss_untrained'))} -> exported "
              f"{fmt(s['selection_loss'])} (meta-step {s['selected_meta_step']})")
    print(f"  training meta-loss (each meta-step's own {spec.meta.batch_size} draws, so noisy): first meta-step "
          f"{fmt(s['first_meta_loss'])}, mean of the last 10% {fmt(s['final_meta_loss_avg_last_10pct'])}")
    if "resumed_from_meta_step" in s:
        print(f"resumed from the checkpoint at meta-step {s['resumed_from_meta_step']}")
    if s["skipped_tasks"]:
        print(f"warning: {s['skipped_tasks']} inner run(s) diverged (non-finite loss or meta-gradient) and were "
              f"dropped from the meta-gradient; {s['skipped_meta_steps']} meta-step(s) had no finite task and left "
              "the meta-parameters unchanged (see tasks_skipped and skipped_draws in metrics.jsonl)")
    print(f"wrote {', '.join(map(str, written))} and {out / 'metrics.jsonl'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate an exported optimizer on held-out tasks next to tuned baselines."""
    from .evaluate import BASELINES, FileOptimizer, eval_steps, evaluate, format_table
    from .export import read_optimizer
    from .meta import resolve_device
    from .spec import load_spec
    from .export import file_format, read_loss
    json_path = _path_arg("--json", args.json)
    if json_path is not None:  # before any work: an unwritable path fails now, not after the evaluation
        _check_writable_file("--json", json_path)
    spec = load_spec(args.spec) if args.spec else stored_spec(args.file)
    T = eval_steps(spec, args.steps)
    baselines = None
    if args.baselines:
        baselines = list(BASELINES) if args.baselines == "all" else [b.strip() for b in args.baselines.split(",")]
        bad = [b for b in baselines if b not in BASELINES]
        if bad or not baselines:
            raise MetascaleError(f"--baselines: unknown baseline {bad[0] if bad else ''!r}; choose from "
                                 f"{', '.join(BASELINES)} (comma-separated) or all")
    is_loss = file_format(args.file) == "metascale.loss"
    learned, losses = {}, {}
    if is_loss:  # a learned loss alone: SGD on it vs SGD on the task loss, at equal tuned step size
        if args.loss:
            raise MetascaleError("--loss: FILE is already a learned loss; give an optimizer file with --loss")
        losses["sgd+learned_loss"] = ("sgd", read_loss(args.file).module)
    else:
        read_optimizer(args.file)  # validate every input before any work
        learned["learned"] = FileOptimizer(str(args.file), total_steps=T)  # picklable, for --jobs
        if args.loss:
            losses["learned+learned_loss"] = ("learned", read_loss(args.loss).module)
    for other in args.compare or []:  # more exported optimizers, rows named by their rule
        exp = read_optimizer(other)
        name = f"learned_{exp.rule}"
        while name in learned:
            name += "'"
        learned[name] = FileOptimizer(str(other), total_steps=T)
    device = resolve_device(args.device)
    threads, jobs = _threads_jobs(args, device)
    result = evaluate(learned, spec, n_tasks=args.tasks, steps=args.steps, seed=args.seed, device=device,
                      progress=not args.quiet, losses=losses, baselines=baselines, jobs=jobs, threads=threads)
    result["file"] = str(args.file)
    print(format_table(result))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        _write_json(json_path, result)
        print(f"wrote {json_path}")
    return 0


def stored_spec(file: str):
    """The spec an exported optimizer or loss file was meta-trained on, to draw its tasks."""
    from .export import file_format, read_loss, read_optimizer
    from .spec import EXTERNAL, is_import_path, spec_from_dict
    exp = read_loss(file) if file_format(file) == "metascale.loss" else read_optimizer(file)
    family = exp.spec.get("family") if isinstance(exp.spec.get("family"), dict) else {}
    name = family.get("name")
    if name == EXTERNAL:
        raise MetascaleError(f"{file}: its tasks were drawn outside metascale ({family.get('source', '?')}); "
                             "evaluate from Python with the same spec (metascale.evaluate.evaluate), or give --spec")
    if is_import_path(name):
        raise MetascaleError(f"{file}: its stored spec names the family {name!r} by import path, and metascale "
                             "imports no module a file names: give --spec (the TOML that names it)")
    spec = spec_from_dict(exp.spec, str(exp.spec.get("name", "stored")), f"{file}: stored spec")
    print(f"spec: the one stored in {file} ({spec.name})")
    return spec


def cmd_info(args: argparse.Namespace) -> int:
    """Describe an exported optimizer file."""
    from .config import to_dict
    from .export import FORMAT_VERSION, read_optimizer
    exp = read_optimizer(args.file)
    rule = RULES[exp.rule]
    print(f"{args.file}: metascale optimizer, rule {exp.rule}, format version {FORMAT_VERSION}")
    print(f"rule {exp.rule}: {rule.summary}")
    print(f"config: {json.dumps(to_dict(exp.config))}")
    print(f"meta-trained on: {exp.spec.get('name')} ({exp.spec.get('description', '')}), horizon {exp.horizon}")
    print(f"summary: {json.dumps(exp.summary)}")
    print("group mapping rule:")
    for k, v in exp.group_mapping.items():
        print(f"  {k}: {v}")
    for line in rule.describe(exp.meta, exp.config, exp.horizon):
        print(line)
    nt = exp.summary.get("never_trained")
    if not isinstance(nt, dict):
        print("never-trained meta-parameters: not recorded (a file written before they were tracked, or an "
              "ES/PES estimator)")
    else:
        untouched = sum(nt.get("entries", {}).values())
        print(f"never-trained meta-parameters: {untouched} of {sum(nt.get('sizes', {}).values())} entries received "
              "no meta-gradient" + ("; (role, depth) anchors never reached: " + ", ".join(
                  f"{a['role']} depth {a['depth']:.2f}" for a in nt["anchors"]) + " (models with a layer there "
                  "get their untrained values; load_optimizer warns)" if nt.get("anchors") else
                  "; every (role, depth) anchor was reached"))
    return 0


def cmd_pretrained(args: argparse.Namespace) -> int:
    """List the pretrained optimizers that ship with metascale: load one with
    metascale.load_optimizer("NAME", model.parameters()); any command that takes an optimizer
    file takes its name."""
    from .pretrained import catalog
    for name, e in catalog().items():
        print(f"{name}  (rule {e['rule']}, {e['file']})")
        for key in ("summary", "meta_trained_on", "meta_training", "state", "heldout_suite", "prefer_adamw_when"):
            if e.get(key):
                print(f"  {key.replace('_', ' ')}: {e[key]}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Plot a run folder (meta-loss, learned step sizes and rescaling factors per layer, held-out
    comparison from eval.json) and write a markdown summary, report.md, that embeds the plots."""
    from .report import make_report
    _path_arg("--out", args.out)
    rep = make_report(args.run_dir, args.out, progress=not args.quiet)
    for note in rep.notes:
        print(f"note: {note}")
    print(f"wrote {rep.markdown} with {', '.join(p.name for p in rep.images.values())}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (one sub-command per verb, each with ``--help``)."""
    from .parallel import add_arguments as add_parallel_arguments
    from .spec import EvaluateConfig, MetaConfig
    p = argparse.ArgumentParser(
        prog="metascale",
        description="Meta-train layer-wise learnable optimizers (per-layer step sizes and rescaling factors) "
                    "on task distributions, export them, and use them as torch optimizers.",
        epilog="Example: metascale meta-train --spec tasks/sine.toml --out runs/sine && "
               "metascale evaluate runs/sine/optimizer.safetensors --spec tasks/sine.toml")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    t = sub.add_parser("tasks", help="list the task-distribution specs", description=cmd_tasks.__doc__)
    t.add_argument("--dir", help="folder of *.toml specs (default: ./tasks, else the repository's tasks/)")
    t.set_defaults(func=cmd_tasks)

    m = sub.add_parser("meta-train", help="meta-train and export an optimizer", description=cmd_meta_train.__doc__)
    m.add_argument("--spec", required=True, help="task-distribution spec, e.g. tasks/sine.toml")
    m.add_argument("--out", required=True, help="output folder (optimizer.safetensors, metrics.jsonl)")
    m.add_argument("--rule", default=DEFAULT_RULE, choices=list(RULES), metavar="RULE",
                   help="learnable optimizer rule: " + "; ".join(f"{n}: {r.summary}" for n, r in RULES.items())
                        + f" (default: {DEFAULT_RULE})")
    m.add_argument("--learn", default="optimizer", choices=("optimizer", "loss", "both"),
                   help="what to meta-train: the layer-wise optimizer (OUT/optimizer.safetensors), a learned loss "
                        "under plain SGD at its tuned step size (OUT/loss.safetensors), or both jointly")
    m.add_argument("--loss", default="ml3", choices=("ml3", "adaptive_scale"),
                   help="learned loss kind for --learn loss|both (default: ml3)")
    m.add_argument("--meta-steps", type=_int_in(0, _cap(MetaConfig, "steps")),
                   help="meta-steps (default: the spec's [meta] steps)")
    m.add_argument("--engine", choices=("higher", "func"),
                   help="differentiable inner loop: higher or torch.func (default: the spec's [inner] engine, "
                        "else higher); [inner] windows > 1 always uses func")
    m.add_argument("--seed", type=_nonneg, default=0, help="seed of task draws and model inits (default 0)")
    m.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:N]")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    m.add_argument("--checkpoint-every", type=_nonneg, default=10, metavar="N",
                   help="write OUT/checkpoint.safetensors every N meta-steps and after the last (0: never; "
                        "default 10)")
    m.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.safetensors (same spec, seed, --learn, --rule, --loss, "
                        "--engine); the result equals an uninterrupted run's. With a larger --meta-steps it extends a "
                        "finished run")
    m.add_argument("--force", action="store_true",
                   help="start afresh in an --out folder that holds files (removes the previous run's optimizer, "
                        "loss, checkpoint, metrics, eval.json and report); without it such a folder is refused")
    m.add_argument("--allow-diverged", action="store_true",
                   help="export even when every task of every meta-step diverged (the untrained optimizer); without "
                        "it such a run exits with code 2 and exports nothing")
    add_parallel_arguments(m, "the tasks of each meta-batch", "task")
    m.set_defaults(func=cmd_meta_train)

    e = sub.add_parser("evaluate", help="compare an exported optimizer with tuned baselines on held-out tasks",
                       description=cmd_evaluate.__doc__ + " Baseline learning rates (SGD, SGD+momentum, Adam) are "
                       "tuned on meta-train draws over a log grid; evaluation uses meta-test draws.")
    e.add_argument("file", help="exported optimizer or learned loss (.safetensors); a loss is compared as "
                                "SGD on it against SGD on the task loss at the same tuned step size")
    e.add_argument("--loss", help="a learned loss file to also train the exported optimizer on "
                                  "(row learned+learned_loss)")
    e.add_argument("--compare", nargs="+", metavar="FILE",
                   help="more exported optimizers to run on the same tasks (e.g. the static layer-wise one next to "
                        "an adaptive one); rows learned_<rule>")
    e.add_argument("--baselines", help="comma-separated baselines from sgd, sgd_momentum, adam, adafactor, prodigy, "
                                       "schedulefree_adamw, or all (default: the spec's [evaluate] baselines; "
                                       "prodigy/schedulefree need the baselines extra: pip install -e '.[baselines]' in the "
                                       "repository)")
    e.add_argument("--spec", help="task-distribution spec whose meta-test draws are used (default: the spec "
                                  "stored in FILE, the one it was meta-trained on)")
    e.add_argument("--tasks", type=_int_in(1, _cap(EvaluateConfig, "tasks")),
                   help="held-out tasks N (default: the spec's [evaluate] tasks)")
    e.add_argument("--steps", type=_int_in(1, _cap(EvaluateConfig, "steps")),
                   help="training steps T (default: the spec's, else its K)")
    e.add_argument("--json", help="write the full result (per optimizer: median_final_loss, iqr_final_loss, "
                                  "tuned_lr, median_steps_to_adam, curves) to this JSON file; strict JSON: a "
                                  "non-finite number (a diverged run's loss) is written as null")
    e.add_argument("--seed", type=_nonneg, default=0, help="seed of the held-out draws (default 0)")
    e.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    add_parallel_arguments(e, "the training runs", "task")
    e.set_defaults(func=cmd_evaluate)

    i = sub.add_parser("info", help="describe an exported optimizer file", description=cmd_info.__doc__)
    i.add_argument("file", help="exported optimizer (.safetensors)")
    i.set_defaults(func=cmd_info)

    pt = sub.add_parser("pretrained", help="list the pretrained optimizers that ship with metascale",
                        description=cmd_pretrained.__doc__)
    pt.set_defaults(func=cmd_pretrained)

    r = sub.add_parser("report", help="plot a run folder and write report.md", description=cmd_report.__doc__)
    r.add_argument("run_dir", metavar="RUN_DIR", help="folder written by `metascale meta-train --out` (metrics.jsonl, "
                                                      "optimizer.safetensors; eval.json if evaluated into it)")
    r.add_argument("--out", help="folder for report.md and the PNG plots (default: RUN_DIR)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_report)

    from .bench import add_parser as add_bench_parser  # metascale bench (metascale/bench.py)
    add_bench_parser(sub)
    return p


def _run(args: argparse.Namespace) -> int:
    """Run a parsed command: an error caused by bad input prints one line and returns 2 (also
    the entry point of each process that ``--jobs`` starts)."""
    try:
        return args.func(args)
    except MetascaleError as e:
        message = str(e)
    except RecursionError:
        message = "input nested too deeply to read (RecursionError): a spec, metrics or JSON file nested thousands deep?"
    except MemoryError:
        message = "out of memory: a size in the spec, the command line or an input file is too large for this machine"
    except BrokenPipeError:  # the reader went away (metascale tasks | head): not an error of ours
        try:
            sys.stdout = open(os.devnull, "w")  # no second complaint when Python flushes stdout at exit
        except OSError:
            pass
        return 0
    except OSError as e:  # outputs: unwritable, over-long path, full disk, ...
        where = f"{e.filename}: " if e.filename else ""
        message = f"{where}{e.strerror or type(e).__name__}" + (f" (errno {e.errno})" if e.errno else "")
    except KeyboardInterrupt:
        print("metascale: interrupted", file=sys.stderr)
        return 130
    print(f"metascale: error: {one_line(message)}", file=sys.stderr)
    return 2


def one_line(message: str, limit: int = 400) -> str:
    """``message`` on one line (whitespace runs become one space), cut to ``limit`` characters."""
    return clip_text(" ".join(str(message).split()), limit)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``metascale`` console script."""
    return _run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
