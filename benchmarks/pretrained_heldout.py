"""A shipped pretrained optimizer on the ``heldout`` suite against AdamW runs already in a bench
tuning cache (``metascale bench`` writes it; ``benchmarks/bench_heldout.py`` fills it for the
whole suite), so no baseline is tuned or run again.

    OMP_NUM_THREADS=1 python benchmarks/pretrained_heldout.py mix1k-v1 --cache runs/bench-cache/heldout.json \
        --out benchmarks/results/pretrained_mix1k_heldout.json

Runs the optimizer on every suite task x 3 evaluation seeds in ``--jobs`` processes (longest
horizons first), then prints and writes the suite metrics of ``metascale.bench.summarize``.
"""
from __future__ import annotations

import argparse
import json
import time

from metascale.bench import run, summarize
from metascale.bench_suites import HELDOUT
from metascale.parallel import map_jobs
from metascale.pretrained import resolve


def heldout(path: str, cache_path: str, jobs: int) -> dict:
    """The suite metrics of the optimizer file ``path`` on ``heldout`` (3 seeds), AdamW's runs
    taken from the tuning cache at ``cache_path``; ``wall_s`` added."""
    cache = json.load(open(cache_path))["tasks"]
    items = [{"task": t, "split": "test", "seed": s, "opt": {"file": path}} for t in HELDOUT for s in (0, 1, 2)]
    order = sorted(range(len(items)), key=lambda i: -items[i]["task"].steps)
    t0 = time.time()
    res = map_jobs(run, [items[i] for i in order], jobs)
    wall = time.time() - t0
    runs: dict[str, dict] = {}
    for r in res:
        runs.setdefault(r["task"], {})[r["seed"]] = r
    names = [t.name for t in HELDOUT]
    out = summarize({n: [runs[n][s] for s in (0, 1, 2)] for n in names},
                    {n: [cache[n]["reference"][str(s)] for s in (0, 1, 2)] for n in names})
    return {**out, "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("optimizer", help="a pretrained optimizer's name or an exported file")
    ap.add_argument("--cache", required=True, help="bench tuning cache holding AdamW's heldout runs")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    path = str(resolve(args.optimizer))
    out = heldout(path, args.cache, args.jobs)
    wall = out.pop("wall_s")
    print(f"{args.optimizer}: IQM speedup {out['iqm_speedup']:.3f}, IQM normalised loss "
          f"{out['iqm_normalised_loss']:.3f}, beats AdamW {out['beats_adamw']}/{out['n_tasks']}, diverged "
          f"{out['diverged_runs']}/{out['runs']}; {wall:.0f} s with {args.jobs} jobs")
    json.dump({"optimizer": args.optimizer, "file": path, "wall_s": wall, "summary": out}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
