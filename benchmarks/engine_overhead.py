"""Meta-step time of the library's unroll engines vs hand-written baselines.

One meta-step = build the seeded model of one task, K differentiable inner steps (momentum
0.9, per-layer step sizes from meta-parameters), meta-loss ``log mean_t L_val(t)``, then the
gradient of the meta-loss w.r.t. the meta tensors. Variants (same data, same init, same
numbers up to float rounding; the meta-losses are reported as a check):

* ``hand_func``    hand-written torch.func unroll: functional_call + autograd.grad(create_graph)
                   + inline SGD-momentum with step sizes exp(theta[layer])
* ``raw_higher``   higher.innerloop_ctx + torch.optim.SGD(momentum=0.9), per-layer lr overrides
* ``lib_func``     metascale.inner.func_engine.unroll_func   (LayerwiseConfig momentum 0.9,
* ``lib_higher``   metascale.inner.higher_engine.unroll       per_step=False, depth_bins=3)

Diagnostics (``--extra``): ``hand_func_scaled`` (hand-written with a learned per-layer gradient
rescaling, the cost of the rule's ``s`` when it cannot be folded) and ``lib_func_per_step``
(unroll_func with ``per_step = true``).

The variants are interleaved (rotating order) after a warm-up; medians over repeats.
Acceptance target: lib_func / hand_func and lib_higher / raw_higher at most 1.05.

    python benchmarks/engine_overhead.py [--width 256] [--k 20] [--batch 256] [--repeats 30] [--extra]
"""
from __future__ import annotations

import argparse
import cProfile
import dataclasses
import importlib.metadata
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import higher
import torch
from torch.func import functional_call

from metascale.inner.func_engine import unroll_func
from metascale.inner.higher_engine import unroll
from metascale.optim import RULES, LayerwiseConfig

init_meta = RULES["layerwise"].init_meta
from metascale.tasks.base import Task, mlp, mse

ROOT = Path(__file__).resolve().parent.parent
MU, LR = 0.9, 0.01


def make_task(width: int, batch: int, d_in: int = 32, seed: int = 0) -> Task:
    """Regression: x ~ N(0, I) (train and val, ``batch`` rows each), y = tanh-MLP teacher(x)."""
    g = torch.Generator().manual_seed(seed)
    w1, w2 = torch.randn(d_in, 64, generator=g) / d_in ** 0.5, torch.randn(64, 1, generator=g) / 8
    x_tr, x_va = torch.randn(batch, d_in, generator=g), torch.randn(batch, d_in, generator=g)
    return Task(family="synthetic", split="train", index=0, seed=seed, config={}, kind="regression",
                x_train=x_tr, y_train=torch.tanh(x_tr @ w1) @ w2, x_val=x_va,
                y_val=torch.tanh(x_va @ w1) @ w2, build_model=lambda: mlp((d_in, width, width, 1)),
                batch_size=batch)


def layer_of(params) -> list[int]:
    """Layer index of each parameter (each matrix starts a layer)."""
    out, layer = [], -1
    for p in params:
        layer += p.dim() >= 2
        out.append(layer)
    return out


def hand_func(task: Task, theta: torch.Tensor, k: int, theta_s: torch.Tensor | None = None):
    """Hand-written functional unroll; returns (meta-loss, d meta-loss / d theta).

    With ``theta_s`` (diagnostic ``hand_func_scaled``), the gradient of layer ``l`` is first
    rescaled by ``exp(theta_s[l])``, a tensor that requires grad, as in the library's rule
    when ``s`` cannot be folded into the step size (``per_step = true`` with momentum)."""
    model = task.make_model()
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach().requires_grad_() for p in model.parameters()]
    lay = layer_of(params)
    lrs = torch.exp(theta)
    ss = None if theta_s is None else torch.exp(theta_s)
    bufs: list = [None] * len(params)
    vals = []
    for _ in range(k):
        loss = mse(functional_call(model, dict(zip(names, params)), (task.x_train,)), task.y_train)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        for i, g in enumerate(grads):
            g = g if ss is None else g * ss[lay[i]]
            bufs[i] = g if bufs[i] is None else bufs[i] * MU + g
            params[i] = params[i] - lrs[lay[i]] * bufs[i]
        vals.append(mse(functional_call(model, dict(zip(names, params)), (task.x_val,)), task.y_val))
    meta_loss = torch.log(torch.stack(vals).mean())
    return meta_loss, torch.autograd.grad(meta_loss, [theta] + ([] if theta_s is None else [theta_s]))


def raw_higher(task: Task, theta: torch.Tensor, k: int):
    """higher + torch.optim.SGD(momentum) with per-layer lr overrides exp(theta)."""
    model = task.make_model()
    ps = list(model.parameters())
    lay = layer_of(ps)
    groups = [{"params": [p for p, l in zip(ps, lay) if l == j]} for j in range(max(lay) + 1)]
    opt = torch.optim.SGD(groups, lr=LR, momentum=MU)
    lrs = torch.exp(theta)
    vals = []
    with higher.innerloop_ctx(model, opt, override={"lr": [lrs[j] for j in range(len(groups))]},
                              copy_initial_weights=True) as (fmodel, diffopt):
        for _ in range(k):
            diffopt.step(mse(fmodel(task.x_train), task.y_train))
            vals.append(mse(fmodel(task.x_val), task.y_val))
        meta_loss = torch.log(torch.stack(vals).mean())
    return meta_loss, torch.autograd.grad(meta_loss, [theta])


def library(engine):
    def run(task: Task, meta: dict, k: int, cfg: LayerwiseConfig):
        meta_loss = engine(task, meta, cfg, k, objective="log_mean").meta_loss
        return meta_loss, torch.autograd.grad(meta_loss, list(meta.values()))
    return run


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves while ``fn`` runs (graph memory)."""
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--k", type=int, default=20, help="inner steps K")
    ap.add_argument("--batch", type=int, default=256, help="train batch = val set size")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="cProfile lib_func and hand_func once")
    ap.add_argument("--extra", action="store_true",
                    help="add diagnostics: hand_func_scaled and lib_func_per_step (per_step = true)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "engine_overhead.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    task = make_task(args.width, args.batch)
    cfg = LayerwiseConfig(init_lr=LR, momentum=MU, per_step=False, depth_bins=3)
    meta = {k: v.requires_grad_() for k, v in init_meta(cfg, args.k).items()}
    theta = torch.full((3,), torch.log(torch.tensor(LR)).item(), requires_grad=True)
    variants = {
        "hand_func": lambda: hand_func(task, theta, args.k),
        "lib_func": lambda: library(unroll_func)(task, meta, args.k, cfg),
        "raw_higher": lambda: raw_higher(task, theta, args.k),
        "lib_higher": lambda: library(unroll)(task, meta, args.k, cfg),
    }
    if args.extra:
        cfg_ps = dataclasses.replace(cfg, per_step=True)
        meta_ps = {k: v.requires_grad_() for k, v in init_meta(cfg_ps, args.k).items()}
        theta_s = torch.zeros(3, requires_grad=True)
        variants["hand_func_scaled"] = lambda: hand_func(task, theta, args.k, theta_s)
        variants["lib_func_per_step"] = lambda: library(unroll_func)(task, meta_ps, args.k, cfg_ps)
    names = list(variants)
    losses = {n: float(variants[n]()[0].detach()) for n in names}
    graph_mb = {n: saved_bytes(variants[n]) / 2 ** 20 for n in names}
    for _ in range(args.warmup):
        for n in names:
            variants[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:  # rotate the order
            t0 = time.perf_counter()
            variants[n]()
            times[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) for n, v in times.items()}
    q = {n: statistics.quantiles(v, n=4) for n, v in times.items()}
    # paired ratios: same repeat, adjacent in time, so background load cancels better
    paired = {a: statistics.median(x / y for x, y in zip(times[a], times[b]))
              for a, b in (("lib_func", "hand_func"), ("lib_higher", "raw_higher"))}
    ratios = {"lib_func/hand_func": med["lib_func"] / med["hand_func"],
              "lib_higher/raw_higher": med["lib_higher"] / med["raw_higher"],
              "lib_func/raw_higher": med["lib_func"] / med["raw_higher"],
              "paired_median lib_func/hand_func": paired["lib_func"],
              "paired_median lib_higher/raw_higher": paired["lib_higher"]}
    if args.extra:
        ratios["lib_func_per_step/hand_func_scaled"] = med["lib_func_per_step"] / med["hand_func_scaled"]
        ratios["hand_func_scaled/hand_func"] = med["hand_func_scaled"] / med["hand_func"]
    print(f"K={args.k}, MLP 32-{args.width}-{args.width}-1, batch {args.batch}, "
          f"{args.repeats} repeats, {torch.get_num_threads()} thread(s), torch {torch.__version__}\n")
    print("| variant | median ms / meta-step | IQR ms | graph MB (saved tensors) | meta-loss |")
    print("|---|---|---|---|---|")
    for n in names:
        print(f"| {n} | {1e3 * med[n]:.1f} | {1e3 * q[n][0]:.1f}-{1e3 * q[n][2]:.1f} | "
              f"{graph_mb[n]:.1f} | {losses[n]:.6f} |")
    print("\n| ratio | value |\n|---|---|")
    for k, v in ratios.items():
        print(f"| {k} | {v:.3f} |")
    if args.profile:
        for n in ("lib_func", "hand_func"):
            prof = cProfile.Profile()
            prof.runcall(variants[n])
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(15)
            print(f"\n### cProfile {n}\n{s.getvalue()}")
    out = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "torch": torch.__version__,
           "higher": importlib.metadata.version("higher"), "threads": torch.get_num_threads(),
           "config": {"width": args.width, "k": args.k, "batch": args.batch, "repeats": args.repeats,
                      "warmup": args.warmup, "extra": args.extra, "momentum": MU, "init_lr": LR, "dtype": "float32"},
           "median_s": med, "quartiles_s": {n: [q[n][0], q[n][2]] for n in names},
           "ratios": ratios, "graph_saved_mb": graph_mb, "meta_loss": losses,
           "target": "lib / baseline <= 1.05"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
