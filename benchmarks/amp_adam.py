"""Scaled Adam consuming GradScaler-scaled gradients vs GradScaler.unscale_ + torch.optim.Adam.

Times ``scaler.step(opt); scaler.update()`` on an MLP's parameters with fixed, pre-scaled
gradients (restored before every timed step, outside the timer), interleaving the variants
in one process and taking medians over repeats:

* ``adam_foreach``   torch.optim.Adam(foreach=True): GradScaler unscales (one read+write pass)
* ``adam_fused``     torch.optim.Adam(fused=True) where supported: the scale is handed to the kernel
* ``scaled_adam``    metascale ScaledAdam(mode="invariant"): GradScaler checks inf/NaN, the
                     optimizer folds 1/S into its constants (no unscale pass)

    python benchmarks/amp_adam.py [--width 2048] [--layers 4] [--repeats 30] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from metascale.scaling.optimizers import ScaledAdam

ROOT = Path(__file__).resolve().parent.parent


def make_params(width: int, layers: int, device, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(width, width), (width,)] * layers
    params = [torch.nn.Parameter((torch.randn(s, generator=g) * 0.02).to(device, dtype)) for s in shapes]
    grads = [(torch.randn(s, generator=g) * 1e-3 * 2.0 ** 16).to(device, dtype) for s in shapes]  # S = 2^16
    return params, grads


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "amp_adam.json"))
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.float32
    variants = {
        "adam_foreach": lambda p: torch.optim.Adam(p, lr=1e-3, foreach=True),
        "scaled_adam": lambda p: ScaledAdam(p, lr=1e-3, mode="invariant"),
    }
    try:
        probe = torch.nn.Parameter(torch.zeros(2, device=device))
        torch.optim.Adam([probe], fused=True)
        variants["adam_fused"] = lambda p: torch.optim.Adam(p, lr=1e-3, fused=True)
    except (RuntimeError, ValueError):
        pass
    setups = {}
    for name, make in variants.items():
        params, grads = make_params(args.width, args.layers, device, dtype)
        opt = make(params)
        scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 16, growth_interval=10 ** 9)
        setups[name] = (params, grads, opt, scaler)
    n_params = sum(p.numel() for p in setups["adam_foreach"][0])
    times = {name: [] for name in setups}
    for r in range(args.warmup + args.repeats):
        for name, (params, grads, opt, scaler) in setups.items():
            for p, g in zip(params, grads):
                p.grad = g.clone()
            scaler.scale(torch.ones((), device=device))  # what scaler.scale(loss) does each step
            sync(device)
            t0 = time.perf_counter()
            scaler.step(opt)
            scaler.update()
            sync(device)
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    # the variants must agree: same parameters after the same steps (invariant mode)
    ref = setups["adam_foreach"][0]
    agree = {name: max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(setups[name][0], ref))
             for name in setups}
    med = {name: statistics.median(ts) for name, ts in times.items()}
    base = med["adam_foreach"]
    result = {"command": "python benchmarks/amp_adam.py " + " ".join(
        f"--{k} {v}" for k, v in vars(args).items() if k != "out"),
        "torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
        "params": n_params, "repeats": args.repeats, "median_s": med,
        "ratio_to_unscale_plus_adam_foreach": {k: v / base for k, v in med.items()},
        "max_rel_param_diff_vs_adam_foreach": agree}
    print(f"{n_params / 1e6:.1f}M parameters, {device}, {args.repeats} repeats (median), threads={torch.get_num_threads()}")
    print("| variant | median step (ms) | ratio to unscale_ + Adam(foreach) | max rel. param diff |")
    print("|---|---|---|---|")
    for k in med:
        print(f"| {k} | {med[k] * 1e3:.2f} | {med[k] / base:.3f} | {agree[k]:.1e} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
