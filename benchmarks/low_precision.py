"""Final loss of a small MLP trained by each released optimizer file in float32, float16 and
bfloat16 parameters (foreach/fused and per-tensor paths), next to torch.optim.SGD: the low-precision
check of issue 16 as numbers.

The release files of tests/fixtures/release-0.1.0 (layerwise, adaptive, adaptive-momentum) on a
3-16-16-1 tanh MLP, 64 fixed points of y = sin(x1 + x2 + x3), 60 full-batch steps from one seed;
the loss is computed in float32 from the model's output. One thread.

    python benchmarks/low_precision.py [--out benchmarks/results/low_precision.json]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import metascale

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "release-0.1.0"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def final_loss(make_opt, dtype, steps: int = 60) -> float:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 1)).to(dtype)
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(5))
    y = torch.sin(x.sum(1, keepdim=True))
    x, y = x.to(dtype), y.to(dtype)
    opt = make_opt(model.parameters())
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x).float(), y.float()).backward()
        opt.step()
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model(x).float(), y.float()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "low_precision.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = {}
    for rule in ("layerwise", "adaptive", "adaptive-momentum"):
        for foreach in (True, False):
            make = lambda ps, r=rule, f=foreach: metascale.load_optimizer(FIXTURES / f"{r}.safetensors", ps,
                                                                          total_steps=40, foreach=f)
            rows[f"{rule} foreach={foreach}"] = {k: final_loss(make, d) for k, d in DTYPES.items()}
    rows["torch SGD(lr=0.05, momentum=0.9)"] = {
        k: final_loss(lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), d) for k, d in DTYPES.items()}
    print("| optimizer | fp32 | fp16 | bf16 |\n|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['fp32']:.4f} | {r['fp16']:.4f} | {r['bf16']:.4f} |")
    Path(args.out).write_text(json.dumps({"command": "python benchmarks/low_precision.py", "torch": torch.__version__,
                                          "final_loss": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
