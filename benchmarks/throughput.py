"""Throughput on CPU: meta-steps per second and evaluation runs per second, today's default
(torch's default intra-op threads, one process) against one thread and ``--jobs 2`` (one
thread each), on a quiet machine and next to a competing CPU-bound process started here.

Every measurement is a fresh process (``metascale meta-train`` / ``evaluate``'s Python API),
configurations interleaved within each repeat; medians over repeats; ratios to today's default
from the same run. Meta-steps/s is the steady rate from ``metrics.jsonl``'s ``elapsed_s``
(first to last meta-step); the end-to-end rate (``--meta-steps`` over the command's wall time,
start-up and the ``--jobs`` launch included) is reported too. Evaluation runs/s is training runs
(tuning grid and held-out) over the wall time of the ``evaluate()`` call, worker start-up
included. The machine's load average is recorded before and after every block: on a shared
machine "quiet" means "without our competing process", not idle.

    python benchmarks/throughput.py [--repeats 2] [--quick] [--out benchmarks/results/throughput.json]
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
# (meta-steps, evaluate: held-out tasks, tuning tasks) per spec; --quick shrinks them
SIZES = {"digits": (10, 12, 4), "sine": (10, 40, 16)}
QUICK = {"digits": (3, 2, 1), "sine": (3, 2, 1)}


def clean_env() -> dict:
    """The environment of a user who set nothing: no thread-count variables."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "METASCALE_JOBS")}
    return env


def torch_default_threads() -> int:
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=clean_env(),
                         capture_output=True, text=True, check=True)
    return int(out.stdout)


def spec_file(name: str, tasks: int, tune: int, folder: Path) -> Path:
    """The shipped spec with a smaller [evaluate] table (tasks, tune_tasks)."""
    text = (ROOT / "tasks" / f"{name}.toml").read_text()
    import tomllib
    data = tomllib.loads(text)
    lines = [l for l in text.splitlines()]
    if "evaluate" in data:  # drop the shipped table, then append ours
        start = lines.index("[evaluate]")
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")), len(lines))
        lines = lines[:start] + lines[end:]
    lines += ["", "[evaluate]", f"tasks = {tasks}", f"tune_tasks = {tune}"]
    path = folder / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def meta_train(spec: Path, steps: int, threads: int, jobs: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "metascale.cli", "meta-train", "--spec", str(spec), "--out", str(out), "--quiet",
           "--device", "cpu", "--meta-steps", str(steps), "--checkpoint-every", "0", "--threads", str(threads),
           "--jobs", str(jobs), "--force"]  # each repeat reuses its folder
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    el = [json.loads(l)["elapsed_s"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    return {"meta_steps_per_s": (len(el) - 1) / (el[-1] - el[0]), "end_to_end_meta_steps_per_s": len(el) / wall,
            "wall_s": wall}


EVAL_CHILD = r"""
import json, sys, time
import torch
from metascale.evaluate import FileOptimizer, eval_steps, evaluate
from metascale.parallel import set_threads
from metascale.spec import load_spec
spec_path, opt_path, threads, jobs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
set_threads(threads)
spec = load_spec(spec_path)
learned = {"learned": FileOptimizer(opt_path, total_steps=eval_steps(spec))}
t0 = time.perf_counter()
r = evaluate(learned, spec, device="cpu", progress=False, jobs=jobs, threads=threads)
wall = time.perf_counter() - t0
cfg = spec.evaluate
runs = len(cfg.baselines) * len(cfg.grid()) * cfg.tune_tasks + (len(cfg.baselines) + 1) * cfg.tasks
print(json.dumps({"runs": runs, "wall_s": wall, "runs_per_s": runs / wall,
                  "median_final": {k: v["median_final_loss"] for k, v in r["optimizers"].items()}}))
"""


def evaluate_runs(spec: Path, opt: Path, threads: int, jobs: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", EVAL_CHILD, str(spec), str(opt), str(threads), str(jobs)],
                          env=clean_env(), capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"evaluate child failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def start_load() -> subprocess.Popen:
    """One CPU-bound competitor: a busy-looping Python process."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (a smoke test)")
    ap.add_argument("--specs", default="digits,sine")
    ap.add_argument("--loads", default="quiet,loaded")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "throughput.json"))
    args = ap.parse_args()
    sizes, repeats = (QUICK, 1) if args.quick else (SIZES, args.repeats)
    default_threads = torch_default_threads()
    configs = {"today_default": (default_threads, 1), "one_thread": (1, 1), "jobs2": (1, 2)}
    specs = args.specs.split(",")
    result = {"cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
              "torch_default_threads": default_threads, "repeats": repeats,
              "configs": {k: {"threads": t, "jobs": j} for k, (t, j) in configs.items()},
              "sizes": {s: dict(zip(("meta_steps", "eval_tasks", "eval_tune_tasks"), sizes[s])) for s in specs},
              "loads": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        spec_paths = {s: spec_file(s, sizes[s][1], sizes[s][2], tmp) for s in specs}
        opt_files = {}
        for s in specs:  # one exported optimizer per spec for the evaluation runs
            meta_train(spec_paths[s], 2, 1, 1, tmp / f"{s}-opt")
            opt_files[s] = tmp / f"{s}-opt" / "optimizer.safetensors"
        for load in args.loads.split(","):
            competitor = start_load() if load == "loaded" else None
            try:
                time.sleep(1.0 if competitor else 0.0)
                block = {"loadavg_before": os.getloadavg(), "samples": {}}
                samples = block["samples"]
                t0 = time.perf_counter()
                for rep in range(repeats):
                    for s in specs:
                        for name, (threads, jobs) in configs.items():
                            m = meta_train(spec_paths[s], sizes[s][0], threads, jobs, tmp / f"run-{s}-{name}")
                            e = evaluate_runs(spec_paths[s], opt_files[s], threads, jobs)
                            samples.setdefault(s, {}).setdefault(name, []).append({"meta_train": m, "evaluate": e})
                            print(f"[{load} rep {rep}] {s:<7} {name:<14} meta-steps/s {m['meta_steps_per_s']:7.2f} "
                                  f"(end-to-end {m['end_to_end_meta_steps_per_s']:5.2f})  eval runs/s "
                                  f"{e['runs_per_s']:7.1f}  load {os.getloadavg()[0]:.2f}", flush=True)
                block["loadavg_after"] = os.getloadavg()
                block["block_wall_s"] = time.perf_counter() - t0
            finally:
                if competitor is not None:
                    competitor.kill()
                    competitor.wait()
            summary = {}
            for s in specs:
                med = {name: {k: statistics.median(x[kind][key] for x in samples[s][name])
                              for k, (kind, key) in {"meta_steps_per_s": ("meta_train", "meta_steps_per_s"),
                                                     "end_to_end_meta_steps_per_s": ("meta_train", "end_to_end_meta_steps_per_s"),
                                                     "eval_runs_per_s": ("evaluate", "runs_per_s")}.items()}
                       for name in configs}
                base = med["today_default"]
                for name in configs:
                    for k in list(med[name]):
                        med[name][f"{k}_vs_today"] = med[name][k] / base[k]
                summary[s] = med
                # the evaluations compute the same numbers in every configuration
                finals = {json.dumps(x["evaluate"]["median_final"], sort_keys=True)
                          for name in configs for x in samples[s][name]}
                summary[s]["evaluate_results_identical"] = len(finals) == 1
            block["median"] = summary
            result["loads"][load] = block
    result["acceptance"] = {
        load: {s: {"jobs2_vs_today_meta_steps": result["loads"][load]["median"][s]["jobs2"]["meta_steps_per_s_vs_today"],
                   "required": 1.8 if load == "quiet" else 3.0}
               for s in specs} for load in result["loads"]}
    for load, per in result["acceptance"].items():
        for s, a in per.items():
            a["met"] = a["jobs2_vs_today_meta_steps"] >= a["required"]
    print()
    print(f"{'load':<7} {'spec':<7} {'config':<14} {'meta-steps/s':>12} {'x today':>8} {'end-to-end':>11} {'x today':>8} "
          f"{'eval runs/s':>12} {'x today':>8}")
    for load, block in result["loads"].items():
        for s in specs:
            for name in configs:
                r = block["median"][s][name]
                print(f"{load:<7} {s:<7} {name:<14} {r['meta_steps_per_s']:12.2f} {r['meta_steps_per_s_vs_today']:8.2f} "
                      f"{r['end_to_end_meta_steps_per_s']:11.2f} {r['end_to_end_meta_steps_per_s_vs_today']:8.2f} "
                      f"{r['eval_runs_per_s']:12.1f} {r['eval_runs_per_s_vs_today']:8.2f}")
        print(f"{load}: load average before {block['loadavg_before'][0]:.2f}, after {block['loadavg_after'][0]:.2f}")
    print("acceptance (jobs2 / today's default, meta-steps/s):",
          json.dumps({l: {s: [round(a['jobs2_vs_today_meta_steps'], 2), a['required'], a['met']] for s, a in p.items()}
                      for l, p in result["acceptance"].items()}))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
