"""Cost of ``opt.step()`` alone on any device: metascale's frozen optimizers against torch's
fused and foreach Adam and SGD with momentum, on an MLP of 4 ``Linear(w, w)`` layers
(w = 1584: 10.0M parameters, float32).

The frozen optimizers are exported by ``metascale meta-train --meta-steps 0`` from
``tasks/sine.toml`` (rules ``layerwise``, ``adaptive``, ``adaptive-momentum``; the step's cost
does not depend on the meta-parameters' values) and loaded with ``load_optimizer`` as a user
would. Fixed random gradients are attached once (none of the optimizers writes to ``p.grad``;
checked); each optimizer has its own copy of the parameters. Timed: ``opt.step()`` alone
(``torch.cuda.synchronize()`` before and after on CUDA), interleaved in rounds with a
rotating order, after ``--warmup`` untimed steps; medians over ``--repeats`` rounds; ratios to
``adam_fused`` and ``sgd_momentum`` (foreach). ``benchmarks/step_cost.py`` is the CPU-only
version with the adaptive step's breakdown.

    python benchmarks/step_cost_device.py [--device cuda] [--width 1584] [--repeats 50]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RULES = ("layerwise", "adaptive", "adaptive-momentum")


def export_rules(folder: Path) -> dict[str, Path]:
    from metascale.cli import main
    out = {}
    for rule in RULES:
        code = main(["meta-train", "--spec", str(ROOT / "tasks" / "sine.toml"), "--out", str(folder / rule), "--quiet",
                     "--device", "cpu", "--meta-steps", "0", "--checkpoint-every", "0", "--rule", rule,
                     "--jobs", "1", "--threads", str(torch.get_num_threads())])
        if code != 0:
            raise RuntimeError(f"exporting {rule} failed ({code})")
        out[rule] = folder / rule / "optimizer.safetensors"
    return out


def make_mlp(width: int, device) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    layers = []
    for i in range(4):
        layers.append(torch.nn.Linear(width, width))
        if i < 3:
            layers.append(torch.nn.ReLU())
    return list(torch.nn.Sequential(*layers).to(device).parameters())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--width", type=int, default=1584)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "step_cost_device.json"))
    args = ap.parse_args()
    import metascale
    device = torch.device(args.device)
    makers = {
        "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, foreach=True),
        "sgd_momentum_fused": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, fused=True),
        "adam_foreach": lambda p: torch.optim.Adam(p, lr=1e-3, foreach=True),
        "adam_fused": lambda p: torch.optim.Adam(p, lr=1e-3, fused=True),
    }
    with tempfile.TemporaryDirectory() as tmp:
        files = export_rules(Path(tmp))
        for rule, path in files.items():
            makers[rule.replace("-", "_")] = lambda p, path=path: metascale.load_optimizer(path, p, total_steps=10_000)
        g = torch.Generator().manual_seed(1)
        shapes = [p.shape for p in make_mlp(args.width, "cpu")]
        grads = [(torch.randn(s, generator=g) * 1e-3).to(device) for s in shapes]
        checksum = [float(x.double().square().sum()) for x in grads]
        opts, skipped = {}, {}
        for name, make in makers.items():
            params = make_mlp(args.width, device)
            for p, gr in zip(params, grads):
                p.grad = gr
            try:
                opts[name] = make(params)
                opts[name].step()
            except (RuntimeError, ValueError) as e:  # e.g. a fused kernel this torch lacks on this device
                skipped[name] = str(e).splitlines()[0]
                opts.pop(name, None)
        for opt in opts.values():
            for _ in range(args.warmup):
                opt.step()
        sync(device)
        keys = list(opts)
        times = {k: [] for k in keys}
        load0 = os.getloadavg()[0]
        for r in range(args.repeats):
            shift = r % len(keys)
            for k in keys[shift:] + keys[:shift]:
                sync(device)
                t0 = time.perf_counter()
                opts[k].step()
                sync(device)
                times[k].append(time.perf_counter() - t0)
        if [float(x.double().square().sum()) for x in grads] != checksum:
            raise RuntimeError("an optimizer wrote to the gradients")
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = {k: {"median_ms": med[k] * 1e3,
                **({"ratio_to_adam_fused": med[k] / med["adam_fused"]} if "adam_fused" in med else {}),
                "ratio_to_sgd_momentum": med[k] / med["sgd_momentum"]} for k in keys}
    n = sum(s.numel() for s in shapes)
    result = {"command": " ".join(["python benchmarks/step_cost_device.py", *sys.argv[1:]]), "torch": torch.__version__,
              "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "width": args.width, "params": n, "repeats": args.repeats,
              "load_avg_1min": [load0, os.getloadavg()[0]], "rows": rows, "skipped": skipped}
    print(f"{n / 1e6:.1f}M parameters, {result['device_name']}, {args.repeats} rounds (medians)")
    print("| optimizer | median step (ms) | ratio to Adam (fused) | ratio to SGD-momentum (foreach) |")
    print("|---|---|---|---|")
    for k, r in rows.items():
        print(f"| {k} | {r['median_ms']:.3f} | {r.get('ratio_to_adam_fused', float('nan')):.3f} | "
              f"{r['ratio_to_sgd_momentum']:.3f} |")
    for k, why in skipped.items():
        print(f"skipped {k}: {why}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
