"""Per-layer backward scaling: identity forward, ``c * grad`` backward.

A rescaling factor ``c`` placed on a tensor ``x`` (or on a layer's parameters) inside backprop::

    forward:   y = x                        (bitwise; ``y`` is a view of ``x``, no copy)
    backward:  dL/dx = c * dL/dy

For plain SGD this is a step size: with ``g_t = grad L(p_t)``,

    p_{t+1} = p_t - lr * (c * g_t) = p_t - (lr * c) * g_t

so scaling layer ``l``'s gradient by ``c_l`` is SGD with per-layer learning rate ``lr * c_l``.
Heavy-ball momentum (``b_t = mu b_{t-1} + c g_t = c b'_t``) and Nesterov are linear in ``g``, so
it still holds for a constant ``c``; weight decay added *by the optimizer* (``g + wd p``) is not
scaled, so it holds for weight decay only when the decay is written inside the loss.
See ``docs/concepts.md`` section 1-2.

Three entry points:

* :func:`grad_scale` -- the op on one tensor, differentiable in ``c`` (for meta-gradients);
* :func:`scale_backward` / :func:`scale_backward_groups` -- tensor hooks on leaf parameters, so
  ``p.grad`` accumulates ``c * grad`` (an ordinary training loop with one optimizer lr);
* :func:`scaled_parameters` -- the functional form for differentiable inner loops (``higher``,
  ``torch.func.functional_call``).
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence, Union

import torch
from torch import Tensor, nn

__all__ = ["grad_scale", "scale_backward", "scale_backward_groups", "scaled_parameters",
           "BackwardScaleHandle"]

Factor = Union[float, Tensor]
FactorLike = Union[float, Tensor, Callable[[], Union[float, Tensor]]]


def _check_factor(c: object, what: str = "factor") -> Factor:
    """Validate a concrete factor: a real number or a one-element tensor (returned 0-dim)."""
    if isinstance(c, Tensor):
        if c.numel() != 1:
            raise ValueError(f"{what} must be a scalar (one-element) tensor, got shape {tuple(c.shape)}")
        if c.is_complex() or c.dtype == torch.bool:
            raise TypeError(f"{what} must be a real tensor, got dtype {c.dtype}")
        return c.reshape(()) if c.dim() else c
    if isinstance(c, bool) or not isinstance(c, (int, float)):
        raise TypeError(f"{what} must be a float, a one-element tensor or a callable returning one, "
                        f"got {type(c).__name__}")
    return float(c)


class _Once:
    """Mutable flag shared by every node of one ``grad_scale`` call (a plain object, not a pytree
    container, so that ``torch.func`` transforms pass the same instance to each level's node)."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = False


class _GradScale(torch.autograd.Function):
    """``y = x`` (a view, bitwise equal); ``dL/dx = c * dL/dy``; ``dy/dc = 0``.

    The backward is written with differentiable ops, so under ``create_graph=True`` the produced
    gradient ``c * g`` carries a graph to ``c`` (and to ``g``): d(c * g)/dc = g.

    Higher order: the declared Jacobian ``c`` is a fiction (``y = x``), so it must be used once,
    for the gradient that becomes the update, and never again. The gradient ``g = dL/dy`` depends
    on ``x`` through ``y``; differentiating ``c * g`` back into ``x`` passes through this node a
    second time, where the true Jacobian of ``y = x`` is the identity. Using ``c`` there too would
    give ``c_l H_lm c_m`` instead of ``c_l H_lm`` in every Hessian-vector term of a meta-gradient
    (80% off after 4 inner steps in the test). Rule: the first pass through a node that runs with
    ``create_graph=True`` returns ``c * g``; every later pass through the same node returns ``g``.
    Passes without ``create_graph`` (ordinary training, ``retain_graph`` re-use) always return
    ``c * g``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, c: Factor, once: _Once) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, c, ctx.once = inputs  # `done` is shared by the per-level nodes of torch.func transforms
        ctx.c_is_tensor = isinstance(c, Tensor)
        if ctx.c_is_tensor:
            ctx.save_for_backward(c)
        else:
            ctx.c = c

    @staticmethod
    def backward(ctx, g: Tensor):
        if ctx.once.done:  # differentiating values (e.g. a meta-gradient): the true Jacobian
            return g, None, None
        if torch.is_grad_enabled():  # a create_graph=True pass: this gradient becomes a graph
            ctx.once.done = True
        c = ctx.saved_tensors[0] if ctx.c_is_tensor else ctx.c
        gx = g * c
        if gx.dtype != g.dtype:  # e.g. a 0-dim float32 g with a float64 c
            gx = gx.to(g.dtype)
        return gx, None, None  # forward does not depend on c: first-order dy/dc = 0

    @staticmethod
    def jvp(ctx, x_t: Tensor, c_t, once_t) -> Tensor:
        return x_t.view_as(x_t)  # forward mode differentiates values: dy = dx (and dy/dc = 0)


def grad_scale(x: Tensor, c: float | Tensor) -> Tensor:
    """Identity in the forward, ``c *`` the gradient in the backward.

    Returns ``y`` with ``y == x`` bitwise (a view of ``x``: same storage, ``-0.0`` and NaN
    payloads preserved) and ``dL/dx = c * dL/dy``. ``c`` is a float or a one-element tensor
    (on ``x``'s device, or a CPU scalar). If ``c`` requires grad, a ``create_graph=True``
    backward produces ``c * g`` with a graph back to ``c``, so a meta-loss computed from that
    gradient (e.g. after differentiable SGD steps ``p - lr * c * g``) has the correct
    ``d(meta-loss)/dc``; the first-order ``dy/dc`` is zero since ``y`` does not depend on ``c``.

    Second and higher derivatives are those of the update ``c * grad L(x)``: once a
    ``create_graph=True`` backward has produced ``c * g`` through this op, later backward passes
    through it (a meta-gradient, a Hessian-vector product) see its true Jacobian, the identity,
    so d(c * grad L)/dx = c * H. Call ``grad_scale`` afresh for every gradient evaluation (as
    :func:`scaled_parameters` in an inner loop does), not once for several ``create_graph`` passes.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"grad_scale expects a tensor, got {type(x).__name__}")
    return _GradScale.apply(x, _check_factor(c), _Once())


def _graph_task_id() -> int:
    f = getattr(torch._C, "_current_graph_task_id", None)
    return f() if f is not None else -1


class BackwardScaleHandle:
    """Hooks registered by :func:`scale_backward` / :func:`scale_backward_groups`.

    Group ``i``'s parameters get ``p.grad += c_i * grad`` instead of ``p.grad += grad``.
    ``remove()`` unregisters every hook (idempotent); ``set(c)`` changes the factor(s);
    as a context manager the hooks are removed on exit. Hooks stay registered until
    ``remove()``, even if the handle itself is dropped.

    Every gradient that reaches a hooked parameter is scaled, in every backward pass: a
    Hessian-vector product computed by differentiating ``p.grad`` (after a ``create_graph=True``
    backward) arrives as ``c * (c H v)``. For meta-gradients through an inner loop use
    :func:`scaled_parameters`, whose scale applies to the update gradient only.
    """

    def __init__(self, groups: list[list[Tensor]], factors: list[FactorLike]):
        self._groups = groups
        self._factors: list[FactorLike] = [self._validate(c) for c in factors]
        self._cache: list[tuple[int, Factor] | None] = [None] * len(groups)
        self._hooks = [p.register_hook(self._make_hook(i)) for i, grp in enumerate(groups) for p in grp]

    @staticmethod
    def _validate(c: FactorLike) -> FactorLike:
        return c if callable(c) else _check_factor(c)

    def _factor(self, i: int) -> Factor:
        """Group ``i``'s factor now; a callable is evaluated once per backward pass."""
        f = self._factors[i]
        if not callable(f):
            return f
        task, cached = _graph_task_id(), self._cache[i]
        if task >= 0 and cached is not None and cached[0] == task:
            return cached[1]
        value = _check_factor(f(), "value returned by the factor callable")
        self._cache[i] = (task, value)
        return value

    def _make_hook(self, i: int):
        def hook(grad: Tensor) -> Tensor | None:
            c = self._factor(i)
            if not isinstance(c, Tensor) and c == 1.0:
                return None  # leave the gradient untouched (no copy)
            out = grad * c
            return out if out.dtype == grad.dtype else out.to(grad.dtype)
        return hook

    @property
    def params(self) -> list[list[Tensor]]:
        """The hooked parameters, one list per group."""
        return [list(g) for g in self._groups]

    @property
    def factors(self) -> tuple[FactorLike, ...]:
        """The current factor (or callable) of each group."""
        return tuple(self._factors)

    @property
    def active(self) -> bool:
        """Whether the hooks are registered (False after ``remove()``)."""
        return bool(self._hooks)

    def set(self, c: FactorLike, group: int | None = None) -> "BackwardScaleHandle":
        """Set the factor of every group (``group=None``) or of group ``group``; returns self."""
        c = self._validate(c)
        idx = range(len(self._groups)) if group is None else [range(len(self._groups))[group]]
        for i in idx:
            self._factors[i], self._cache[i] = c, None
        return self

    def remove(self) -> None:
        """Unregister all hooks: gradients become plain again. Safe to call more than once."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def __enter__(self) -> "BackwardScaleHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        sizes = [len(g) for g in self._groups]
        return f"BackwardScaleHandle(groups={sizes}, factors={list(self._factors)}, active={self.active})"


def _collect(target: nn.Module | Tensor | Iterable[Tensor], where: str) -> list[Tensor]:
    """The leaf tensors requiring grad of ``target`` (deduplicated, in order)."""
    if isinstance(target, nn.Module):
        params = [p for p in target.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"{where}: module {type(target).__name__} has no parameters requiring grad")
        return params
    if isinstance(target, Tensor):
        target = [target]
    elif not isinstance(target, Iterable) or isinstance(target, (str, bytes)):
        raise TypeError(f"{where}: expected an nn.Module or an iterable of tensors, got {type(target).__name__}")
    params, seen = [], set()
    for j, p in enumerate(target):
        if not isinstance(p, Tensor):
            raise TypeError(f"{where}: element {j} is a {type(p).__name__}, not a tensor")
        if not p.requires_grad:
            raise ValueError(f"{where}: tensor {j} (shape {tuple(p.shape)}) does not require grad")
        if not p.is_leaf:
            raise ValueError(f"{where}: tensor {j} (shape {tuple(p.shape)}) is not a leaf; hooks scale "
                             "leaf .grad only -- use grad_scale()/scaled_parameters() on non-leaf tensors")
        if id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    if not params:
        raise ValueError(f"{where}: no tensors given")
    return params


def scale_backward_groups(groups: Iterable[tuple[nn.Module | Iterable[Tensor], FactorLike]]) -> BackwardScaleHandle:
    """Scale each group's gradients by its own factor: ``p.grad += c_i * grad`` for ``p`` in group ``i``.

    ``groups`` is an iterable of ``(params_or_module, factor)``; a factor is a float, a
    one-element tensor, or a zero-argument callable evaluated once per backward pass (so the
    factor may change every step). With ``torch.optim.SGD(lr)`` (momentum/Nesterov included,
    weight decay only inside the loss) this equals SGD with per-group ``lr * c_i``. A tensor may
    belong to one group only. Returns one :class:`BackwardScaleHandle` for all groups.
    """
    if isinstance(groups, (nn.Module, Tensor)):
        raise TypeError("scale_backward_groups expects an iterable of (params, factor) pairs; "
                        "use scale_backward(target, c) for a single target")
    tensors, factors, owner = [], [], {}
    for i, item in enumerate(groups):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(f"group {i}: expected a (params_or_module, factor) pair, got {type(item).__name__}")
        target, c = item
        params = _collect(target, f"group {i}")
        for p in params:
            if id(p) in owner:
                raise ValueError(f"group {i}: a tensor of shape {tuple(p.shape)} is already in group {owner[id(p)]}")
            owner[id(p)] = i
        tensors.append(params)
        factors.append(c)
    if not tensors:
        raise ValueError("scale_backward_groups: no groups given")
    return BackwardScaleHandle(tensors, factors)


def scale_backward(target: nn.Module | Iterable[Tensor], c: FactorLike) -> BackwardScaleHandle:
    """Make every parameter of ``target`` accumulate ``c * grad`` into ``p.grad``.

    ``target`` is a module (its parameters requiring grad) or an iterable of leaf tensors
    requiring grad. ``c`` is a float, a one-element tensor, or a zero-argument callable evaluated
    once per backward pass. Registers ``Tensor.register_hook`` on each parameter: the hook maps
    ``g -> c * g`` before accumulation. For SGD (with or without momentum / Nesterov) this is the
    step size ``lr * c`` for those parameters. Use the returned handle's ``remove()``, ``set(c)``,
    or ``with scale_backward(layer, 0.5): ...``.
    """
    return scale_backward_groups([(target, c)])


def scaled_parameters(params: Sequence[Tensor], factors: Sequence[float | Tensor]) -> list[Tensor]:
    """``[grad_scale(p, c) for p, c in zip(params, factors)]``: values unchanged, gradients ``c * g``.

    The functional form for differentiable inner loops: the gradient of a loss computed from the
    returned tensors, taken w.r.t. the *original* ``params``, is ``c_i * g_i`` with a graph to
    ``c_i`` (under ``create_graph=True``). ``factors`` may be a 1-D tensor of per-parameter factors.

    With ``higher``, pass the *unscaled* list to the differentiable optimizer: a patched model
    stores whatever ``params=`` it is called with as its fast weights, so::

        fast = list(fmodel.fast_params)
        loss = F(fmodel(x, params=scaled_parameters(fast, cs)))
        diffopt.step(loss, params=fast)     # NOT diffopt.step(loss): that would differentiate
                                            # w.r.t. the scaled views and drop c
    """
    params, factors = list(params), list(factors)
    if len(params) != len(factors):
        raise ValueError(f"scaled_parameters: {len(params)} params but {len(factors)} factors")
    return [grad_scale(p, c) for p, c in zip(params, factors)]
