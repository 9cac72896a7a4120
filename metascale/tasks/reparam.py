"""Task augmentation by rescaled weight parameterisations (learned_optimization's
``ReparamWeightsFamily``), optional per spec: ``reparam = [lo, hi]`` in a family table.

Each parameter tensor ``p_i`` of the model is stored as ``w_i`` with

    p_i = c_i * w_i,    log10 c_i ~ U[lo, hi]  (one scale per tensor, drawn per task),

and ``w_i`` starts at ``p_i / c_i`` (so the function at init is the family's usual one). The
optimizer sees ``dL/dw_i = c_i dL/dp_i``, and a step ``dw`` moves ``p_i`` by ``c_i dw``: for SGD
the effective step size on ``p_i`` is ``c_i^2`` times the nominal one, for Adam-like rules
``c_i`` times. An optimizer meta-trained on such tasks cannot rely on one weight (or gradient)
scale. The scales come from the config's ``reparam_seed`` (in parameter order), so the same
draw gives the same scales on every machine. ``[0, 0]`` (the default) leaves the model as it is.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .base import generator


class ReparamWeights(nn.Module):
    """``inner`` with every parameter stored as ``w_i`` and used as ``c_i * w_i``.

    Parameters: ``w`` (a ``ParameterList`` in ``inner``'s parameter order, same shapes), so
    grouping by role and depth sees the same layers. ``inner``'s own parameters are not
    registered here; :func:`torch.func.functional_call` runs it on ``c_i * w_i``. Models with
    buffers (BatchNorm statistics) are not supported.
    """

    def __init__(self, inner: nn.Module, scales: list[float]):
        super().__init__()
        named = list(inner.named_parameters())
        if len(scales) != len(named):
            raise ValueError(f"{len(scales)} scales for {len(named)} parameter tensors")
        if any(True for _ in inner.buffers()):
            raise ValueError("reparam does not support models with buffers")
        self.names = [n for n, _ in named]
        self.scales = [float(c) for c in scales]
        self.w = nn.ParameterList([nn.Parameter(p.detach().clone()) for _, p in named])
        self._inner = (inner,)  # a tuple: not a registered submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = {n: c * w for n, c, w in zip(self.names, self.scales, self.w)}
        return torch.func.functional_call(self._inner[0], params, (x,))


def divide_by_scales_(model: ReparamWeights) -> None:
    """``w_i <- w_i / c_i`` (in place), the :class:`~metascale.tasks.base.Task` init hook."""
    for w, c in zip(model.w, model.scales):
        w.div_(c)


def wrap(build_model: Callable[[], nn.Module], log10_range: tuple, seed: int | None):
    """``(build_model, init_hook)`` for a task: unchanged when ``seed`` is ``None`` (no reparam),
    else a factory of :class:`ReparamWeights` with ``log10 c_i ~ U[lo, hi]`` drawn from
    ``generator(seed)`` in parameter order, and :func:`divide_by_scales_`."""
    if seed is None:
        return build_model, None
    lo, hi = float(log10_range[0]), float(log10_range[1])

    def build() -> nn.Module:
        inner = build_model()
        g = generator(seed)
        n = sum(1 for _ in inner.parameters())
        scales = (10 ** (lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64))).tolist()
        return ReparamWeights(inner, scales)
    return build, divide_by_scales_


def sample_seed(log10_range: tuple, g: torch.Generator) -> dict:
    """``{"reparam_seed": s}`` drawn from ``g`` when the range is not ``[0, 0]``, else ``{}``."""
    if float(log10_range[0]) == 0.0 and float(log10_range[1]) == 0.0:
        return {}
    return {"reparam_seed": int(torch.randint(0, 2**31 - 1, (), generator=g).item())}
