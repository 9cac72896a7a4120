"""The issue-14 measurement: the three shipped rules (meta-trained on tasks/digits.toml) and
the five baselines through ``metascale bench --suite heldout``, 3 evaluation seeds.

    OMP_NUM_THREADS=1 python benchmarks/bench_heldout.py --jobs 2 \
        --learned layerwise=runs/digits-layerwise/optimizer.safetensors ...

Tunes every baseline first (one pool of jobs; cached in --cache), then benchmarks each
optimizer with the tuning cached and records its wall time. Writes --out (JSON: every
result, curves included) and --plot (the summary plot of all optimizers) and prints a
markdown table for docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from metascale.bench import BASELINE_NAMES, bench, format_table, plot, summary_plot


def _f(x, spec=".3g"):
    return "-" if x is None else ("inf" if isinstance(x, float) and math.isinf(x) else format(x, spec))


def markdown(results: dict[str, dict]) -> str:
    names = list(results)
    tasks = list(next(iter(results.values()))["tasks"])
    out = ["Normalised final loss (final validation loss / tuned AdamW's; median over seeds; < 1 beats AdamW) "
           "and speedup (in brackets):", "",
           "| task | T | batch | AdamW loss | " + " | ".join(names) + " |",
           "|---|---:|---:|---:|" + "---:|" * len(names)]
    for t in tasks:
        r0 = results[names[0]]["tasks"][t]
        cells = []
        for n in names:
            r = results[n]["tasks"][t]
            d = f" ({r['diverged_runs']} div)" if r["diverged_runs"] else ""
            cells.append(f"{_f(r['normalised_loss'], '.2f')} ({_f(r['speedup'], '.2f')}){d}")
        out.append(f"| {t} | {r0['steps']} | {r0['batch_size']} | {_f(r0['adamw_final_loss'], '.3f')} | "
                   + " | ".join(cells) + " |")
    out += ["", "| optimizer | IQM speedup | IQM normalised loss | beats AdamW | diverged runs | run time (sum) |",
            "|---|---:|---:|---:|---:|---:|"]
    for n in names:
        r = results[n]
        secs = sum(run["seconds"] for row in r["tasks"].values() for run in row["runs"])
        out.append(f"| {n} | {_f(r['iqm_speedup'], '.2f')} | {_f(r['iqm_normalised_loss'], '.2f')} | "
                   f"{r['beats_adamw']}/{r['n_tasks']} | {r['diverged_runs']}/{r['runs']} | {secs:.0f} s |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="heldout")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--cache", default="runs/bench-cache/heldout.json")
    ap.add_argument("--learned", nargs="*", default=[], metavar="NAME=FILE")
    ap.add_argument("--baselines", nargs="*", default=[b for b in BASELINE_NAMES if b != "adamw"],
                    help="baselines to benchmark besides AdamW (default: all four others)")
    ap.add_argument("--out", default="benchmarks/results/bench_heldout.json")
    ap.add_argument("--plot", default="docs/images/bench_heldout.png")
    ap.add_argument("--plots-dir", help="also write each optimizer's per-task PNGs into PLOTS_DIR/NAME/")
    a = ap.parse_args()
    results, t0 = {}, time.perf_counter()
    t = time.perf_counter()
    results["adamw"] = bench("adamw", a.suite, seeds=range(a.seeds), jobs=a.jobs, cache=a.cache, tune=BASELINE_NAMES)
    tuning_s = time.perf_counter() - t
    print(f"tuning + AdamW runs: {tuning_s:.0f} s", flush=True)
    # the learned optimizers first: if the run is cut short, what is missing is a baseline
    targets = [tuple(x.split("=", 1)) for x in a.learned] + [(b, b) for b in a.baselines]
    for name, target in targets:
        results[name] = bench(target, a.suite, seeds=range(a.seeds), jobs=a.jobs, cache=a.cache, name=name)
        print(format_table(results[name]), flush=True)
        if a.plots_dir:
            plot(results[name], Path(a.plots_dir) / name)
        if name != "adamw":
            for row in results[name]["tasks"].values():
                row.pop("adamw_runs", None)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)  # after every optimizer
        Path(a.out).write_text(json.dumps({"suite": a.suite, "jobs": a.jobs, "tuning_and_adamw_wall_s": tuning_s,
                                           "total_wall_s": time.perf_counter() - t0, "optimizers": results}, indent=1))
    summary_plot(list(results.values()), a.plot)
    print(markdown(results))
    print(f"wrote {a.out} and {a.plot}; total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
