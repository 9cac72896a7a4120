"""metascale from Python: meta-train on a spec, export, and train a new model with the result.

    python examples/quickstart.py [--meta-steps N] [--out DIR]
"""
import argparse

import torch

import metascale

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--spec", default="tasks/sine.toml")
parser.add_argument("--meta-steps", type=int, default=None)
parser.add_argument("--out", default="runs/python-quickstart")
args = parser.parse_args()

# 1. meta-train the layer-wise optimizer on the spec's meta-train tasks, then export it
spec = metascale.load_spec(args.spec)
result = metascale.MetaTrainer(spec, seed=0, meta_steps=args.meta_steps).train(f"{args.out}/metrics.jsonl")
path = metascale.save_optimizer(f"{args.out}/optimizer.safetensors", result.meta, result.rule,
                                spec.to_dict(), result.summary)

# 2. use it as a drop-in torch optimizer on a model it never saw (wider and deeper than 1-40-40-1)
torch.manual_seed(0)  # the new model's initialisation (torch seeds its default generator at random)
model = torch.nn.Sequential(torch.nn.Linear(1, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                            torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
opt = metascale.load_optimizer(path, model.parameters())
x = torch.linspace(-5, 5, 50)[:, None]
y = 2.0 * torch.sin(x - 1.0)
for step in range(100):
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    if step % 25 == 0 or step == 99:
        print(f"step {step:3d}  loss {loss.item():.4f}")
