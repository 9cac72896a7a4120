"""Peak memory of truncated meta-training: horizon N*K in windows of K vs a single K-step unroll.

Each configuration runs in a fresh subprocess (one meta-step, one task, teacher-MLP regression
with a 256-256 student and batch 256) and reports the growth of the process's peak resident
memory over its resident memory right before meta-training (imports, data and model excluded):
the memory the unroll itself needs. Also reported: an untruncated (windows = 1) unroll of the
same long horizon would need about N times the K-step figure.

    python benchmarks/truncation_memory.py [--k 20] [--horizons 20 200 1000]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# engine = func in every run (windows > 1 needs it), so the rows differ only in the horizon


def child(k: int, windows: int, width: int) -> None:
    import dataclasses
    import time

    import torch

    import metascale
    torch.set_num_threads(1)
    spec = metascale.load_spec(ROOT / "tasks" / "teacher_mlp.toml")
    spec = dataclasses.replace(
        spec, family=dataclasses.replace(spec.family, student_hidden=(width, width), n_train=256, n_val=256),
        inner=dataclasses.replace(spec.inner, steps=k, windows=windows, batch_size=256, engine="func"),
        meta=dataclasses.replace(spec.meta, batch_size=1))
    trainer = metascale.MetaTrainer(spec, seed=0, device="cpu", meta_steps=1, progress=False)
    spec.sampler("train", 0).task(0)  # data and model code paths warmed before the baseline
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.time()
    trainer.train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"k": k, "windows": windows, "horizon": k * windows, "base_kib": base, "peak_kib": peak,
                      "growth_kib": peak - base, "seconds": round(time.time() - t0, 2)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=20, help="window length K")
    ap.add_argument("--horizons", type=int, nargs="+", default=[20, 200, 1000])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--untruncated", type=int, default=200, help="also run one untruncated unroll of this length")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "truncation_memory.json"))
    ap.add_argument("--child", nargs=3, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    rows = []
    runs = [(args.k, h // args.k) for h in args.horizons] + [(args.untruncated, 1)]
    for k, windows in runs:
        if (k * windows) % args.k and windows > 1:
            raise SystemExit(f"horizon {k * windows} is not a multiple of K = {args.k}")
        proc = subprocess.run([sys.executable, __file__, "--child", str(k), str(windows), str(args.width)],
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    ref = rows[0]["growth_kib"]
    print(f"| horizon | windows x K | peak growth (MiB) | ratio to horizon {rows[0]['horizon']} | seconds |")
    print("|---|---|---|---|---|")
    for r in rows:
        r["ratio"] = r["growth_kib"] / ref
        print(f"| {r['horizon']} | {r['windows']} x {r['k']} | {r['growth_kib'] / 1024:.1f} | {r['ratio']:.2f} | {r['seconds']} |")
    Path(args.out).write_text(json.dumps({"command": "python benchmarks/truncation_memory.py " + " ".join(sys.argv[1:]),
                                          "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
