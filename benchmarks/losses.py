"""Learned losses on held-out tasks: alone (SGD inner loop), with the layer-wise optimizer
jointly, and the optimizer alone, over several seeds.

For each (spec, seed): tune SGD's step size on meta-train draws (the evaluation's own tuning),
meta-train (a) the loss under SGD at that step size, (b) the layer-wise optimizer, (c) both
jointly; then evaluate on the spec's meta-test draws: SGD on the task loss vs SGD on the
learned loss at the same tuned step size, the optimizer alone, and the joint pair. Prints a
markdown table, writes JSON.

Next to the medians it reports, on the same held-out tasks, paired statistics (geometric mean
of per-task final-loss ratios, fraction of tasks won; for classification the mean accuracy
difference) and the *resolution* of the median: SGD on the task loss at 0.9x, 0.95x, 1.05x and
1.1x its tuned step size. At the tuned sine rate SGD runs at the edge of stability and a 5%
change of step size moves the median over 50 tasks by up to 40%; a median difference inside
that band is not a result.

The medians are over 500 held-out tasks by default: on meta-train validation draws, SGD at
0.9x-1.1x the tuned sine rate moved the median over 50 tasks by -26% to +46%, over 500 tasks
by -5% to +3% (docs/benchmarks.md, "Learned losses").

    python benchmarks/losses.py [--specs tasks/sine.toml tasks/digits.toml] [--seeds 0 1 2] [--tasks 500]
                                [--loss adaptive_scale|ml3] [--loss-only]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import metascale
import metascale.losses
from metascale.evaluate import BASELINES, evaluate, tune_lr, tuning_tasks

ROOT = Path(__file__).resolve().parent.parent


BAND = (0.9, 0.95, 1.05, 1.1)  # step-size multipliers of the SGD noise band
PAIRS = (("sgd+loss_alone", "sgd"), ("joint", "optimizer_alone"), ("joint", "sgd+loss_alone"))


def paired(a: dict, b: dict) -> dict:
    """Per-task comparison of two rows of one evaluation (same tasks, same inits): geometric
    mean of final-loss ratios a/b (losses capped at 1e3 so a divergence counts as a large
    finite ratio), fraction of tasks where a ends lower, and the mean accuracy difference."""
    fa, fb = (np.minimum(np.asarray(r["final_losses"], dtype=np.float64), 1e3) for r in (a, b))
    out = {"gmean_ratio": float(np.exp(np.mean(np.log(fa) - np.log(fb)))), "win_fraction": float(np.mean(fa < fb))}
    if a.get("final_accuracies") is not None:
        out["mean_accuracy_gain"] = float(np.mean(np.subtract(a["final_accuracies"], b["final_accuracies"])))
    return out


def run_one(spec_path: Path, seed: int, n_tasks: int, loss_kind: str, meta_steps: int | None,
            loss_only: bool = False) -> dict:
    torch.set_num_threads(1)
    spec = metascale.load_spec(spec_path)
    t0 = time.time()
    T = spec.evaluate.steps or spec.inner.steps
    sgd_lr, _ = tune_lr(BASELINES["sgd"], tuning_tasks(spec, seed), T, spec.evaluate.grid(), "cpu")
    cfg = metascale.losses.LossConfig(kind=loss_kind)
    kw = dict(seed=seed, device="cpu", progress=False, loss_config=cfg, meta_steps=meta_steps)
    band = {f"sgd@{m}x": (lambda p, lr, m=m: torch.optim.SGD(p, lr=m * sgd_lr)) for m in BAND}
    only_loss = loss_only
    loss_only = metascale.MetaTrainer(spec, learn="loss", inner_lr=sgd_lr, **kw).train()
    if only_loss:  # just SGD on the learned loss against SGD on the task loss
        out = evaluate(band, spec, n_tasks=n_tasks, seed=seed, device="cpu", progress=False,
                       losses={"sgd+loss_alone": ("sgd", loss_only.loss)})
        out.update(sgd_lr_for_loss=sgd_lr, skipped_tasks={"loss": loss_only.summary["skipped_tasks"]},
                   wall_s=round(time.time() - t0, 1))
        return _finish(out)
    opt_only = metascale.MetaTrainer(spec, learn="optimizer", **kw).train()
    both = metascale.MetaTrainer(spec, learn="both", **kw).train()
    with tempfile.TemporaryDirectory() as d:
        p_opt = metascale.save_optimizer(Path(d) / "o.safetensors", opt_only.meta, opt_only.rule, spec.to_dict(), {})
        p_both = metascale.save_optimizer(Path(d) / "b.safetensors", both.meta, both.rule, spec.to_dict(), {})
        learned = {"optimizer_alone": lambda p, lr: metascale.load_optimizer(p_opt, p, lr=lr),
                   "joint_optimizer": lambda p, lr: metascale.load_optimizer(p_both, p, lr=lr), **band}
        losses = {"sgd+loss_alone": ("sgd", loss_only.loss), "joint": ("joint_optimizer", both.loss)}
        out = evaluate(learned, spec, n_tasks=n_tasks, seed=seed, device="cpu", progress=False, losses=losses)
    out["optimizers"].pop("joint_optimizer")
    out["sgd_lr_for_loss"] = sgd_lr
    out["skipped_tasks"] = {"loss": loss_only.summary["skipped_tasks"], "optimizer": opt_only.summary["skipped_tasks"],
                            "both": both.summary["skipped_tasks"]}
    out["wall_s"] = round(time.time() - t0, 1)
    return _finish(out)


def _finish(out: dict) -> dict:
    """Move the SGD band into ``sgd_band`` (median final loss per multiplier), add the paired
    statistics, drop the per-task lists and curves."""
    rows = out["optimizers"]
    out["sgd_band"] = {k.split("@")[1]: rows.pop(k)["median_final_loss"] for k in [k for k in rows if "@" in k]}
    out["paired"] = {f"{a} vs {b}": paired(rows[a], rows[b]) for a, b in PAIRS if a in rows and b in rows}
    for row in rows.values():
        for k in [k for k in row if k.endswith("_curve") or k in ("final_losses", "final_accuracies")]:
            row.pop(k)
    return out


def table(results: dict, loss_only: bool) -> str:
    """Markdown table: medians (and median accuracy), the SGD band, and the paired statistics."""
    names = ["sgd", "sgd+loss_alone", "adam"] if loss_only else ["sgd", "sgd+loss_alone", "optimizer_alone",
                                                                  "joint", "adam"]
    pairs = [p for p in PAIRS if all(n in names for n in p)]
    head = ["spec / seed", *names, "SGD at 0.9-1.1x lr"] + [f"{a} / {b}" for a, b in pairs]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for key, r in results.items():
        o = r["optimizers"]
        def cell(n):
            acc = o[n].get("median_final_accuracy")
            return f"{o[n]['median_final_loss']:.4g}" + (f" (acc {acc:.3f})" if acc is not None else "")
        band = list(r["sgd_band"].values())
        def pcell(a, b):
            p = r["paired"][f"{a} vs {b}"]
            acc = f", acc {p['mean_accuracy_gain']:+.3f}" if "mean_accuracy_gain" in p else ""
            return f"x{p['gmean_ratio']:.3f}, wins {p['win_fraction']:.0%}{acc}"
        lines.append(f"| {key} | " + " | ".join(cell(n) for n in names) + f" | {min(band):.4g}-{max(band):.4g} | "
                     + " | ".join(pcell(a, b) for a, b in pairs) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", nargs="+", default=[str(ROOT / "tasks" / "sine.toml"), str(ROOT / "tasks" / "digits.toml")])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--tasks", type=int, default=500, help="held-out tasks per (spec, seed)")
    ap.add_argument("--loss", default="adaptive_scale", choices=metascale.losses.KINDS)
    ap.add_argument("--meta-steps", type=int, default=None)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--loss-only", action="store_true", help="only SGD on the learned loss vs SGD on the task loss")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "losses.json"))
    args = ap.parse_args()
    from concurrent.futures import ProcessPoolExecutor
    jobs = [(Path(s), seed) for s in args.specs for seed in args.seeds]
    with ProcessPoolExecutor(args.jobs) as ex:
        futs = {j: ex.submit(run_one, j[0], j[1], args.tasks, args.loss, args.meta_steps, args.loss_only) for j in jobs}
        results = {f"{p.stem}/seed{s}": f.result() for (p, s), f in futs.items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "torch": torch.__version__, "results": results}, indent=1))
    print(table(results, args.loss_only))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
