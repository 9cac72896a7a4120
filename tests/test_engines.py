"""The torch.func engine against the higher engine (float64), gradcheck, truncated windows."""
from __future__ import annotations

import math

import pytest
import torch

from metascale.inner.func_engine import FuncUnrollResult, InnerState, init_state, unroll_func
from metascale.inner.higher_engine import meta_objective, unroll
from metascale.losses import LossConfig, make_loss
from metascale.optim import RULES, LayerwiseConfig

init_meta = RULES["layerwise"].init_meta
from metascale.tasks import FAMILIES, SineConfig, SineFamily, TaskSampler

F64 = torch.float64


def small_task(index: int = 0):
    """3-layer sine regression (depths 0, 0.5, 1: exercises the anchor interpolation)."""
    fam = SineFamily(SineConfig(hidden=(6, 5), n_train=8, n_val=16))
    return TaskSampler(fam, "train", seed=5, batch_size=4).task(index)


def mixture_task(index: int = 0):
    fam_cls, cfg_cls = FAMILIES["gaussian_mixture"]
    fam = fam_cls(cfg_cls(n_classes=(3, 3), dim=(4, 4), hidden=(6,), n_train=12, n_val=20))
    return TaskSampler(fam, "train", seed=3, batch_size=6).task(index)


def perturbed_meta(cfg: LayerwiseConfig, horizon: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (v + 0.2 * torch.randn(v.shape, generator=g, dtype=F64)).requires_grad_()
            for k, v in init_meta(cfg, horizon, dtype=F64).items()}


def learned_loss(kind: str = "regression"):
    """An ML3 loss whose zero output layer is perturbed, so it differs from the task loss."""
    net = make_loss(kind, LossConfig(hidden=4)).to(F64)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=F64))
    return net


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def assert_engines_agree(task, meta, cfg, steps, objective, loss_net):
    wrt = list(meta.values()) + ([] if loss_net is None else list(loss_net.parameters()))
    a = unroll(task, meta, cfg, steps, objective=objective, train_loss=loss_net)
    b = unroll_func(task, meta, cfg, steps, objective=objective, train_loss=loss_net)
    assert isinstance(b, FuncUnrollResult) and b.state.step == steps
    assert abs(b.meta_loss.item() - a.meta_loss.item()) <= 1e-12 * abs(a.meta_loss.item())
    assert b.val_losses == pytest.approx(a.val_losses, rel=1e-12, abs=0)
    assert len(b.val_losses) == steps + 1
    # the loss network's output bias shifts the learned loss, not its gradient: unused
    ga = torch.autograd.grad(a.meta_loss, wrt, allow_unused=True, materialize_grads=True)
    gb = torch.autograd.grad(b.meta_loss, wrt, allow_unused=True, materialize_grads=True)
    assert all(x.norm() > 0 for x in ga[:2])
    for x, y in zip(gb, ga):
        assert rel(x, y) <= 1e-10 if y.norm() > 0 else x.norm() == 0
    if loss_net is not None:
        assert sum(float(x.norm()) for x in ga[2:]) > 0


@pytest.mark.parametrize("learned", [False, True], ids=["task_loss", "ml3"])
@pytest.mark.parametrize("objective", ["log_mean", "final"])
@pytest.mark.parametrize("per_step", [True, False], ids=["per_step", "constant"])
@pytest.mark.parametrize("momentum, nesterov", [(0.0, False), (0.9, False), (0.5, True)],
                         ids=["sgd", "heavy_ball", "nesterov"])
def test_func_engine_matches_higher(momentum, nesterov, per_step, objective, learned):
    """Same meta-loss (1e-12), val trace and meta-gradients w.r.t. the meta tensors and the
    loss network (1e-10 relative); horizon 3 < K = 5 also checks the held last entry."""
    cfg = LayerwiseConfig(init_lr=0.05, momentum=momentum, nesterov=nesterov, per_step=per_step,
                          depth_bins=2)
    assert_engines_agree(small_task(), perturbed_meta(cfg, 3), cfg, 5, objective,
                         learned_loss() if learned else None)


@pytest.mark.parametrize("learned", [False, True], ids=["task_loss", "ml3"])
def test_classification_task_matches_higher(learned):
    cfg = LayerwiseConfig(init_lr=0.1, momentum=0.9, per_step=True, depth_bins=2)
    assert_engines_agree(mixture_task(), perturbed_meta(cfg, 4), cfg, 4, "log_mean",
                         learned_loss("classification") if learned else None)


@pytest.mark.parametrize("momentum, nesterov", [(0.0, False), (0.9, False), (0.5, True)])
def test_gradcheck_float64(momentum, nesterov):
    cfg = LayerwiseConfig(init_lr=0.05, momentum=momentum, nesterov=nesterov, depth_bins=2)
    inputs = tuple(perturbed_meta(cfg, 4).values())
    task = small_task()

    def f(log_step_size, log_scale):
        return unroll_func(task, {"log_step_size": log_step_size, "log_scale": log_scale}, cfg, 4).meta_loss

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_windows_with_carried_state_equal_one_unroll():
    """Two K/2 windows, state carried with its graph (global step index and t / K for the
    learned loss) = one K-step unroll: params, val trace, meta-loss and meta-gradient."""
    cfg = LayerwiseConfig(init_lr=0.05, momentum=0.9, per_step=True, depth_bins=2)
    meta, task, loss_net, K = perturbed_meta(cfg, 6), small_task(), learned_loss(), 6
    full = unroll_func(task, meta, cfg, K, objective="log_mean", train_loss=loss_net)
    model, s0 = init_state(task, dtype=F64)
    w1 = unroll_func(task, meta, cfg, K // 2, state=s0, model=model, total_steps=K,
                     objective="mean", train_loss=loss_net)
    w2 = unroll_func(task, meta, cfg, K // 2, state=w1.state, model=model, total_steps=K,
                     objective="mean", train_loss=loss_net)
    assert w2.state.step == K
    for p, q in zip(w2.state.params, full.state.params):
        assert torch.allclose(p, q, rtol=1e-12, atol=1e-14)
    for p, q in zip(w2.state.buffers(), full.state.buffers()):
        assert torch.allclose(p, q, rtol=1e-12, atol=1e-14)
    assert w1.val_losses[-1] == w2.val_losses[0]
    assert w1.val_losses + w2.val_losses[1:] == pytest.approx(full.val_losses, rel=1e-12, abs=0)
    joined = w1.val_losses[1:] + w2.val_losses[1:]
    assert full.meta_loss.item() == pytest.approx(math.log(sum(joined) / K), rel=1e-12, abs=0)
    # the mean objective splits into the windows' means: the gradients compose exactly
    ref = unroll_func(task, meta, cfg, K, objective="mean", train_loss=loss_net).meta_loss
    for x, y in zip(torch.autograd.grad((w1.meta_loss + w2.meta_loss) / 2, list(meta.values())),
                    torch.autograd.grad(ref, list(meta.values()))):
        assert rel(x, y) <= 1e-10


@pytest.mark.parametrize("nesterov", [False, True])
def test_constant_schedule_windows_with_new_meta_equal_a_per_step_schedule(nesterov):
    """Constant schedules fold s into the step size (module doc): windows with meta A, then
    meta B (state carried) equal one unfolded per-step unroll with schedule [A]*3 + [B]*3, in
    values, momentum buffers and meta-gradients (summed over each window's steps)."""
    const = LayerwiseConfig(init_lr=0.05, momentum=0.9, nesterov=nesterov, per_step=False, depth_bins=2)
    sched = LayerwiseConfig(init_lr=0.05, momentum=0.9, nesterov=nesterov, per_step=True, depth_bins=2)
    a, b, task, K = perturbed_meta(const, 1, seed=1), perturbed_meta(const, 1, seed=2), small_task(), 6
    per = {k: torch.cat([a[k].detach()] * 3 + [b[k].detach()] * 3, dim=-1).requires_grad_() for k in a}
    ref = unroll_func(task, per, sched, K, objective="mean")
    w1 = unroll_func(task, a, const, K // 2, objective="mean", total_steps=K)
    w2 = unroll_func(task, b, const, K // 2, objective="mean", total_steps=K, state=w1.state)
    assert w1.val_losses + w2.val_losses[1:] == pytest.approx(ref.val_losses, rel=1e-12, abs=0)
    for p, q in zip(w2.state.params + w2.state.buffers(), ref.state.params + ref.state.buffers()):
        assert torch.allclose(p, q, rtol=1e-12, atol=1e-14)
    keys = list(a)
    g_ref = torch.autograd.grad(ref.meta_loss, [per[k] for k in keys])
    g_win = torch.autograd.grad((w1.meta_loss + w2.meta_loss) / 2, [a[k] for k in keys] + [b[k] for k in keys])
    for i, k in enumerate(keys):
        assert rel(g_win[i], g_ref[i][..., :3].sum(-1, keepdim=True)) <= 1e-10
        assert rel(g_win[2 + i], g_ref[i][..., 3:].sum(-1, keepdim=True)) <= 1e-10


def test_detached_window_truncates_the_meta_gradient():
    cfg = LayerwiseConfig(init_lr=0.05, momentum=0.9, per_step=False, depth_bins=2)
    meta, task, K = perturbed_meta(cfg, 1), small_task(), 6
    wrt = list(meta.values())
    w1 = unroll_func(task, meta, cfg, K // 2, total_steps=K)
    carried = unroll_func(task, meta, cfg, K // 2, state=w1.state, total_steps=K)
    cut = unroll_func(task, meta, cfg, K // 2, state=w1.state.detach(), total_steps=K)
    assert all(not p.requires_grad for p in w1.state.detach().params)
    assert cut.meta_loss.item() == carried.meta_loss.item()  # detaching changes no value
    assert cut.val_losses == carried.val_losses
    g_cut = torch.autograd.grad(cut.meta_loss, wrt)
    g_full = torch.autograd.grad(carried.meta_loss, wrt)
    assert all(torch.isfinite(g).all() and g.norm() > 0 for g in g_cut)
    assert sum(rel(x, y) for x, y in zip(g_cut, g_full)) > 1e-3  # truncation bias


def test_create_graph_false_same_values():
    cfg = LayerwiseConfig(init_lr=0.05, momentum=0.9, per_step=True, depth_bins=2)
    meta, task = perturbed_meta(cfg, 5), small_task()
    a = unroll_func(task, meta, cfg, 5, create_graph=True)
    b = unroll_func(task, meta, cfg, 5, create_graph=False)
    assert b.meta_loss.item() == pytest.approx(a.meta_loss.item(), rel=1e-12, abs=0)
    assert b.val_losses == pytest.approx(a.val_losses, rel=1e-12, abs=0)
    with torch.no_grad():  # evaluation mode: no graph kept, same numbers
        c = unroll_func(task, meta, cfg, 5, create_graph=False)
    assert not c.meta_loss.requires_grad
    assert c.val_losses == pytest.approx(a.val_losses, rel=1e-12, abs=0)


def test_init_state_is_the_seeded_model():
    task = small_task()
    model, state = init_state(task, dtype=F64)
    ref = task.make_model(dtype=F64)
    assert isinstance(state, InnerState) and state.step == 0 and state.groups is None
    for p, q in zip(state.params, ref.parameters()):
        assert torch.equal(p, q) and not p.requires_grad
    assert meta_objective([torch.tensor(2.0)], "log_final").item() == pytest.approx(math.log(2.0))
