"""Per-layer step sizes three ways: backward-scaling hooks, explicit multiply, per-group lr.

On an MLP (``--layers`` x Linear(width, width) + ReLU; default 10 x 1024 = 10.5M parameters) with
``torch.optim.SGD`` (foreach), without momentum and with momentum 0.9, one factor ``c_l`` per layer:

  (a) hooks     ``metascale.scaling.backward.scale_backward_groups`` per layer + SGD(lr)
  (b) multiply  ``torch._foreach_mul_(grads_of_layer, c_l)`` after backward + SGD(lr)
  (c) groups    SGD with one param group per layer and lr * c_l (the reference)

All three models are trained side by side in ONE process; every repeat runs one step of each
method in a shuffled order (interleaved), so background load hits all three alike. Timed:
backward (``loss.backward()``, which includes the hooks in (a)) and step (the multiply in (b) +
``opt.step()``); the forward is not timed. Reports medians over repeats, the ratios
median(a)/median(c), median(b)/median(c) and the median of the per-repeat paired ratios, the
extra peak memory per method (analytic on CPU, ``torch.cuda.max_memory_allocated`` on CUDA), the
process peak RSS, and the max relative difference of the three models' weights at the end (they
take the same steps, so it checks the methods agree). Prints a markdown table and writes JSON.

    python benchmarks/backward_scaling.py [--width 1024] [--layers 10] [--batch 64] [--repeats 50] [--threads 1]
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from metascale.scaling.backward import scale_backward_groups  # noqa: E402

METHODS = ("hooks", "multiply", "groups")
LABEL = {"hooks": "(a) backward hooks + SGD(lr)", "multiply": "(b) _foreach_mul_ + SGD(lr)",
         "groups": "(c) per-group lr*c (reference)"}


def make_mlp(width: int, layers: int, device: str, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(layers)]).to(device)


def layer_params(model: nn.Sequential) -> list[list[torch.Tensor]]:
    return [list(block.parameters()) for block in model]


class Runner:
    """One model trained with one of the three methods."""

    def __init__(self, method: str, base: nn.Sequential, factors: list[float], lr: float, momentum: float):
        self.method, self.model = method, copy.deepcopy(base)
        self.groups = layer_params(self.model)
        self.factors = factors
        self.handle = None
        kw = dict(momentum=momentum, foreach=True)
        if method == "groups":
            self.opt = torch.optim.SGD([{"params": g, "lr": lr * c} for g, c in zip(self.groups, factors)], lr=lr, **kw)
        else:
            self.opt = torch.optim.SGD(self.model.parameters(), lr=lr, **kw)
        if method == "hooks":
            self.handle = scale_backward_groups(zip(self.groups, factors))

    def step(self, x: torch.Tensor, sync) -> tuple[float, float]:
        self.opt.zero_grad(set_to_none=True)
        loss = self.model(x).square().mean()
        sync()
        t0 = time.perf_counter()
        loss.backward()
        sync()
        t1 = time.perf_counter()
        if self.method == "multiply":
            for g, c in zip(self.groups, self.factors):
                torch._foreach_mul_([p.grad for p in g], c)
        self.opt.step()
        sync()
        return t1 - t0, time.perf_counter() - t1


def bench(device: str, width: int, layers: int, batch: int, momentum: float, repeats: int, warmup: int,
          lr: float, seed: int) -> dict:
    base = make_mlp(width, layers, device, seed)
    n_params = sum(p.numel() for p in base.parameters())
    factors = [0.5 + 1.5 * ((7 * l) % layers) / max(layers - 1, 1) for l in range(layers)]  # in [0.5, 2]
    runners = {m: Runner(m, base, factors, lr, momentum) for m in METHODS}
    x = torch.randn(batch, width, generator=torch.Generator().manual_seed(seed + 1)).to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    rng = random.Random(seed)
    times = {m: {"backward": [], "step": []} for m in METHODS}
    for r in range(warmup + repeats):
        order = list(METHODS)
        rng.shuffle(order)
        for m in order:
            tb, ts = runners[m].step(x, sync)
            if r >= warmup:
                times[m]["backward"].append(tb)
                times[m]["step"].append(ts)

    # all three took the same warmup + repeats steps: their weights must agree (float32 rounding)
    ref = [p.detach() for p in runners["groups"].model.parameters()]
    agree = {m: max(((p.detach() - q).abs().max() / q.abs().max()).item()
                    for p, q in zip(runners[m].model.parameters(), ref)) for m in ("hooks", "multiply")}

    itemsize = next(base.parameters()).element_size()
    largest = max(p.numel() for p in base.parameters()) * itemsize
    analytic = {"hooks": largest, "multiply": 0, "groups": 0}  # transient bytes beyond (c)
    measured = {}
    if device.startswith("cuda"):
        for m in METHODS:
            sync()
            torch.cuda.reset_peak_memory_stats()
            runners[m].opt.zero_grad(set_to_none=True)
            before = torch.cuda.memory_allocated()
            runners[m].step(x, sync)
            measured[m] = torch.cuda.max_memory_allocated() - before
        measured = {m: v - measured["groups"] for m, v in measured.items()}

    out = {"device": device, "momentum": momentum, "n_params": n_params, "factors": factors, "methods": {}}
    med = {m: {k: statistics.median(v) for k, v in times[m].items()} for m in METHODS}
    totals = {m: [b + s for b, s in zip(times[m]["backward"], times[m]["step"])] for m in METHODS}
    for m in METHODS:
        total = statistics.median(totals[m])
        row = {"backward_ms": 1e3 * med[m]["backward"], "step_ms": 1e3 * med[m]["step"], "total_ms": 1e3 * total,
               "total_iqr_ms": [1e3 * q for q in statistics.quantiles(totals[m], n=4)[::2]],
               "ratio_vs_groups": total / statistics.median(totals["groups"]),
               "paired_ratio_vs_groups": statistics.median(a / c for a, c in zip(totals[m], totals["groups"])),
               "extra_peak_bytes_analytic": analytic[m]}
        if m in measured:
            row["extra_peak_bytes_cuda"] = measured[m]
        if m in agree:
            row["max_rel_weight_diff_vs_groups"] = agree[m]
        out["methods"][m] = row
    for r in runners.values():
        if r.handle is not None:
            r.handle.remove()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=50, help="timed repeats (one step of every method each)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed repeats first (allocator, page faults)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads on CPU (1: with a second process on a 2-core machine, 2 threads "
                         "ran ~4-10x slower with an IQR of 10x the median)")
    ap.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "backward_scaling.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    results = [bench(dev, args.width, args.layers, args.batch, mom, args.repeats, args.warmup, args.lr, args.seed)
               for dev in args.devices for mom in (0.0, 0.9)]
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    report = {"command": " ".join(["python benchmarks/backward_scaling.py", *sys.argv[1:]]),
              "torch": torch.__version__, "python": sys.version.split()[0], "threads": args.threads,
              "width": args.width, "layers": args.layers, "batch": args.batch, "repeats": args.repeats,
              "warmup": args.warmup, "lr": args.lr, "dtype": "float32", "optimizer": "torch.optim.SGD(foreach=True)",
              "timed": "backward + (multiply) + optimizer step; forward untimed; medians over repeats",
              "process_peak_rss_bytes": peak_rss, "wall_s": round(time.time() - t0, 1), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))

    print(f"MLP {args.layers} x {args.width}x{args.width} ({results[0]['n_params'] / 1e6:.1f}M params), batch "
          f"{args.batch}, float32, {args.repeats} interleaved repeats after {args.warmup} warm-up, torch "
          f"{torch.__version__}, {args.threads} CPU threads\n")
    print("| device | SGD | method | backward ms | step ms | backward+step ms (IQR) | ratio vs (c) | paired ratio "
          "| extra peak | max rel weight diff vs (c) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for res in results:
        for m, row in res["methods"].items():
            extra = row.get("extra_peak_bytes_cuda", row["extra_peak_bytes_analytic"])
            kind = "measured" if "extra_peak_bytes_cuda" in row else "analytic"
            lo, hi = row["total_iqr_ms"]
            diff = f"{row['max_rel_weight_diff_vs_groups']:.1e}" if "max_rel_weight_diff_vs_groups" in row else "-"
            print(f"| {res['device']} | {'momentum 0.9' if res['momentum'] else 'plain'} | {LABEL[m]} "
                  f"| {row['backward_ms']:.1f} | {row['step_ms']:.1f} | {row['total_ms']:.1f} ({lo:.1f}-{hi:.1f}) "
                  f"| {row['ratio_vs_groups']:.3f} | {row['paired_ratio_vs_groups']:.3f} "
                  f"| {extra / 2**20:.1f} MiB ({kind}) | {diff} |")
    print(f"\nprocess peak RSS {peak_rss / 2**20:.0f} MiB; wall {report['wall_s']} s; JSON: {args.out}")


if __name__ == "__main__":
    main()
