"""Per-layer backward scaling (metascale.scaling.backward): identity forward, c * grad backward.

The acceptance criterion is docs/concepts.md section 1 applied per layer: scaling layer l's
gradient by c_l and running torch.optim.SGD(lr) is torch.optim.SGD with per-group lr * c_l.
"""
from __future__ import annotations

import copy
import math

import higher
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metascale.scaling.backward import (BackwardScaleHandle, grad_scale, scale_backward,
                                        scale_backward_groups, scaled_parameters)

F64 = torch.float64
INT_OF = {torch.float16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view(INT_OF[t.dtype])


def mlp(dtype=F64, seed=0, sizes=(6, 24, 24, 1)) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b), nn.Tanh()] if i < len(sizes) - 2 else [nn.Linear(a, b)]
    return nn.Sequential(*layers).to(dtype)


def linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model if isinstance(m, nn.Linear)]


def rel_err(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(((x - y).abs().max() / y.abs().max()).item() for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------- op
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(), (7,), (3, 4, 5)])
@pytest.mark.parametrize("c", [0.37, -2.0, "tensor"])
def test_forward_is_bitwise_identity(dtype, shape, c):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g, dtype=F64).to(dtype)
    if x.numel() >= 4:  # signed zeros, NaN, inf survive bit for bit
        flat = x.view(-1)
        flat[0], flat[1], flat[2], flat[3] = -0.0, float("nan"), float("-inf"), 0.0
    x.requires_grad_()
    c = torch.tensor(0.5, dtype=F64, requires_grad=True) if c == "tensor" else c
    y = grad_scale(x, c)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(bits(y), bits(x))
    assert y.data_ptr() == x.data_ptr()  # a view: no copy


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c", [0.3, 2.0, -1.5, 1.0, 0.0])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_backward_is_exactly_c_times_grad(dtype, c, as_tensor):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 5, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(4, 5, generator=g, dtype=dtype)
    cc = torch.tensor(c, dtype=dtype) if as_tensor else c
    (grad_scale(x, cc) * w).sum().backward()
    assert torch.equal(x.grad, w * cc)  # rtol 0, atol 0


def test_factor_dtype_and_shape_do_not_leak_into_the_gradient():
    x = torch.tensor(1.5, dtype=torch.float32, requires_grad=True)  # 0-dim float32
    c = torch.tensor([0.25], dtype=F64)  # one element, float64
    (3 * grad_scale(x, c)).backward()
    assert x.grad.dtype == torch.float32 and x.grad.shape == () and x.grad.item() == 0.75


def test_first_order_derivative_in_c_is_zero():
    x = torch.randn(3, dtype=F64, requires_grad=True)
    c = torch.tensor(0.7, dtype=F64, requires_grad=True)
    gc = torch.autograd.grad(grad_scale(x, c).square().sum(), c, allow_unused=True)[0]
    assert gc is None or gc.item() == 0.0


def _scaled_grad(x, c):
    """c * grad L(x) for L(y) = sum(sin(y) * y^2), as a differentiable inner loop computes it."""
    y = grad_scale(x, c)
    return torch.autograd.grad((torch.sin(y) * y**2).sum(), x, create_graph=True)[0]


def test_create_graph_gradient_is_c_times_grad_with_correct_derivatives():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, generator=g, dtype=F64, requires_grad=True)
    c = torch.tensor(0.6, dtype=F64, requires_grad=True)
    h = _scaled_grad(x, c)
    gx = 2 * x * torch.sin(x) + x**2 * torch.cos(x)
    torch.testing.assert_close(h, c * gx, rtol=1e-15, atol=0)
    # d/dc (c * g) = g ; d/dx (c * g) = c * H (H diagonal here): the scale is used once, not twice
    dc, = torch.autograd.grad(h.sum(), c, retain_graph=True)
    torch.testing.assert_close(dc, gx.sum(), rtol=1e-14, atol=0)
    dx, = torch.autograd.grad(h.sum(), x)
    hdiag = 2 * torch.sin(x) + 4 * x * torch.cos(x) - x**2 * torch.sin(x)
    torch.testing.assert_close(dx, c * hdiag, rtol=1e-14, atol=1e-15)
    xs, cs = x.detach().requires_grad_(), c.detach().requires_grad_()
    assert torch.autograd.gradcheck(_scaled_grad, (xs, cs))
    assert torch.autograd.gradgradcheck(_scaled_grad, (xs, cs))


def test_torch_func_transforms():
    x = torch.randn(4, dtype=F64)
    f = lambda a: (grad_scale(a, 3.0) ** 2).sum()  # noqa: E731
    torch.testing.assert_close(torch.func.grad(f)(x), 6 * x, rtol=0, atol=0)
    torch.testing.assert_close(torch.func.hessian(f)(x), 6 * torch.eye(4, dtype=F64), rtol=0, atol=0)
    nested = torch.func.grad(lambda a: torch.func.grad(f)(a).sum())(x)  # d/dx sum(3 * 2x) = 6
    torch.testing.assert_close(nested, torch.full_like(x, 6.0), rtol=0, atol=0)
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(f))(torch.ones(2, 3, dtype=F64)),
                               torch.full((2, 3), 6.0, dtype=F64), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cuda():
    x = torch.randn(3, 4, device="cuda", requires_grad=True)
    c = torch.tensor(0.5, device="cuda")
    y = grad_scale(x, c)
    assert torch.equal(bits(y), bits(x))
    y.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 0.5))


def test_grad_scale_errors():
    with pytest.raises(TypeError, match="expects a tensor"):
        grad_scale([1.0], 2.0)
    with pytest.raises(ValueError, match="scalar"):
        grad_scale(torch.ones(3), torch.ones(3))
    with pytest.raises(TypeError, match="float"):
        grad_scale(torch.ones(3), "2")
    with pytest.raises(TypeError, match="float"):
        grad_scale(torch.ones(3), True)


# ------------------------------------------------------------------- acceptance: hooks + SGD
FACTORS = (0.3, 2.0, 0.7)


def _train(model, opt, steps, seed=0, before_step=None):
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for t in range(steps):
        x = torch.randn(32, 6, generator=g, dtype=F64).to(dtype)
        y = torch.sin(x.sum(1, keepdim=True)).to(dtype)
        if before_step is not None:
            before_step(t)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
@pytest.mark.parametrize("foreach", [False, True])
def test_backward_scaling_is_a_per_layer_step_size(dtype, tol, momentum, nesterov, foreach):
    lr, steps = 0.05, 200
    a = mlp(dtype)
    b, plain = copy.deepcopy(a), copy.deepcopy(a)
    kw = dict(momentum=momentum, nesterov=nesterov, foreach=foreach)
    with scale_backward_groups(zip(linears(a), FACTORS)):  # weight and bias share a layer's c
        pa = _train(a, torch.optim.SGD(a.parameters(), lr=lr, **kw), steps)
    groups = [{"params": list(m.parameters()), "lr": lr * c} for m, c in zip(linears(b), FACTORS)]
    pb = _train(b, torch.optim.SGD(groups, lr=lr, **kw), steps)
    p0 = _train(plain, torch.optim.SGD(plain.parameters(), lr=lr, **kw), steps)
    assert rel_err(pa, pb) <= tol
    assert rel_err(p0, pb) > 1e-2  # the factors matter: not a vacuous comparison


def test_factor_changing_every_step_is_a_per_step_learning_rate():
    lr, steps, base = 0.05, 200, FACTORS
    sched = lambda t, l: base[l] * (1.0 + 0.5 * math.sin(0.3 * t + l))  # noqa: E731
    a = mlp()
    b = copy.deepcopy(a)
    step = [0]
    calls = [0, 0, 0]

    def factor(l):
        def f():
            calls[l] += 1
            return sched(step[0], l) if l != 1 else torch.tensor(sched(step[0], l), dtype=F64)
        return f

    h = scale_backward_groups((m, factor(l)) for l, m in enumerate(linears(a)))
    pa = _train(a, torch.optim.SGD(a.parameters(), lr=lr), steps,
                before_step=lambda t: step.__setitem__(0, t))
    h.remove()
    assert calls == [steps] * 3  # evaluated once per backward pass per group (2 tensors per group)
    opt_b = torch.optim.SGD([{"params": list(m.parameters())} for m in linears(b)], lr=lr)

    def set_lrs(t):
        for l, group in enumerate(opt_b.param_groups):
            group["lr"] = lr * sched(t, l)
    pb = _train(b, opt_b, steps, before_step=set_lrs)
    assert rel_err(pa, pb) <= 1e-10


# ------------------------------------------------------------------------------ the handle
def _grads(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 6, generator=g, dtype=F64)
    model.zero_grad(set_to_none=True)
    model(x).square().sum().backward()
    return [p.grad.clone() for p in model.parameters()]


def test_remove_set_and_context_manager():
    model = mlp()
    plain = _grads(model)
    first = linears(model)[0]
    h = scale_backward(first, 0.5)
    assert isinstance(h, BackwardScaleHandle) and h.active
    got = _grads(model)
    assert torch.equal(got[0], 0.5 * plain[0]) and torch.equal(got[1], 0.5 * plain[1])
    assert all(torch.equal(a, b) for a, b in zip(got[2:], plain[2:]))
    h.set(3.0)
    assert torch.equal(_grads(model)[0], 3.0 * plain[0])
    h.remove()
    h.remove()  # idempotent
    assert not h.active
    assert all(torch.equal(a, b) for a, b in zip(_grads(model), plain))
    with scale_backward(model, 0.25) as h2:  # removed on exit
        assert all(torch.equal(a, 0.25 * b) for a, b in zip(_grads(model), plain))
    assert not h2.active
    assert all(torch.equal(a, b) for a, b in zip(_grads(model), plain))
    for _ in range(3):  # removed and re-added: never stacks
        with scale_backward(first, 0.5):
            assert torch.equal(_grads(model)[0], 0.5 * plain[0])


def test_set_one_group_stacking_dedup_and_accumulation():
    model = mlp()
    plain = _grads(model)
    l0, l1, l2 = linears(model)
    with scale_backward_groups([(l0, 2.0), ([l1.weight, l1.bias], 3.0), (l2.parameters(), 1.0)]) as h:
        h.set(5.0, group=-1)
        got = _grads(model)
        assert [torch.equal(a, c * b) for a, b, c in zip(got, plain, (2, 2, 3, 3, 5, 5))] == [True] * 6
    with scale_backward([l0.weight, l0.weight], 2.0):  # a tensor listed twice is hooked once
        assert torch.equal(_grads(model)[0], 2.0 * plain[0])
    with scale_backward(l0, 2.0), scale_backward(l0.weight, 0.25):  # two handles compose
        assert torch.equal(_grads(model)[0], 0.5 * plain[0])
    with scale_backward(l0.weight, 0.5):  # accumulation: p.grad += c * grad, twice
        model.zero_grad(set_to_none=True)
        x = torch.randn(8, 6, dtype=F64)
        model(x).sum().backward()
        model(x).sum().backward()
        once = l0.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()
    torch.testing.assert_close(once, 2 * 0.5 * l0.weight.grad, rtol=1e-15, atol=0)


def test_tensor_factor_and_create_graph_through_hooks():
    model = mlp()
    plain = _grads(model)
    c = torch.tensor(0.4, dtype=F64, requires_grad=True)
    w = linears(model)[0].weight
    with scale_backward(w, c):
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(0), dtype=F64)
        gw, = torch.autograd.grad(model(x).square().sum(), w, create_graph=True)
        assert torch.equal(gw, plain[0] * c)
        dc, = torch.autograd.grad(gw.sum(), c)  # the scaled gradient has a graph to c
        torch.testing.assert_close(dc, plain[0].sum(), rtol=1e-14, atol=0)


def test_hooks_scale_every_gradient_reaching_the_parameter():
    """Documented: a hooked leaf's Hessian-vector product arrives as c * (c H v)."""
    p = torch.randn(4, dtype=F64, requires_grad=True)
    with scale_backward([p], 0.5):
        g, = torch.autograd.grad((p**3).sum(), p, create_graph=True)  # 0.5 * 3 p^2
        hv, = torch.autograd.grad(g.sum(), p)  # d/dp of 1.5 p^2 = 3p, scaled again: 1.5 p
    torch.testing.assert_close(hv, 0.5 * 0.5 * 6 * p.detach(), rtol=1e-15, atol=0)


def test_errors():
    with pytest.raises(ValueError, match="no tensors"):
        scale_backward([], 0.5)
    with pytest.raises(ValueError, match="no parameters requiring grad"):
        scale_backward(nn.ReLU(), 0.5)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters requiring grad"):
        scale_backward(frozen, 0.5)
    with pytest.raises(TypeError, match="element 1 is a float"):
        scale_backward([torch.ones(1, requires_grad=True), 1.0], 0.5)
    with pytest.raises(TypeError, match="iterable of tensors"):
        scale_backward(3, 0.5)
    with pytest.raises(ValueError, match="does not require grad"):
        scale_backward([torch.ones(2)], 0.5)
    leaf = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match="not a leaf.*grad_scale"):
        scale_backward([leaf * 2], 0.5)
    with pytest.raises(TypeError, match="float, a one-element tensor or a callable"):
        scale_backward([leaf], "0.5")
    with pytest.raises(ValueError, match="scalar"):
        scale_backward([leaf], torch.ones(2))
    with pytest.raises(ValueError, match="already in group 0"):
        scale_backward_groups([([leaf], 1.0), ([leaf], 2.0)])
    with pytest.raises(TypeError, match="pair"):
        scale_backward_groups([leaf])
    with pytest.raises(TypeError, match="single target"):
        scale_backward_groups(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no groups"):
        scale_backward_groups([])
    with pytest.raises(ValueError, match="2 params but 1 factors"):
        scaled_parameters([leaf, leaf], [1.0])
    with scale_backward([leaf], lambda: "x") as h:
        with pytest.raises(TypeError, match="value returned by the factor callable"):
            leaf.sum().backward()
        with pytest.raises(TypeError, match="float"):
            h.set(None)
        with pytest.raises(IndexError):
            h.set(1.0, group=1)
    assert leaf.grad is None  # nothing left behind, no hook left registered
    leaf.sum().backward()
    assert torch.equal(leaf.grad, torch.ones(2))


# -------------------------------------------------------------------- functional forms
def test_functional_call_gradients_are_c_times_plain():
    model = mlp()
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    factors = {n: FACTORS[int(n.split(".")[0]) // 2] for n in names}  # 0.*, 2.*, 4.* -> layer
    x = torch.randn(16, 6, dtype=F64)
    plain = torch.autograd.grad(torch.func.functional_call(model, params, (x,)).square().sum(),
                                list(params.values()))
    scaled = dict(zip(names, scaled_parameters(list(params.values()), [factors[n] for n in names])))
    out = torch.func.functional_call(model, scaled, (x,))
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    out.square().sum().backward()
    for n, g in zip(names, plain):
        assert torch.equal(params[n].grad, g * factors[n])


LAYER_OF = [0, 0, 1, 1, 2, 2]  # parameter index -> layer of the MLP


def _inner_data():
    g = torch.Generator().manual_seed(4)
    tr = [(torch.randn(16, 6, generator=g, dtype=F64), torch.randn(16, 1, generator=g, dtype=F64))
          for _ in range(4)]
    return tr, (torch.randn(32, 6, generator=g, dtype=F64), torch.randn(32, 1, generator=g, dtype=F64))


def _higher_run(model, cs, mode, K=4, lr=0.3):
    """Val loss after K differentiable SGD steps whose layer-l gradient is scaled by cs[l]."""
    train, (xv, yv) = _inner_data()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=True) as (fmodel, diffopt):
        for x, y in train[:K]:
            per_param = [cs[l] for l in LAYER_OF]
            if mode == "scaled":
                fast = list(fmodel.fast_params)
                loss = F.mse_loss(fmodel(x, params=scaled_parameters(fast, per_param)), y)
                diffopt.step(loss, params=fast)
            elif mode == "naive":  # the pitfall: the patched model adopts the scaled views
                loss = F.mse_loss(fmodel(x, params=scaled_parameters(fmodel.fast_params, per_param)), y)
                diffopt.step(loss)
            else:  # explicit per-group multiply of the gradients
                loss = F.mse_loss(fmodel(x), y)
                diffopt.step(loss, grad_callback=lambda gs: [c * g for c, g in zip(per_param, gs)])
        final = [p.detach().clone() for p in fmodel.fast_params]
        return F.mse_loss(fmodel(xv), yv), final


def test_higher_meta_gradient_matches_explicit_multiply_and_gradcheck():
    model = mlp(sizes=(6, 8, 8, 1))
    cs = torch.tensor(FACTORS, dtype=F64, requires_grad=True)
    v_s, w_s = _higher_run(model, cs, "scaled")
    v_e, w_e = _higher_run(model, cs, "explicit")
    assert rel_err(w_s, w_e) <= 1e-12
    torch.testing.assert_close(v_s, v_e, rtol=1e-12, atol=0)
    g_s, = torch.autograd.grad(v_s, cs)
    g_e, = torch.autograd.grad(v_e, cs)
    assert ((g_s - g_e).abs().max() / g_e.abs().max()).item() <= 1e-12
    assert g_e.abs().min() > 1e-4  # every factor has a real meta-gradient
    assert torch.autograd.gradcheck(lambda c: _higher_run(model, c, "scaled")[0], (cs,))
    # the pitfall, pinned: without diffopt.step(loss, params=fast) the scale never reaches the update
    _, w_n = _higher_run(model, cs, "naive")
    _, w_1 = _higher_run(model, torch.ones(3, dtype=F64), "explicit")
    assert rel_err(w_n, w_1) <= 1e-12 and rel_err(w_n, w_e) > 1e-3


def test_torch_func_inner_loop_meta_gradient_matches_explicit_multiply():
    model = mlp(sizes=(6, 8, 8, 1))
    names = [n for n, _ in model.named_parameters()]
    train, (xv, yv) = _inner_data()

    def run(cs, scaled, lr=0.3):
        ps = [p.detach() for p in model.parameters()]
        per_param = [cs[l] for l in LAYER_OF]
        for x, y in train:
            if scaled:
                ps = [p if p.requires_grad else p.requires_grad_() for p in ps]
                out = torch.func.functional_call(model, dict(zip(names, scaled_parameters(ps, per_param))), (x,))
                gs = torch.autograd.grad(F.mse_loss(out, y), ps, create_graph=True)
            else:
                ps = [p if p.requires_grad else p.requires_grad_() for p in ps]
                out = torch.func.functional_call(model, dict(zip(names, ps)), (x,))
                gs = [c * g for c, g in zip(per_param, torch.autograd.grad(F.mse_loss(out, y), ps, create_graph=True))]
            ps = [p - lr * g for p, g in zip(ps, gs)]
        return F.mse_loss(torch.func.functional_call(model, dict(zip(names, ps)), (xv,)), yv)

    cs = torch.tensor(FACTORS, dtype=F64, requires_grad=True)
    g_s, = torch.autograd.grad(run(cs, True), cs)
    g_e, = torch.autograd.grad(run(cs, False), cs)
    assert ((g_s - g_e).abs().max() / g_e.abs().max()).item() <= 1e-12
