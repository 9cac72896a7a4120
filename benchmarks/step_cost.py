"""Cost of ``opt.step()`` alone: the adaptive rule against SGD with momentum, Adam and the static rule.

On an MLP of 4 ``Linear(w, w)`` layers (w = 1584: 10.0M parameters, float32, CPU), fixed
random gradients are attached once and every optimizer steps from them again and again (none
of these optimizers writes to ``p.grad``; the script checks it). Each optimizer has its own
copy of the parameters (same init). Timed: ``opt.step()`` only, interleaved in rounds
(rotating order), after ``--warmup`` untimed steps that create the state; medians over
``--repeats`` rounds; ratios against ``torch.optim.SGD(momentum=0.9, foreach=True)`` both
as ratio of medians and as median of the per-round ratios (paired, less sensitive to a
noisy machine). Each thread count (``--threads``; 0 = torch's default) is a separate pass.

Optimizers: ``sgd_momentum``, ``adam`` (foreach), metascale's frozen ``adaptive``
(state-free), ``adaptive_momentum`` (0.9) and ``layerwise`` (static, momentum 0.9), built
from ``tasks/sine.toml`` with untrained meta-parameters perturbed by N(0, 0.01^2) noise (the
cost does not depend on the values).

The metascale optimizers run as the library builds them: foreach kernels for every group, and
the in-place heavy-ball update (momentum, no Nesterov: ``adaptive_momentum``, ``layerwise``)
is one ``torch._fused_sgd_`` pass over (p, g, b) per group (:func:`metascale.optim.kernels.heavy_ball_`).

Breakdown of the adaptive step (timed in the same rounds, on the adaptive optimizer's own
tensors): ``norm_grads`` and ``norm_params`` (the two ``torch._foreach_norm`` reductions),
``update`` (:func:`heavy_ball_` in place with the step's ``eta`` and ``s``, per variant,
the same call the optimizer makes), and the same step on a 16-wide copy of the MLP
(``tiny_*``), where the whole step is the fixed per-step cost: Python, the per-group
statistics and the tiny network. The JSON records the 1-minute load average before and after.

The divergence guard (``check_finite``, on by default: one max-abs ``torch._foreach_norm`` over
the updated parameters and one host sync per step) is timed as the difference between each
metascale optimizer and the same optimizer with ``check_finite=False`` (``guard`` in the JSON).

    python benchmarks/step_cost.py [--width 1584] [--repeats 80] [--threads 1 0]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from metascale.optim.kernels import heavy_ball_
from optimizer_memory import ROOT, make_mlp, make_optimizer

OPTIMIZERS = ("sgd_momentum", "adam", "adaptive", "adaptive_momentum", "layerwise")
BASE = "sgd_momentum"
GUARDED = ("adaptive", "adaptive_momentum", "layerwise")
"""Also timed with the divergence guard off (``check_finite=False``): the guard's cost."""


def build(name: str, width: int, grads: list[torch.Tensor] | None, seed: int = 0):
    """``(optimizer, params)`` on a fresh MLP of ``width`` with ``grads`` attached (random if None)."""
    torch.manual_seed(0)
    params = list(make_mlp(width).parameters())
    for p, g in zip(params, grads if grads is not None else [torch.randn_like(p) * 1e-3 for p in params]):
        p.grad = g
    if name == "sgd_momentum":
        return torch.optim.SGD(params, lr=0.01, momentum=0.9, foreach=True), params
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3, foreach=True), params
    opt = make_optimizer(name, params, 10_000)
    gen = torch.Generator().manual_seed(seed)
    if hasattr(opt.bound, "net"):  # perturbed, untrained network: every path of the network is live
        opt.bound.net = {k: v + 0.01 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in opt.bound.net.items()}
    return opt, params


def adaptive_parts(opt) -> dict:
    """Callables for the parts of ``opt.step()`` of an adaptive rule's optimizer, on its own tensors."""
    groups = [(g, [p for p in g["params"]]) for g in opt.param_groups]
    flat = [p for _, ps in groups for p in ps]
    grads = [p.grad for p in flat]

    @torch.no_grad()
    def update():  # as the rule's step calls the kernel (foreach None: the foreach/fused kernels)
        cfg = opt.config
        for g, ps in groups:
            states = [opt.state[p] for p in ps]
            heavy_ball_(ps, [p.grad for p in ps], [st.get("momentum_buffer") for st in states],
                        lr=g["last_step_size"], scale=g["last_scale"], momentum=cfg.momentum, nesterov=cfg.nesterov,
                        foreach=g["foreach"] is not False, fused=True)

    return {"norm_grads": lambda: torch._foreach_norm(grads), "norm_params": lambda: torch._foreach_norm(flat),
            "update": update}


def run_pass(width: int, threads: int, repeats: int, warmup: int, flush_mib: int) -> dict:
    torch.set_num_threads(threads)
    flush = torch.ones(flush_mib * 2**18) if flush_mib else None
    g = torch.Generator().manual_seed(1)
    shapes = [p.shape for p in make_mlp(width).parameters()]
    grads = [torch.randn(s, generator=g) * 1e-3 for s in shapes]
    checksum = [float(x.double().square().sum()) for x in grads]
    timed, opts = {}, {}
    for name in OPTIMIZERS:
        opt, _ = build(name, width, grads)
        opts[name] = opt
        timed[name] = opt.step
    for name in GUARDED:  # the same optimizer without the divergence guard
        opt, _ = build(name, width, grads)
        opt.check_finite = False
        timed[f"{name}.unguarded"] = opt.step
    for name in ("adaptive", "adaptive_momentum"):
        for _ in range(warmup):
            opts[name].step()  # state and last_step_size exist before the parts are built
        for part, fn in adaptive_parts(opts[name]).items():
            timed[f"{name}.{part}"] = fn
    for name in ("sgd_momentum", "adaptive", "adaptive_momentum"):
        tiny, _ = build(name, 16, None)
        timed[f"tiny_{name}"] = tiny.step
    for fn in timed.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in timed}
    keys = list(timed)
    for r in range(repeats):
        shift = r % len(keys)
        for k in keys[shift:] + keys[:shift]:
            if flush is not None:
                flush.sum()  # evict the caches: every step starts from main memory
            t0 = time.perf_counter()
            timed[k]()
            times[k].append(time.perf_counter() - t0)
    if [float(x.double().square().sum()) for x in grads] != checksum:
        raise RuntimeError("an optimizer wrote to the gradients")
    med = {k: statistics.median(v) for k, v in times.items()}
    base = times[BASE]
    rows = {}
    for k, ts in times.items():
        ratios = [t / b for t, b in zip(ts, base)]
        q = statistics.quantiles(ts, n=4)
        rows[k] = {"median_ms": med[k] * 1e3, "q25_ms": q[0] * 1e3, "q75_ms": q[2] * 1e3,
                   "ratio_of_medians": med[k] / med[BASE], "median_paired_ratio": statistics.median(ratios)}
    breakdown = {}
    for name in ("adaptive", "adaptive_momentum"):
        parts = {p: med[f"{name}.{p}"] * 1e3 for p in ("norm_grads", "norm_params", "update")}
        parts["rest (step - parts)"] = med[name] * 1e3 - sum(parts.values())
        parts["step"] = med[name] * 1e3
        parts["tiny-model step (fixed cost)"] = med[f"tiny_{name}"] * 1e3
        breakdown[name] = parts
    guard = {}
    for name in GUARDED:
        paired = [a - b for a, b in zip(times[name], times[f"{name}.unguarded"])]
        guard[name] = {"step_ms": med[name] * 1e3, "unguarded_ms": med[f"{name}.unguarded"] * 1e3,
                       "guard_ms_paired_median": statistics.median(paired) * 1e3,
                       "guard_fraction_of_step": statistics.median(paired) / med[name]}
    return {"threads": threads, "repeats": repeats, "flush_mib": flush_mib, "rows": rows, "breakdown_ms": breakdown,
            "guard": guard, "params": sum(s.numel() for s in shapes)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=1584)
    ap.add_argument("--repeats", type=int, default=80)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 0], help="0 = torch's default thread count")
    ap.add_argument("--flush-mib", type=int, default=0,
                    help="before every timed step, read a buffer of this size (MiB) to evict the caches; 0 = off")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "step_cost.json"))
    args = ap.parse_args()
    default_threads = torch.get_num_threads()
    t_start = time.time()
    load_start = os.getloadavg()[0]
    passes = [run_pass(args.width, n or default_threads, args.repeats, args.warmup, args.flush_mib) for n in args.threads]
    for ps in passes:
        print(f"\n{ps['params'] / 1e6:.1f}M parameters, threads={ps['threads']}, {ps['repeats']} rounds (medians)")
        print(f"| optimizer | median step (ms) | IQR (ms) | ratio to SGD-momentum (of medians) | paired ratio |")
        print("|---|---|---|---|---|")
        for k in OPTIMIZERS:
            r = ps["rows"][k]
            print(f"| {k} | {r['median_ms']:.2f} | {r['q25_ms']:.1f}-{r['q75_ms']:.1f} | "
                  f"{r['ratio_of_medians']:.3f} | {r['median_paired_ratio']:.3f} |")
        print("adaptive step breakdown (median ms):")
        print("| variant | " + " | ".join(ps["breakdown_ms"]["adaptive"]) + " |")
        print("|---" * (len(ps["breakdown_ms"]["adaptive"]) + 1) + "|")
        for name, parts in ps["breakdown_ms"].items():
            print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in parts.values()) + " |")
        print(f"tiny (16-wide) sgd_momentum step: {ps['rows']['tiny_sgd_momentum']['median_ms']:.3f} ms")
        print("divergence guard (check_finite, default on): step with and without, median ms; paired difference")
        for name, g in ps["guard"].items():
            print(f"| {name} | {g['step_ms']:.2f} | {g['unguarded_ms']:.2f} | {g['guard_ms_paired_median']:+.2f} "
                  f"({100 * g['guard_fraction_of_step']:+.1f}% of the step) |")
    result = {"command": " ".join(["python benchmarks/step_cost.py", *sys.argv[1:]]), "torch": torch.__version__,
              "machine": platform.machine(), "cpus": os.cpu_count(), "default_threads": default_threads,
              "width": args.width, "wall_s": round(time.time() - t_start, 1),
              "load_avg_1min": [load_start, os.getloadavg()[0]], "passes": passes}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out} ({result['wall_s']} s)")


if __name__ == "__main__":
    main()
