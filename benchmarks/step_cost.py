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

Breakdown of the adaptive step (timed in the same rounds, on the adaptive optimizer's own
tensors): ``norm_grads`` and ``norm_params`` (the two ``torch._foreach_norm`` reductions),
``update`` (the in-place layer-wise update with the step's ``eta`` and ``s``, per variant),
and the same step on a 16-wide copy of the MLP (``tiny_*``), where the whole step is the
fixed per-step cost: Python, the per-group statistics and the tiny network.

Proposal rows (``+fused``, not in the library): the same optimizers with the in-place
heavy-ball update done by ``torch._fused_sgd_`` (:func:`fused_layerwise_update`, swapped in
for the timed call); the script checks it gives the library's numbers.

    python benchmarks/step_cost.py [--width 1584] [--repeats 80] [--threads 1 0]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import metascale.optim.adaptive as adaptive_module
import metascale.optim.layerwise as layerwise_module
from metascale.optim import layerwise_update
from optimizer_memory import ROOT, make_mlp, make_optimizer

OPTIMIZERS = ("sgd_momentum", "adam", "adaptive", "adaptive_momentum", "layerwise")
PROPOSALS = ("adaptive_momentum+fused", "layerwise+fused")
BASE = "sgd_momentum"


# ------------------------------------------------------------------ proposal, not in the library
def fused_layerwise_update(params, grads, bufs, *, step_size, scale, momentum, nesterov, inplace, foreach=False):
    """:func:`layerwise_update` with the in-place heavy-ball step done by ``torch._fused_sgd_``
    (one pass over p, g, b instead of three): ``dampening = 1 - s`` makes its
    ``b = mu b + (1 - dampening) g; p -= lr b`` exactly the rule's ``b = mu b + s g; p -= eta b``.
    A fresh buffer starts at zero, so the first step gives ``b = s g`` as the rule does. Other
    cases (no momentum, Nesterov, differentiable path) go to the library's function."""
    live = [i for i, g in enumerate(grads) if g is not None]
    if not inplace or momentum == 0 or nesterov or not live:
        return layerwise_update(params, grads, bufs, step_size=step_size, scale=scale, momentum=momentum,
                                nesterov=nesterov, inplace=inplace, foreach=foreach)
    new_b = list(bufs)
    for i in live:
        if new_b[i] is None:
            new_b[i] = torch.zeros_like(params[i])
    torch._fused_sgd_([params[i] for i in live], [grads[i] for i in live], [new_b[i] for i in live],
                      weight_decay=0.0, momentum=momentum, lr=float(step_size), dampening=1.0 - float(scale),
                      nesterov=False, maximize=False, is_first_step=False)
    return list(params), new_b


class Patched:
    """``opt.step()`` with ``layerwise_update`` replaced by :func:`fused_layerwise_update` in the
    rule modules for the duration of the call."""

    def __init__(self, opt):
        self.opt = opt

    def step(self):
        with contextlib.ExitStack() as stack:
            for mod in (adaptive_module, layerwise_module):
                stack.enter_context(_swap(mod, "layerwise_update", fused_layerwise_update))
            return self.opt.step()


@contextlib.contextmanager
def _swap(mod, name, value):
    old = getattr(mod, name)
    setattr(mod, name, value)
    try:
        yield
    finally:
        setattr(mod, name, old)


def proposal_parity(width: int, steps: int = 4) -> dict:
    """Largest difference of parameters and buffers between the library's step and the proposal
    after ``steps`` steps from the same init and gradients (first step included)."""
    out = {}
    for name in ("adaptive_momentum", "layerwise"):
        torch.manual_seed(2)
        grads = [torch.randn_like(p) * 1e-3 for p in make_mlp(width).parameters()]
        (a, pa), (b, pb) = build(name, width, grads), build(name, width, grads)
        for _ in range(steps):
            a.step()
            Patched(b).step()
        out[name] = {"max_abs_param_diff": max(float((x - y).detach().abs().max()) for x, y in zip(pa, pb)),
                     "max_abs_buffer_diff": max(float((a.state[x]["momentum_buffer"] - b.state[y]["momentum_buffer"])
                                                      .abs().max()) for x, y in zip(pa, pb))}
    return out


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
    if hasattr(opt, "net"):  # perturbed, untrained network: every path of the network is live
        opt.net = {k: v + 0.01 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in opt.net.items()}
    return opt, params


def adaptive_parts(opt) -> dict:
    """Callables for the parts of ``opt.step()`` of an AdaptiveOptimizer, on its own tensors."""
    groups = [(g, [p for p in g["params"]]) for g in opt.param_groups]
    flat = [p for _, ps in groups for p in ps]
    grads = [p.grad for p in flat]

    @torch.no_grad()
    def update():
        for g, ps in groups:
            states = [opt.state[p] for p in ps]
            layerwise_update(ps, [p.grad for p in ps], [st.get("momentum_buffer") for st in states],
                             step_size=g["last_step_size"], scale=g["last_scale"], momentum=g["momentum"],
                             nesterov=g["nesterov"], inplace=True, foreach=len(ps) > 1)

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
    for name in PROPOSALS:
        opt, _ = build(name.split("+")[0], width, grads)
        timed[name] = Patched(opt).step
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
    return {"threads": threads, "repeats": repeats, "flush_mib": flush_mib, "rows": rows, "breakdown_ms": breakdown,
            "params": sum(s.numel() for s in shapes)}


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
    parity = proposal_parity(64)
    passes = [run_pass(args.width, n or default_threads, args.repeats, args.warmup, args.flush_mib) for n in args.threads]
    for ps in passes:
        print(f"\n{ps['params'] / 1e6:.1f}M parameters, threads={ps['threads']}, {ps['repeats']} rounds (medians)")
        print(f"| optimizer | median step (ms) | IQR (ms) | ratio to SGD-momentum (of medians) | paired ratio |")
        print("|---|---|---|---|---|")
        for k in OPTIMIZERS + PROPOSALS:
            r = ps["rows"][k]
            print(f"| {k} | {r['median_ms']:.2f} | {r['q25_ms']:.1f}-{r['q75_ms']:.1f} | "
                  f"{r['ratio_of_medians']:.3f} | {r['median_paired_ratio']:.3f} |")
        print("adaptive step breakdown (median ms):")
        print("| variant | " + " | ".join(ps["breakdown_ms"]["adaptive"]) + " |")
        print("|---" * (len(ps["breakdown_ms"]["adaptive"]) + 1) + "|")
        for name, parts in ps["breakdown_ms"].items():
            print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in parts.values()) + " |")
        print(f"tiny (16-wide) sgd_momentum step: {ps['rows']['tiny_sgd_momentum']['median_ms']:.3f} ms")
    print(f"proposal (+fused) vs library step, after 4 steps on a 64-wide MLP: {parity}")
    result = {"command": " ".join(["python benchmarks/step_cost.py", *sys.argv[1:]]), "torch": torch.__version__,
              "machine": platform.machine(), "default_threads": default_threads, "width": args.width,
              "wall_s": round(time.time() - t_start, 1), "proposal_parity": parity, "passes": passes}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out} ({result['wall_s']} s)")


if __name__ == "__main__":
    main()
