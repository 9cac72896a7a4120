"""Frozen step cost of this checkout against another release of metascale, interleaved in one
process (both packages imported side by side), so machine load cancels in the ratios.

    git worktree add /tmp/release e99b16f
    python benchmarks/compare_release.py /tmp/release [--width 1584] [--repeats 40]

For each rule that both have (``layerwise``, ``adaptive``, ``adaptive-momentum``): the median
``opt.step()`` time of the release's frozen optimizer and of this checkout's (with the
divergence guard off and on), on the same 10M-parameter MLP and gradients, next to
``torch.optim.SGD(momentum=0.9, foreach=True)``; writes JSON.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RULES = ("layerwise", "adaptive", "adaptive-momentum")


def import_release(path: Path):
    """The release's ``metascale`` package, imported as ``metascale_release``."""
    spec = importlib.util.spec_from_file_location("metascale_release", path / "metascale" / "__init__.py",
                                                  submodule_search_locations=[str(path / "metascale")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["metascale_release"] = mod
    spec.loader.exec_module(mod)
    return mod


def mlp(width: int) -> list[torch.Tensor]:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(width, width) for _ in range(4)]
    return [p for m in layers for p in m.parameters()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("release", type=Path)
    ap.add_argument("--width", type=int, default=1584)
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compare_release.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    old = import_release(args.release)
    import metascale
    spec_new = metascale.load_spec(ROOT / "tasks" / "sine.toml")
    spec_old = old.spec.load_spec(args.release / "tasks" / "sine.toml")
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=g) * 1e-3 for p in mlp(args.width)]
    opts = {}

    def attach(params):
        for p, gr in zip(params, grads):
            p.grad = gr
        return params

    opts["sgd_momentum"] = torch.optim.SGD(attach(mlp(args.width)), lr=0.01, momentum=0.9, foreach=True)
    for rule in RULES:
        cfg_old = old.optim.rules.rule_config(spec_old, rule)
        meta_old = old.optim.rules.init_rule_meta(cfg_old, spec_old.inner.steps)
        opts[f"{rule} release"] = old.optim.rules.frozen_optimizer(attach(mlp(args.width)), meta_old, cfg_old,
                                                                     total_steps=10_000)
        cfg = spec_new.rule_config(rule)
        meta = metascale.RULES[rule].init_meta(cfg, spec_new.inner.horizon)
        for guard in (False, True):
            opts[f"{rule} now{' +guard' if guard else ''}"] = metascale.LearnedOptimizer(
                attach(mlp(args.width)), meta, cfg, total_steps=10_000, check_finite=guard)
    names = list(opts)
    for o in opts.values():
        for _ in range(3):
            o.step()
    times = {n: [] for n in names}
    for r in range(args.repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            opts[n].step()
            times[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(t) for n, t in times.items()}
    print(f"{sum(p.numel() for p in mlp(args.width)) / 1e6:.1f}M parameters, 1 thread, {args.repeats} rounds")
    print("| optimizer | median ms | ratio to SGD-momentum | ratio to the release's |")
    print("|---|---|---|---|")
    for n in names:
        rel = n.split(" ")[0] + " release"
        print(f"| {n} | {1e3 * med[n]:.2f} | {med[n] / med['sgd_momentum']:.3f} | "
              f"{med[n] / med[rel]:.3f} |" if rel in med and n != rel else
              f"| {n} | {1e3 * med[n]:.2f} | {med[n] / med['sgd_momentum']:.3f} | - |")
    import os
    Path(args.out).write_text(json.dumps({"command": "python benchmarks/compare_release.py " + " ".join(sys.argv[1:]),
                                          "load_avg_1min": os.getloadavg()[0], "median_s": med}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
