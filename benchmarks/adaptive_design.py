"""Design checks of the adaptive rule on meta-train validation draws (never the meta-test draws).

Meta-train one rule on one (spec, seed) with ``[meta]`` / ``[adaptive]`` overrides, then report
the median steps to reach tuned Adam's final validation loss on ``--n`` draws of the meta-train
split from a stream of their own (``mix_seed(seed, 0xA11)``: neither the training draws, nor
the selection draws, nor evaluation's tuning draws), in the settings of
``benchmarks/adaptive.py`` (base, 2x wider, 2x deeper, 4x horizon). Adam's learning rate is
tuned as in :func:`metascale.evaluate.evaluate`. One JSON line per run is appended to
``benchmarks/results/adaptive_design.jsonl``. The design choices of the adaptive rule
(the offset table and its step indexing, ``task_clip``, ``select_every``) were made with it;
docs/benchmarks.md lists the runs.

    python benchmarks/adaptive_design.py tasks/digits.toml 2 --name d2 --meta '{"task_clip": 0}'
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import metascale
from metascale.evaluate import BASELINES, _steps_to, train_run, tune_lr, tuning_tasks
from metascale.tasks.base import mix_seed

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from adaptive import SETTINGS, variant  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec")
    ap.add_argument("seed", type=int)
    ap.add_argument("--name", required=True, help="label of the run in the JSON line")
    ap.add_argument("--rule", default="adaptive-momentum")
    ap.add_argument("--meta", default="{}", help="JSON overrides of the [meta] table")
    ap.add_argument("--adaptive", default="{}", help="JSON overrides of the [adaptive] table")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--n", type=int, default=40, help="validation draws")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "adaptive_design.jsonl"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    spec = metascale.load_spec(a.spec)
    spec = dataclasses.replace(spec, meta=dataclasses.replace(spec.meta, **json.loads(a.meta)))
    spec = spec.with_table("adaptive", dataclasses.replace(spec.rules["adaptive"], **json.loads(a.adaptive)))
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        res = metascale.MetaTrainer(spec, seed=a.seed, device="cpu", progress=False, rule=a.rule).train(
            Path(d) / "metrics.jsonl")
        path = metascale.save_optimizer(Path(d) / "o.safetensors", res.meta, res.rule, spec.to_dict(), res.summary)
        out = {"name": a.name, "spec": spec.name, "seed": a.seed, "rule": a.rule, "meta": json.loads(a.meta),
               "adaptive": json.loads(a.adaptive), "train_s": round(time.time() - t0, 1),
               "selected_meta_step": res.summary.get("selected_meta_step"),
               "final_meta_loss_avg_last_10pct": res.summary["final_meta_loss_avg_last_10pct"]}
        for setting in a.settings.split(","):
            s_spec, steps = variant(spec, setting)
            T = steps or s_spec.inner.horizon
            tasks = s_spec.sampler("train", mix_seed(a.seed, 0xA11)).tasks(a.n)
            lr, _ = tune_lr(BASELINES["adam"], tuning_tasks(s_spec, a.seed), T, s_spec.evaluate.grid())
            adam = [train_run(t, lambda p: BASELINES["adam"](p, lr), T)[0] for t in tasks]
            mine = [train_run(t, lambda p: metascale.load_optimizer(path, p, total_steps=T), T) for t in tasks]
            med = float(np.median([_steps_to(c, ad[-1]) for (c, _), ad in zip(mine, adam)]))
            out[setting] = {"T": T, "steps_to_adam": med if math.isfinite(med) else None,
                            "final": float(np.median([c[-1] for c, _ in mine])),
                            "adam_final": float(np.median([c[-1] for c in adam]))}
            if mine[0][1] is not None:
                out[setting]["accuracy"] = float(np.median([x for _, x in mine]))
    print(json.dumps(out))
    with open(a.out, "a") as f:
        f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
