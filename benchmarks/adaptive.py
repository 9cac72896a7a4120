"""Held-out quality of the adaptive layer-wise rule against tuned and learning-rate-free baselines.

For each (spec, seed): meta-train the adaptive rule (``--rules``, default both variants) and the
static layer-wise rule with the spec's budget, then evaluate every one on the spec's meta-test
draws next to SGD, SGD+momentum, Adam, Adafactor and Schedule-Free AdamW (learning rates tuned on
meta-train draws over the spec's log grid) and Prodigy (learning-rate free, lr = 1), in four
settings:

* ``base``: the meta-training architecture and horizon ``T = K``;
* ``wider`` / ``deeper``: every hidden layer twice as wide / the hidden stack repeated (2x
  deeper), never seen in meta-training, ``T = K``;
* ``long``: the meta-training architecture at ``T = 4K`` (the adaptive rule is told
  ``total_steps = 4K``; the static schedules hold their last step).

The headline number is the median, over held-out tasks, of the first step at which an optimizer
reaches tuned Adam's final validation loss on the same task (``steps to Adam``; "never" when
fewer than half the tasks get there). Results are written per job (resumable) and summarised.

    python benchmarks/adaptive.py [--specs tasks/sine.toml ...] [--seeds 0 1 2] [--jobs 2]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

import metascale
from metascale.evaluate import BASELINES, evaluate

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = ("base", "wider", "deeper", "long")
RULES = ("adaptive", "adaptive-momentum", "layerwise")


def variant(spec, setting: str):
    """``(spec, steps)`` of an evaluation setting (an unseen architecture or a 4x horizon)."""
    if setting in ("base", "long"):
        return spec, (4 * spec.inner.horizon if setting == "long" else None)
    fam = spec.family
    key = "hidden" if hasattr(fam, "hidden") else "student_hidden"
    hidden = tuple(getattr(fam, key))
    hidden = tuple(2 * h for h in hidden) if setting == "wider" else hidden * 2
    return dataclasses.replace(spec, family=dataclasses.replace(fam, **{key: hidden})), None


def run_one(spec_path: Path, seed: int, rules: list[str], settings: list[str], out_dir: Path) -> dict:
    torch.set_num_threads(1)
    spec = metascale.load_spec(spec_path)
    out_file = out_dir / f"{spec.name}_seed{seed}.json"
    if out_file.exists():
        return json.loads(out_file.read_text())
    result = {"spec": spec.name, "seed": seed, "meta_train_s": {}, "settings": {}}
    with tempfile.TemporaryDirectory() as d:
        paths = {}
        for rule in rules:
            t0 = time.time()
            res = metascale.MetaTrainer(spec, seed=seed, device="cpu", progress=False, rule=rule).train()
            paths[rule] = metascale.save_optimizer(Path(d) / f"{rule}.safetensors", res.meta, res.rule,
                                                   spec.to_dict(), res.summary)
            result["meta_train_s"][rule] = round(time.time() - t0, 1)
        for setting in settings:
            s_spec, steps = variant(spec, setting)
            T = steps or s_spec.inner.horizon
            learned = {rule: (lambda p, lr, f=paths[rule]: metascale.load_optimizer(f, p, lr=lr, total_steps=T))
                       for rule in rules}
            out = evaluate(learned, s_spec, steps=steps, seed=seed, device="cpu", progress=False,
                           baselines=list(BASELINES))
            for row in out["optimizers"].values():
                for k in ("final_losses", "q25_curve", "q75_curve", "tuning_median_final_loss"):
                    row.pop(k, None)
            out["hidden"] = list(getattr(s_spec.family, "hidden", getattr(s_spec.family, "student_hidden", ())))
            result["settings"][setting] = out
    out_file.write_text(json.dumps(result))
    return result


def steps_cell(row: dict, T: int) -> str:
    st = row.get("median_steps_to_adam")
    return "never" if st is None else f"{int(st)}/{T}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", nargs="+", default=[str(ROOT / "tasks" / f"{n}.toml")
                                                   for n in ("sine", "digits", "gaussian_mixture")])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    ap.add_argument("--jobs", type=int, default=2, help="parallel processes (1 torch thread each)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "adaptive.json"))
    args = ap.parse_args()
    parts = Path(args.out).with_suffix("")
    parts.mkdir(parents=True, exist_ok=True)
    from concurrent.futures import ProcessPoolExecutor
    jobs = [(Path(s), seed) for seed in args.seeds for s in args.specs]  # every family early
    with ProcessPoolExecutor(args.jobs) as ex:
        futs = {job: ex.submit(run_one, job[0], job[1], args.rules, args.settings, parts) for job in jobs}
        results = {f"{p.stem}/seed{seed}": f.result() for (p, seed), f in futs.items()}
    Path(args.out).write_text(json.dumps({
        "command": "python benchmarks/adaptive.py --seeds " + " ".join(map(str, args.seeds)),
        "torch": torch.__version__, "results": results}, indent=1))
    names = list(args.rules) + [b for b in BASELINES]
    for setting in args.settings:
        print(f"\n### {setting}: median final validation loss (steps to reach tuned Adam's final loss)\n")
        print("| spec / seed | T | " + " | ".join(names) + " |")
        print("|---|---|" + "---|" * len(names))
        for key, r in results.items():
            if setting not in r["settings"]:
                continue
            o, T = r["settings"][setting]["optimizers"], r["settings"][setting]["steps"]
            cells = []
            for n in names:
                row = o[n]
                acc = f", acc {row['median_final_accuracy']:.3f}" if "median_final_accuracy" in row else ""
                cells.append(f"{row['median_final_loss']:.4g} ({steps_cell(row, T)}{acc})")
            print(f"| {key} | {T} | " + " | ".join(cells) + " |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
