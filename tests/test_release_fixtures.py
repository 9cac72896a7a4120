"""Files written by release 0.1.0 load to identical optimizers (tests/fixtures/release-0.1.0)."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import metascale

HERE = Path(__file__).parent / "fixtures" / "release-0.1.0"


@pytest.mark.parametrize("rule", ["layerwise", "adaptive", "adaptive-momentum"])
def test_release_file_gives_the_release_trajectory(rule):
    want = load_file(str(HERE / f"{rule}.trajectory.safetensors"))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 1))
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(5))
    y = torch.sin(x.sum(1, keepdim=True))
    opt = metascale.load_optimizer(HERE / f"{rule}.safetensors", model.parameters(), total_steps=40)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses == want["losses"].tolist()
    for i, p in enumerate(model.parameters()):
        assert torch.equal(p.detach(), want[f"param.{i}"]), f"parameter {i} differs"
