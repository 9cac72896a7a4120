"""Does batching task draws with ``torch.func.vmap`` pay? One meta-gradient over B sine tasks.

Compares, in one process with interleaved repeats, (a) ``vmap`` over the B tasks of a
``torch.func.grad``-based K-step unroll (functional SGD with a learned step size) and (b) the
B tasks unrolled one after another with ``torch.autograd.grad(create_graph=True)`` (what the
library's engines do). Checks that both give the same meta-gradient; writes JSON.

    python benchmarks/vmap_tasks.py [--tasks 8] [--k 20] [--device cpu] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.func import functional_call, grad, vmap

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vmap_tasks.json"))
    args = ap.parse_args()
    dev, B, K = torch.device(args.device), args.tasks, args.k
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 40), torch.nn.ReLU(),
                                torch.nn.Linear(40, 1)).to(dev)
    names = [n for n, _ in model.named_parameters()]
    p0 = [torch.stack([p.detach().cpu() + 0.01 * torch.randn(p.shape, generator=g) for _ in range(B)]).to(dev)
          for p in model.parameters()]
    amp, phase = 0.1 + 4.9 * torch.rand(B, 1, 1, generator=g), 3.14 * torch.rand(B, 1, 1, generator=g)
    x, xv = 10 * torch.rand(B, 10, 1, generator=g) - 5, 10 * torch.rand(B, 100, 1, generator=g) - 5
    y, yv = amp * torch.sin(x - phase), amp * torch.sin(xv - phase)
    x, y, xv, yv = (t.to(dev) for t in (x, y, xv, yv))
    log_lr = torch.tensor(-4.6, device=dev, requires_grad=True)

    def mse(ps, a, b):
        return (functional_call(model, dict(zip(names, ps)), (a,)) - b).pow(2).mean()

    def one(ps, a, b, av, bv):
        ps, vals = list(ps), []
        for _ in range(K):
            gr = grad(lambda q: mse(q, a, b))(ps)
            ps = [p - torch.exp(log_lr) * d for p, d in zip(ps, gr)]
            vals.append(mse(ps, av, bv))
        return torch.log(torch.stack(vals).mean())

    def batched():
        return torch.autograd.grad(vmap(one)(p0, x, y, xv, yv).sum(), log_lr)[0]

    def sequential():
        total = 0
        for j in range(B):
            ps, vals = [p[j].clone().requires_grad_() for p in p0], []
            for _ in range(K):
                gr = torch.autograd.grad(mse(ps, x[j], y[j]), ps, create_graph=True)
                ps = [p - torch.exp(log_lr) * d for p, d in zip(ps, gr)]
                vals.append(mse(ps, xv[j], yv[j]))
            total = total + torch.log(torch.stack(vals).mean())
        return torch.autograd.grad(total, log_lr)[0]

    times = {"vmap": [], "sequential": []}
    results = {}
    for r in range(args.repeats + 1):
        for name, fn in (("vmap", batched), ("sequential", sequential)):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            results[name] = fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if r:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    rel = abs(float(results["vmap"] - results["sequential"])) / abs(float(results["sequential"]))
    out = {"command": "python benchmarks/vmap_tasks.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()
                                                                  if k != "out"),
           "torch": torch.__version__, "device": str(dev), "threads": torch.get_num_threads(), "tasks": B, "k": K,
           "median_s": med, "ratio_vmap_to_sequential": med["vmap"] / med["sequential"],
           "meta_gradient_rel_diff": rel}
    print(f"{B} sine tasks, K={K}, {dev}: vmap {med['vmap'] * 1e3:.1f} ms, sequential {med['sequential'] * 1e3:.1f} ms, "
          f"ratio {out['ratio_vmap_to_sequential']:.2f}; meta-gradients agree to {rel:.1e}")
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
