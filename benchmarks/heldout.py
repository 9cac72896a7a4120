"""Held-out quality of the layer-wise optimizer on every shipped spec, over several seeds.

For each (spec, seed): meta-train with the spec's budget, export, reload, and evaluate on the
spec's meta-test draws against SGD / SGD+momentum / Adam tuned on meta-train draws
(``metascale.evaluate``). Prints a markdown table and writes JSON.

    python benchmarks/heldout.py [--specs tasks/sine.toml ...] [--seeds 0 1 2] [--out benchmarks/results/heldout.json]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import metascale
from metascale.evaluate import evaluate

ROOT = Path(__file__).resolve().parent.parent


def run_one(spec_path: Path, seed: int, meta_steps: int | None, threads: int) -> dict:
    torch.set_num_threads(threads)
    spec = metascale.load_spec(spec_path)
    t0 = time.time()
    res = metascale.MetaTrainer(spec, seed=seed, device="cpu", meta_steps=meta_steps, progress=False).train()
    with tempfile.TemporaryDirectory() as d:
        path = metascale.save_optimizer(Path(d) / "o.safetensors", res.meta, res.rule, spec.to_dict(), res.summary)
        learned = {"learned": lambda p, lr: metascale.load_optimizer(path, p, lr=lr)}
        out = evaluate(learned, spec, seed=seed, device="cpu", progress=False)
    out["meta_train_s"] = round(time.time() - t0, 1)
    for row in out["optimizers"].values():
        row.pop("median_curve"), row.pop("final_losses")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", nargs="+", default=sorted(str(p) for p in (ROOT / "tasks").glob("*.toml")))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--meta-steps", type=int, default=None, help="override the specs' meta-steps")
    ap.add_argument("--jobs", type=int, default=2, help="parallel processes (1 torch thread each)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "heldout.json"))
    args = ap.parse_args()
    from concurrent.futures import ProcessPoolExecutor
    jobs = [(Path(s), seed) for s in args.specs for seed in args.seeds]
    with ProcessPoolExecutor(args.jobs) as ex:
        futs = {job: ex.submit(run_one, job[0], job[1], args.meta_steps, 1) for job in jobs}
        results = {f"{p.stem}/seed{seed}": f.result() for (p, seed), f in futs.items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": "python benchmarks/heldout.py " + " ".join(
        f"--seeds {' '.join(map(str, args.seeds))}".split()), "torch": torch.__version__, "results": results}, indent=1))
    names = ["learned", "sgd", "sgd_momentum", "adam"]
    print("| spec / seed | " + " | ".join(f"{n} median final (IQR)" for n in names) + " | learned steps to Adam | learned < SGD |")
    print("|---|" + "---|" * (len(names) + 2))
    for key, r in results.items():
        o = r["optimizers"]
        cells = [f"{o[n]['median_final_loss']:.4g} ({o[n]['iqr_final_loss']:.3g})" for n in names]
        st = o["learned"].get("median_steps_to_adam")
        print(f"| {key} | " + " | ".join(cells) + f" | {'never' if st is None else int(st)} of {r['steps']} | "
              f"{'yes' if o['learned']['median_final_loss'] < o['sgd']['median_final_loss'] else 'no'} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
