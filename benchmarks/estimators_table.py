"""PES against truncated backpropagation at the same compute, over meta-training seeds: one rule
and one long-horizon spec meta-trained by each estimator, then measured on the meta-train
validation draws (``validation_draws.py``'s measure) and on the ``heldout`` suite against
AdamW's cached runs (``pretrained_heldout.py``).

    OMP_NUM_THREADS=1 python benchmarks/estimators_table.py --spec tasks/long_mixture.toml \
        --seeds 0 1 2 --out benchmarks/results/estimators_table.json

Equal compute is equal inner steps: PES runs ``--pes-steps`` meta-steps of ``batch`` particles x
2 (antithetic) x ``steps`` inner steps; truncated backpropagation runs ``batch`` tasks x the
whole horizon per meta-step, so it gets ``pes_steps * 2 * steps / horizon`` meta-steps (it also
builds and differentiates a second-order graph, so it does more arithmetic per inner step).
Every meta-training is the CLI command printed (the spec copied with its estimator line
changed, under ``--work``); finished rows are kept in ``--out`` and skipped on a rerun.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from pretrained_heldout import heldout

from metascale.spec import load_spec


def _validation(spec: str, path: str, draws: int, jobs: int) -> float:
    out = Path(path).with_suffix(".validation.json")
    subprocess.run([sys.executable, "benchmarks/validation_draws.py", path, "--spec", spec, "--draws", str(draws),
                    "--jobs", str(jobs), "--out", str(out)], check=True)
    return json.load(open(out))["results"][path]["mean"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="tasks/long_mixture.toml")
    ap.add_argument("--rule", default="adaptive-momentum")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--pes-steps", type=int, default=400)
    ap.add_argument("--estimators", nargs="+", default=["pes", "truncated"])
    ap.add_argument("--cache", default="benchmarks/results/heldout_adamw_reference.json")
    ap.add_argument("--draws", type=int, default=12)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--work", default="runs/estimators")
    ap.add_argument("--out", default="benchmarks/results/estimators_table.json")
    args = ap.parse_args()
    spec = load_spec(args.spec)
    inner, batch = spec.inner, spec.meta.batch_size
    trunc_steps = max(1, round(args.pes_steps * 2 * inner.steps / inner.horizon))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    text = Path(args.spec).read_text()
    rows = json.load(open(args.out))["rows"] if Path(args.out).exists() else []
    for seed in args.seeds:
        for est in args.estimators:
            if any(r["seed"] == seed and r["estimator"] == est for r in rows):
                continue
            spec_path = work / f"{Path(args.spec).stem}_{est}.toml"
            spec_path.write_text(re.sub(r'(?m)^estimator = ".*"$', f'estimator = "{est}"', text))
            steps = args.pes_steps if est == "pes" else trunc_steps
            out = work / f"{est}-s{seed}"
            cmd = ["metascale", "meta-train", "--spec", str(spec_path), "--out", str(out), "--rule", args.rule,
                   "--meta-steps", str(steps), "--jobs", str(args.jobs), "--seed", str(seed), "--quiet", "--force"]
            print("$", " ".join(cmd), flush=True)
            t0 = time.time()
            subprocess.run(cmd, check=True)
            train_s = time.time() - t0
            path = str(out / "optimizer.safetensors")
            val = _validation(str(spec_path), path, args.draws, args.jobs)
            suite = heldout(path, args.cache, args.jobs)
            row = {"seed": seed, "estimator": est, "meta_steps": steps,
                   "inner_steps": steps * batch * (2 * inner.steps if est == "pes" else inner.horizon),
                   "meta_train_s": train_s, "validation": val, "command": " ".join(cmd),
                   **{k: suite[k] for k in ("iqm_speedup", "iqm_normalised_loss", "beats_adamw", "n_tasks",
                                            "diverged_runs", "runs", "wall_s")},
                   "tasks": {n: {k: t[k] for k in ("normalised_loss", "speedup")} for n, t in suite["tasks"].items()}}
            print(f"{est} seed {seed}: validation {val:+.4f}, IQM speedup {row['iqm_speedup']:.3f}, IQM normalised "
                  f"loss {row['iqm_normalised_loss']:.3f}, beats AdamW {row['beats_adamw']}/{row['n_tasks']}, "
                  f"diverged {row['diverged_runs']}/{row['runs']}", flush=True)
            rows.append(row)
            json.dump({"spec": args.spec, "rule": args.rule, "rows": rows}, open(args.out, "w"), indent=1)
    print("| estimator | seed | meta-steps | validation | IQM speedup | IQM normalised loss | beats AdamW | diverged |")
    print("|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["estimator"], r["seed"])):
        print(f"| {r['estimator']} | {r['seed']} | {r['meta_steps']} | {r['validation']:+.4f} | {r['iqm_speedup']:.2f} "
              f"| {r['iqm_normalised_loss']:.2f} | {r['beats_adamw']}/{r['n_tasks']} | {r['diverged_runs']}/{r['runs']} |")


if __name__ == "__main__":
    main()
