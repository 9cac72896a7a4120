"""Meta-steps per second of ``metascale meta-train`` on one spec, per device configuration:
CPU in one process at one thread, CPU at the default ``--jobs`` (one process per core), and
CUDA. Each measurement is a fresh command; configurations interleaved within each repeat;
medians over repeats. The rate is the steady one from ``metrics.jsonl``'s ``elapsed_s`` (first
to last meta-step); the end-to-end rate includes start-up (and CUDA initialisation).

    python benchmarks/meta_rate.py [--spec tasks/sine.toml] [--meta-steps 20] [--configs cpu1 cpu cuda]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"cpu1": ["--device", "cpu", "--jobs", "1", "--threads", "1"],  # one process, one thread
           "cpu": ["--device", "cpu"],                                   # the CPU defaults (--jobs: one per core)
           "cuda": ["--device", "cuda"]}


def run(spec: str, steps: int, extra: list[str], out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "METASCALE_JOBS")}
    cmd = [sys.executable, "-m", "metascale.cli", "meta-train", "--spec", spec, "--out", str(out), "--quiet",
           "--meta-steps", str(steps), "--checkpoint-every", "0", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    el = [json.loads(l)["elapsed_s"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    return {"meta_steps_per_s": (len(el) - 1) / (el[-1] - el[0]), "end_to_end_meta_steps_per_s": len(el) / wall,
            "wall_s": wall, "distributed": "distributed over" in proc.stdout}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="tasks/sine.toml")
    ap.add_argument("--meta-steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "meta_rate.json"))
    args = ap.parse_args()
    import torch
    samples = {c: [] for c in args.configs}
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for c in args.configs:
                samples[c].append(run(args.spec, args.meta_steps, CONFIGS[c], Path(tmp) / c))
                print(f"[rep {rep}] {c:<5} {samples[c][-1]['meta_steps_per_s']:.2f} meta-steps/s", flush=True)
    med = {c: {k: statistics.median(s[k] for s in samples[c]) for k in ("meta_steps_per_s", "end_to_end_meta_steps_per_s")}
           for c in args.configs}
    base = args.configs[0]
    for c in med:
        med[c]["ratio_to_" + base] = med[c]["meta_steps_per_s"] / med[base]["meta_steps_per_s"]
    result = {"command": " ".join(["python benchmarks/meta_rate.py", *sys.argv[1:]]), "spec": args.spec,
              "meta_steps": args.meta_steps, "repeats": args.repeats, "cpus": os.cpu_count(),
              "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "configs": {c: CONFIGS[c] for c in args.configs}, "load_avg_1min": [load0, os.getloadavg()[0]],
              "median": med, "samples": samples}
    print(f"{'config':<6} {'meta-steps/s':>13} {'end-to-end':>11} {'x ' + base:>8}")
    for c, r in med.items():
        print(f"{c:<6} {r['meta_steps_per_s']:13.2f} {r['end_to_end_meta_steps_per_s']:11.2f} {r['ratio_to_' + base]:8.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
