"""Learned losses on held-out tasks: alone (SGD inner loop), with the layer-wise optimizer
jointly, and the optimizer alone, over several seeds.

For each (spec, seed): tune SGD's step size on meta-train draws (the evaluation's own tuning),
meta-train (a) the loss under SGD at that step size, (b) the layer-wise optimizer, (c) both
jointly; then evaluate on the spec's meta-test draws: SGD on the task loss vs SGD on the
learned loss at the same tuned step size, the optimizer alone, and the joint pair. Prints a
markdown table, writes JSON.

    python benchmarks/losses.py [--specs tasks/sine.toml tasks/digits.toml] [--seeds 0 1 2] [--tasks 50]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import metascale
import metascale.losses
from metascale.evaluate import BASELINES, evaluate, tune_lr, tuning_tasks

ROOT = Path(__file__).resolve().parent.parent


def run_one(spec_path: Path, seed: int, n_tasks: int, loss_kind: str, meta_steps: int | None,
            loss_only: bool = False) -> dict:
    torch.set_num_threads(1)
    spec = metascale.load_spec(spec_path)
    t0 = time.time()
    T = spec.evaluate.steps or spec.inner.steps
    sgd_lr, _ = tune_lr(BASELINES["sgd"], tuning_tasks(spec, seed), T, spec.evaluate.grid(), "cpu")
    cfg = metascale.losses.LossConfig(kind=loss_kind)
    kw = dict(seed=seed, device="cpu", progress=False, loss_config=cfg, meta_steps=meta_steps)
    only_loss = loss_only
    loss_only = metascale.MetaTrainer(spec, learn="loss", inner_lr=sgd_lr, **kw).train()
    if only_loss:  # just SGD on the learned loss against SGD on the task loss
        out = evaluate({}, spec, n_tasks=n_tasks, seed=seed, device="cpu", progress=False,
                       losses={"sgd+loss_alone": ("sgd", loss_only.loss)})
        out.update(sgd_lr_for_loss=sgd_lr, skipped_tasks={"loss": loss_only.summary["skipped_tasks"]},
                   wall_s=round(time.time() - t0, 1))
        for row in out["optimizers"].values():
            row.pop("median_curve"), row.pop("final_losses")
        return out
    opt_only = metascale.MetaTrainer(spec, learn="optimizer", **kw).train()
    both = metascale.MetaTrainer(spec, learn="both", **kw).train()
    with tempfile.TemporaryDirectory() as d:
        p_opt = metascale.save_optimizer(Path(d) / "o.safetensors", opt_only.meta, spec.optimizer, spec.to_dict(), {})
        p_both = metascale.save_optimizer(Path(d) / "b.safetensors", both.meta, spec.optimizer, spec.to_dict(), {})
        learned = {"optimizer_alone": lambda p, lr: metascale.load_optimizer(p_opt, p, lr=lr),
                   "joint_optimizer": lambda p, lr: metascale.load_optimizer(p_both, p, lr=lr)}
        losses = {"sgd+loss_alone": ("sgd", loss_only.loss), "joint": ("joint_optimizer", both.loss)}
        out = evaluate(learned, spec, n_tasks=n_tasks, seed=seed, device="cpu", progress=False, losses=losses)
    out["optimizers"].pop("joint_optimizer")
    out["sgd_lr_for_loss"] = sgd_lr
    out["skipped_tasks"] = {"loss": loss_only.summary["skipped_tasks"], "optimizer": opt_only.summary["skipped_tasks"],
                            "both": both.summary["skipped_tasks"]}
    out["wall_s"] = round(time.time() - t0, 1)
    for row in out["optimizers"].values():
        row.pop("median_curve"), row.pop("final_losses")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", nargs="+", default=[str(ROOT / "tasks" / "sine.toml"), str(ROOT / "tasks" / "digits.toml")])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--tasks", type=int, default=50, help="held-out tasks per (spec, seed)")
    ap.add_argument("--loss", default="ml3", choices=("ml3", "adaptive_scale"))
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
    names = ["sgd", "sgd+loss_alone", "adam"] if args.loss_only else ["sgd", "sgd+loss_alone", "optimizer_alone",
                                                                       "joint", "adam"]
    print("| spec / seed | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for key, r in results.items():
        o = r["optimizers"]
        def cell(n):
            acc = o[n].get("median_final_accuracy")
            return f"{o[n]['median_final_loss']:.4g}" + (f" / acc {acc:.3f}" if acc is not None else "")
        print(f"| {key} | " + " | ".join(cell(n) for n in names) + " |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
