"""The README's main-job table and its spread over seeds and thread counts, by one command.

For every rule, seed and ``OMP_NUM_THREADS`` value it runs exactly the commands of
``scripts/run.sh`` (``metascale meta-train --spec tasks/sine.toml --rule R --seed S`` then
``metascale evaluate ... --json``; the held-out draws use evaluate's default seed 0) into
``ROOT/{rule}-s{seed}-t{threads}/``, skipping a folder that already holds ``eval.json`` (so an
interrupted sweep continues), then prints the README table of the first run and, per rule, the
learned optimizer's median final loss, steps to Adam and share of tasks reaching Adam over the
runs, and whether the exported tensors of runs that differ only in the thread count are
identical. Writes ``benchmarks/results/quickstart_spread.json``. Each run takes 4-7 minutes on
the 2-core machine.

    python benchmarks/quickstart_spread.py [--rules layerwise adaptive-momentum] [--seeds 0 1 2]
        [--threads 1 2] [--root runs/quickstart-spread]

Runs are independent: ``METASCALE_JOBS=1`` keeps each on one process (its result does not depend
on ``--jobs``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
SPEC = "tasks/sine.toml"


def run_one(root: Path, rule: str, seed: int, threads: int) -> Path:
    out = root / f"{rule}-s{seed}-t{threads}"
    if (out / "eval.json").is_file():
        return out
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "METASCALE_JOBS": "1"}
    cli = [sys.executable, "-m", "metascale.cli"]
    subprocess.run([*cli, "meta-train", "--spec", SPEC, "--out", str(out), "--rule", rule, "--seed", str(seed),
                    "--quiet"], check=True, cwd=REPO, env=env)
    subprocess.run([*cli, "evaluate", str(out / "optimizer.safetensors"), "--spec", SPEC, "--json",
                    str(out / "eval.json"), "--quiet"], check=True, cwd=REPO, env=env)
    return out


def same_tensors(a: Path, b: Path) -> bool:
    x, y = load_file(str(a / "optimizer.safetensors")), load_file(str(b / "optimizer.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rules", nargs="+", default=["layerwise", "adaptive-momentum"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="OMP_NUM_THREADS values (seed 0 only "
                    "for values after the first)")
    ap.add_argument("--root", default=str(REPO / "runs" / "quickstart-spread"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "quickstart_spread.json"))
    args = ap.parse_args()
    root = Path(args.root)
    sys.path.insert(0, str(REPO))
    from metascale.evaluate import format_table
    result = {"command": " ".join(["python benchmarks/quickstart_spread.py", *sys.argv[1:]]), "spec": SPEC,
              "torch": torch.__version__, "rules": {}}
    for rule in args.rules:
        runs = {}
        for seed in args.seeds:
            runs[(seed, args.threads[0])] = run_one(root, rule, seed, args.threads[0])
        for t in args.threads[1:]:
            runs[(args.seeds[0], t)] = run_one(root, rule, args.seeds[0], t)
        rows = []
        for (seed, t), folder in runs.items():
            ev = json.loads((folder / "eval.json").read_text())
            learned, adam = ev["optimizers"]["learned"], ev["optimizers"]["adam"]
            rows.append({"seed": seed, "threads": t, "learned_median": learned["median_final_loss"],
                         "learned_iqr": learned["iqr_final_loss"], "adam_median": adam["median_final_loss"],
                         "steps_to_adam": learned.get("median_steps_to_adam"),
                         "reached_adam": learned.get("reached_adam_fraction", learned.get("reached")),
                         "folder": str(folder)})
        first = runs[(args.seeds[0], args.threads[0])]
        print(f"\n== {rule}: the table of seed {args.seeds[0]}, OMP_NUM_THREADS={args.threads[0]}")
        print(format_table(json.loads((first / "eval.json").read_text())))
        invariant = {f"threads {args.threads[0]} vs {t}": same_tensors(first, runs[(args.seeds[0], t)])
                     for t in args.threads[1:]}
        med = [r["learned_median"] for r in rows if r["threads"] == args.threads[0]]
        print(f"{rule}: learned median final loss over seeds {args.seeds}: "
              + ", ".join(f"{m:.4g}" for m in med) + f" (median {statistics.median(med):.4g}, range "
              f"{min(med):.4g}-{max(med):.4g}); tuned Adam {rows[0]['adam_median']:.4g}; exported tensors identical "
              f"across thread counts: {invariant}")
        result["rules"][rule] = {"runs": rows, "thread_invariant": invariant}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
