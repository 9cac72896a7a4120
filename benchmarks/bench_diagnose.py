"""Why the digits-trained rules break on the heldout suite: two measurements.

1. **Held schedules and untrained depth anchors (layer-wise rule).** The static rule's
   per-step effective step size ``eta * s`` per role and depth anchor: the first value, the
   last (held for every step after the meta-training horizon), and what the layers of a
   15-layer MLP get by the documented interpolation (piecewise-linear in log space between
   the anchors ``b / (B - 1)``).
2. **Features out of the meta-training range (adaptive rules).** The adaptive rules read the
   log RMS of each group's gradient and parameters. We record both (per role x layer group,
   every step) along the learned optimizer's own trajectory on digits meta-train draws (its
   meta-training distribution, 20 steps) and over the first ``--max-steps`` steps of heldout
   tasks (seed 0), and report the share of heldout (group, step) values outside the digits
   range ``[min, max]``.

    OMP_NUM_THREADS=1 python benchmarks/bench_diagnose.py --out benchmarks/results/bench_diagnose.json
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

import metascale
from metascale.bench import build_task
from metascale.bench_suites import HELDOUT
from metascale.optim.groups import group_parameters

RUNS = Path("runs")


def layerwise_steps(path: Path, n_layers: int = 15) -> dict:
    e = metascale.read_optimizer(path)
    eff = torch.exp(e.meta["log_step_size"] + e.meta["log_scale"]).double()  # (roles, anchors, steps)
    B = eff.shape[1]
    out = {"momentum": e.config.momentum, "anchors": {}}
    for r, role in enumerate(("matrix", "vector")):
        for b in range(B):
            out["anchors"][f"{role}@{b / (B - 1):.2f}"] = {"first": float(eff[r, b, 0]), "last_held": float(eff[r, b, -1]),
                                                          "max": float(eff[r, b].max())}
    held = eff[0, :, -1].log()
    layers = []
    for layer in range(n_layers):
        d = layer / (n_layers - 1) * (B - 1)
        lo = min(int(math.floor(d)), B - 2)
        w = d - lo
        layers.append(float(torch.exp((1 - w) * held[lo] + w * held[lo + 1])))
    out["held_matrix_step_15_layer_mlp"] = layers
    return out


def log_rms(ts) -> float:
    n = sum(t.numel() for t in ts)
    return 0.5 * math.log(sum(float(t.detach().double().pow(2).sum()) for t in ts) / n + 1e-30)


def trajectory(task, path: Path, steps: int, record: int | None = None) -> list[tuple[float, float]]:
    """(log grad RMS, log param RMS) of every group at each of the first ``record`` steps of a
    ``steps``-step run (``total_steps = steps``) under the learned optimizer."""
    model = task.make_model()
    params = list(model.parameters())
    groups = [g for _, g in group_parameters(params)]
    opt = metascale.load_optimizer(path, params, total_steps=steps)
    out = []
    for t in range(min(steps, record or steps)):
        x, y = task.train_batch(t)
        opt.zero_grad()
        loss = task.loss(model(x), y)
        if not torch.isfinite(loss):
            break
        loss.backward()
        out += [(log_rms([p.grad for p in g]), log_rms(g)) for g in groups]
        opt.step()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/bench_diagnose.json")
    ap.add_argument("--tasks", nargs="*", default=["mnist8_mlp_T1k", "mnist8_deep15", "mnist_wide_bs16", "mnist1d_resmlp",
                                                   "char_lm", "wine_resmlp_T5k"])
    ap.add_argument("--rules", nargs="*", default=["adaptive", "adaptive-momentum"])
    ap.add_argument("--max-steps", type=int, default=1000, help="record at most this many steps of a task")
    a = ap.parse_args()
    result = {"layerwise": layerwise_steps(RUNS / "digits-layerwise" / "optimizer.safetensors"), "features": {}}
    print(json.dumps(result["layerwise"], indent=1))
    spec = metascale.load_spec("tasks/digits.toml")
    digits = spec.sampler("train", 0).tasks(8)
    suite = {t.name: t for t in HELDOUT}
    for rule in a.rules:
        path = RUNS / f"digits-{rule}" / "optimizer.safetensors"
        ref = [v for t in digits for v in trajectory(t, path, spec.inner.steps)]
        lo = [min(v[i] for v in ref) for i in (0, 1)]
        hi = [max(v[i] for v in ref) for i in (0, 1)]
        rows = {"digits_range": {"log_grad_rms": [lo[0], hi[0]], "log_param_rms": [lo[1], hi[1]]}}
        print(f"{rule}: digits log grad RMS [{lo[0]:.2f}, {hi[0]:.2f}], log param RMS [{lo[1]:.2f}, {hi[1]:.2f}]")
        for name in a.tasks:
            bt = suite[name]
            vals = trajectory(build_task(bt, "test", 0), path, bt.steps, a.max_steps)
            out = [sum(not (lo[i] <= v[i] <= hi[i]) for v in vals) / max(len(vals), 1) for i in (0, 1)]
            rows[name] = {"outside_grad": out[0], "outside_param": out[1], "values": len(vals),
                          "log_grad_rms": [min(v[0] for v in vals), max(v[0] for v in vals)],
                          "log_param_rms": [min(v[1] for v in vals), max(v[1] for v in vals)]}
            print(f"  {name:<20} outside: grad {out[0]:.0%} param {out[1]:.0%}; grad [{rows[name]['log_grad_rms'][0]:.2f}, "
                  f"{rows[name]['log_grad_rms'][1]:.2f}] param [{rows[name]['log_param_rms'][0]:.2f}, "
                  f"{rows[name]['log_param_rms'][1]:.2f}]", flush=True)
        result["features"][rule] = rows
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
