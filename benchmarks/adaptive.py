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
RULES = tuple(metascale.RULES)  # every registered rule (--rules picks)


def variant(spec, setting: str):
    """``(spec, steps)`` of an evaluation setting (an unseen architecture or a 4x horizon)."""
    if setting in ("base", "long"):
        return spec, (4 * spec.inner.horizon if setting == "long" else None)
    fam = spec.family
    key = "hidden" if hasattr(fam, "hidden") else "student_hidden"
    hidden = tuple(getattr(fam, key))
    hidden = tuple(2 * h for h in hidden) if setting == "wider" else hidden * 2
    return dataclasses.replace(spec, family=dataclasses.replace(fam, **{key: hidden})), None


def run_one(spec_path: Path, seed: int, rules: list[str], settings: list[str], out_dir: Path,
            baselines: list[str] | None = None, adaptive: dict | None = None) -> dict:
    torch.set_num_threads(1)
    spec = metascale.load_spec(spec_path)
    if adaptive:  # an ablation of the [adaptive] table
        spec = spec.with_table("adaptive", dataclasses.replace(spec.rules["adaptive"], **adaptive))
    out_file = out_dir / f"{spec.name}_seed{seed}.json"
    if out_file.exists():
        return json.loads(out_file.read_text())
    result = {"spec": spec.name, "seed": seed, "meta_train_s": {}, "meta_train": {}, "settings": {}}
    with tempfile.TemporaryDirectory() as d:
        paths = {}
        for rule in rules:
            t0 = time.time()
            metrics = Path(d) / f"{rule}.jsonl"
            res = metascale.MetaTrainer(spec, seed=seed, device="cpu", progress=False, rule=rule).train(metrics)
            paths[rule] = metascale.save_optimizer(Path(d) / f"{rule}.safetensors", res.meta, res.rule,
                                                   spec.to_dict(), res.summary)
            result["meta_train_s"][rule] = round(time.time() - t0, 1)
            recs = [json.loads(line) for line in metrics.read_text().splitlines()]
            # per meta-step meta-loss and gradient norm, and the selection measures: for diagnosis
            result["meta_train"][rule] = {
                "meta_loss": [r["meta_loss"] for r in recs], "meta_grad_norm": [r["meta_grad_norm"] for r in recs],
                "selection_loss": {r["meta_step"] + 1: r["selection_loss"] for r in recs
                                   if r["selection_loss"] is not None},
                "selected_meta_step": res.summary.get("selected_meta_step"), "skipped_tasks": res.summary["skipped_tasks"]}
        for setting in settings:
            s_spec, steps = variant(spec, setting)
            T = steps or s_spec.inner.horizon
            learned = {rule: (lambda p, lr, f=paths[rule]: metascale.load_optimizer(f, p, lr=lr, total_steps=T))
                       for rule in rules}
            out = evaluate(learned, s_spec, steps=steps, seed=seed, device="cpu", progress=False,
                           baselines=list(baselines or BASELINES))
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


def steps_of(results: dict, spec: str, setting: str, name: str, seeds: list[int]) -> list[float | None | str]:
    """Median steps to Adam of ``name`` per seed (``None``: never; ``"-"``: not run yet)."""
    out = []
    for seed in seeds:
        r = results.get(f"{spec}/seed{seed}", {}).get("settings", {}).get(setting)
        out.append("-" if r is None or name not in r["optimizers"] else r["optimizers"][name].get("median_steps_to_adam"))
    return out


def summary_tables(results: dict, rules: list[str]) -> str:
    """The docs tables: steps to Adam per (family, setting) and seed, and the acceptance check
    of each adaptive rule (median within T on every family; within T/2 on two)."""
    specs = sorted({k.split("/")[0] for k in results}, key=lambda n: ["sine", "digits", "gaussian_mixture",
                                                                     "teacher_mlp"].index(n) if n in
                   ["sine", "digits", "gaussian_mixture", "teacher_mlp"] else 9)
    seeds = sorted({int(k.split("seed")[1]) for k in results})
    names = rules + ["schedulefree_adamw", "adafactor", "prodigy", "sgd_momentum"]
    fmt = lambda v: "never" if v is None else v if isinstance(v, str) else f"{v:g}"
    lines = ["| family | setting | T | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for spec in specs:
        for setting in SETTINGS:
            any_r = next((results[f"{spec}/seed{s}"]["settings"].get(setting) for s in seeds
                          if f"{spec}/seed{s}" in results), None)
            if any_r is None:
                continue
            cells = [" / ".join(fmt(v) for v in steps_of(results, spec, setting, n, seeds)) for n in names]
            lines.append(f"| {spec} | {setting} | {any_r['steps']} | " + " | ".join(cells) + " |")
    lines += ["", "Median final validation loss (classification: and median accuracy), per seed:", "",
              "| family | setting | " + " | ".join(rules + ["adam", "schedulefree_adamw", "adafactor"]) + " |",
              "|---|---|" + "---|" * (len(rules) + 3)]
    for spec in specs:
        for setting in SETTINGS:
            rows = [results[f"{spec}/seed{s}"]["settings"].get(setting) if f"{spec}/seed{s}" in results else None
                    for s in seeds]
            if all(r is None for r in rows):
                continue
            cells = []
            for n in rules + ["adam", "schedulefree_adamw", "adafactor"]:
                vals = []
                for r in rows:
                    o = None if r is None else r["optimizers"].get(n)
                    vals.append("-" if o is None else f"{o['median_final_loss']:.3g}" + (
                        f" ({o['median_final_accuracy']:.2f})" if "median_final_accuracy" in o else ""))
                cells.append(" / ".join(vals))
            lines.append(f"| {spec} | {setting} | " + " | ".join(cells) + " |")
    lines.append("")
    for rule in rules:
        for setting in SETTINGS:
            within, half = [], []
            for spec in specs:
                T = next((results[f"{spec}/seed{s}"]["settings"][setting]["steps"] for s in seeds
                          if setting in results.get(f"{spec}/seed{s}", {}).get("settings", {})), None)
                if T is None:
                    continue
                st = steps_of(results, spec, setting, rule, seeds)
                done = [v for v in st if v != "-"]  # a job still running is not counted
                if all(v is not None and v <= T for v in done):
                    within.append(spec)
                if all(v is not None and v <= T / 2 for v in done):
                    half.append(spec)
            lines.append(f"- `{rule}`, {setting}: every seed within T on {len(within)}/{len(specs)} families "
                         f"({', '.join(within) or '-'}); within T/2 on {len(half)} ({', '.join(half) or '-'})")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", nargs="+", default=[str(ROOT / "tasks" / f"{n}.toml")
                                                   for n in ("sine", "digits", "gaussian_mixture", "teacher_mlp")])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    ap.add_argument("--jobs", type=int, default=2, help="parallel processes (1 torch thread each)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "adaptive.json"))
    ap.add_argument("--baselines", nargs="+", default=list(BASELINES), choices=list(BASELINES),
                    help="baselines to evaluate (adam is needed for the headline)")
    ap.add_argument("--adaptive", default="{}", help="JSON overrides of the [adaptive] table (ablations)")
    ap.add_argument("--summary", action="store_true",
                    help="print the docs tables and acceptance check from the per-job files; run nothing")
    args = ap.parse_args()
    parts = Path(args.out).with_suffix("")
    if args.summary:
        results = {f"{r['spec']}/seed{r['seed']}": r for r in (json.loads(f.read_text())
                                                                for f in sorted(parts.glob("*.json")))}
        print(summary_tables(results, list(args.rules)))
        return
    parts.mkdir(parents=True, exist_ok=True)
    from concurrent.futures import ProcessPoolExecutor
    jobs = [(Path(s), seed) for seed in args.seeds for s in args.specs]  # every family early
    with ProcessPoolExecutor(args.jobs) as ex:
        futs = {job: ex.submit(run_one, job[0], job[1], args.rules, args.settings, parts, args.baselines,
                               json.loads(args.adaptive)) for job in jobs}
        results = {f"{p.stem}/seed{seed}": f.result() for (p, seed), f in futs.items()}
    Path(args.out).write_text(json.dumps({
        "command": "python benchmarks/adaptive.py --seeds " + " ".join(map(str, args.seeds)),
        "torch": torch.__version__, "results": results}, indent=1))
    names = list(args.rules) + list(args.baselines)
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
    print("\n" + summary_tables(results, sorted(args.rules, key=lambda r: r == "layerwise")))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
