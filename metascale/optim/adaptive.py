r"""The adaptive layer-wise learned optimizer: every step, a tiny network shared by all layers
turns O(1) statistics of each layer into that layer's step size and rescaling factor.

Per parameter group ``g`` (role x layer, :mod:`metascale.optim.groups`) of ``n_g`` numbers,
at step ``t`` of a run of ``T`` steps, with gradient ``G`` and parameters ``P``:

.. math::

    m_t = \tfrac{1}{n_g}\lVert G\rVert^2, \quad q_t = \tfrac{1}{n_g}\lVert P\rVert^2, \quad
    v_t = \beta v_{t-1} + (1-\beta) m_t, \quad \hat v_t = v_t / (1-\beta^{t+1}),

and the feature vector (``\ell(x) = \tfrac12\log(x + \epsilon^2)``, a log RMS):

.. math::

    x = \big(c\,\ell(m_t),\ c\,\ell(q_t),\ \ell(m_t) - \ell(\hat v_t),\ \ell(\hat v_t) - \ell(m_0),\
             \min(t/T, 1),\ \rho_g,\ d_g\big)

(log gradient RMS; log parameter RMS; gradient RMS against its running average; running
average against the first step's; fraction of training done; role ``+1`` matrix / ``-1``
vector; relative depth). ``c = 0.1`` brings the two absolute log scales (``-18`` for a
zero-initialised bias) to the order of the other features, so that one meta-step moves every
weight's contribution by a similar amount. The network, shared across groups and layers,

.. math::

    r = W_\ell x + W_2 \tanh(W_1 x + b_1) + b_2 + S[\rho_g, d_g, \min(t, n-1)] \in \mathbb{R}^2, \qquad
    \eta_{g,t} = \eta_0\, e^{B\tanh(r_0/B)}, \quad s_{g,t} = e^{B\tanh(r_1/B)},

gives the step size and rescaling factor, which drive the layer-wise update
(:func:`~metascale.optim.layerwise.layerwise_update`): ``p -= eta * s * g`` without momentum,
``b = mu b + s g; p -= eta b`` with it. The linear path ``W_l`` can express per-layer
normalised steps (``eta ~ RMS(P) / RMS(G)``, as LARS: ``W_l[0, :2] = (-1/c, 1/c)``) exactly; the ``tanh`` layer adds
schedules and interactions. ``S`` is a table of (log step size, log scale) offsets per role,
``depth_bins`` depth anchors (interpolated linearly in depth) and each of the first
``n = table_steps`` steps, the last one held after them: the static layer-wise rule's per-step
schedules. The static rule learns sharp schedules (e.g. a 100x warm-up and decay within 5 of 20
steps) that the network's smooth terms cannot express; with the table the adaptive rule can
represent the static one exactly, and learns its corrections from the training state on top.
The table is indexed by the step, not by ``t/T``: stretched to a 4x horizon, a few steps of
warm-up at a huge step size become many, and training diverges (measured: digits validation
loss 0.48 after 80 steps against 0.19 after 20). ``W_l``, ``W_2``,
``b_2`` and ``S`` start at zero, so the untrained rule *is* ``torch.optim.SGD(lr=eta_0,
momentum=mu)``; ``B`` bounds ``|log(eta/eta_0)|`` and ``|log s|``.

Two variants: ``momentum = 0`` keeps **no per-parameter state** (three floats per group:
``v``, ``m_0`` and the step); ``momentum > 0`` keeps one buffer per parameter (half of Adam's
state). Statistics cost two reductions per step (``||G||``, ``||P||``: ``torch._foreach_norm``
on the frozen path), the network one batched forward over all groups.

Front ends, as for the static rule: the frozen :class:`AdaptiveOptimizer` and its ``higher``
twin :class:`DifferentiableAdaptive`; the pure functions :func:`adaptive_factors` and
:func:`~metascale.optim.layerwise.layerwise_update` do the math for both (and for the
``torch.func`` engine).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Sequence

import higher
import torch

from ..config import check
from .groups import GroupInfo, group_parameters
from .layerwise import layerwise_update, live_groups, run_closure

NUM_FEATURES = 7
FEATURES = ("log_grad_rms", "log_param_rms", "grad_rms_vs_average", "average_vs_first",
            "fraction_done", "role", "depth")
NET_NAMES = ("w1", "b1", "w2", "b2", "wl")  # always present; "table" too when table_steps > 0
TABLE = "table"
EPS = 1e-8
LOG_SCALE = 0.1  # c: the factor on the absolute log-RMS features


@dataclasses.dataclass(frozen=True)
class AdaptiveConfig:
    """Configuration of the adaptive rule (the ``[adaptive]`` table of a spec).

    Attributes:
        init_lr: ``eta_0``, the step size of the untrained rule.
        momentum: ``mu``; 0 is the state-free variant (``--rule adaptive``), > 0 the one-buffer
            variant (``--rule adaptive-momentum``).
        nesterov: Nesterov momentum (needs ``momentum > 0``).
        hidden: width of the shared network's ``tanh`` layer.
        beta: decay of the per-layer running average of the mean square gradient.
        bound: ``B``, the largest ``|log(eta/eta_0)|`` and ``|log s|`` the network can produce.
        table_steps: leading steps with their own offsets in the table ``S`` (the last one is
            held after them); set it to the meta-training horizon ``K`` (0: no table).
        depth_bins: depth anchors of the offset table (input ... output).
    """

    init_lr: float = dataclasses.field(default=0.01, metadata=check("float", 1e-8, 100.0))
    momentum: float = dataclasses.field(default=0.9, metadata=check("float", 0.0, 0.999))
    nesterov: bool = dataclasses.field(default=False, metadata=check("bool"))
    hidden: int = dataclasses.field(default=16, metadata=check("int", 1, 1024))
    beta: float = dataclasses.field(default=0.9, metadata=check("float", 0.0, 0.9999))
    bound: float = dataclasses.field(default=10.0, metadata=check("float", 0.1, 50.0))
    table_steps: int = dataclasses.field(default=20, metadata=check("int", 0, 100_000))
    depth_bins: int = dataclasses.field(default=3, metadata=check("int", 1, 64))

    def validate(self) -> None:
        """Raise ``ValueError`` for inconsistent settings."""
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov = true needs momentum > 0")

    @property
    def variant(self) -> str:
        """``"adaptive"`` (no per-parameter state) or ``"adaptive-momentum"``."""
        return "adaptive-momentum" if self.momentum > 0 else "adaptive"


def net_shapes(config: AdaptiveConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the meta-parameters (the shared network's weights)."""
    h, f = config.hidden, NUM_FEATURES
    shapes = {"w1": (h, f), "b1": (h,), "w2": (2, h), "b2": (2,), "wl": (2, f)}
    if config.table_steps > 0:  # (output, role, depth anchor, step)
        shapes[TABLE] = (2, 2, config.depth_bins, config.table_steps)
    return shapes


def init_net(config: AdaptiveConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
             device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Meta-parameters of the untrained rule: ``W_1 ~ N(0, 0.1^2 / F)`` from a generator seeded
    with ``seed``; ``b_1``, ``W_2``, ``b_2``, ``W_l`` and the table ``S`` zero (so ``eta = eta_0``,
    ``s = 1``)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = net_shapes(config)
    net = {k: torch.zeros(s, dtype=torch.float64) for k, s in shapes.items()}
    net["w1"] = torch.randn(shapes["w1"], generator=gen, dtype=torch.float64) * (0.1 / math.sqrt(NUM_FEATURES))
    return {k: v.to(dtype=dtype, device=device) for k, v in net.items()}


# --------------------------------------------------------------------------- the pure math
def _log_rms(ms: torch.Tensor) -> torch.Tensor:
    """``0.5 * log(ms + eps^2)``: log root mean square, smooth at 0."""
    return 0.5 * torch.log(ms + EPS * EPS)


def adaptive_features(g_ms: torch.Tensor, p_ms: torch.Tensor, v_hat: torch.Tensor, g0_ms: torch.Tensor,
                      fraction: float, roles: torch.Tensor, depths: torch.Tensor) -> torch.Tensor:
    """The ``(G, 7)`` feature matrix of the module doc, one row per group (differentiable)."""
    lg, lv = _log_rms(g_ms), _log_rms(v_hat)
    frac = torch.full_like(lg, min(max(fraction, 0.0), 1.0))
    return torch.stack([LOG_SCALE * lg, LOG_SCALE * _log_rms(p_ms), lg - lv, lv - _log_rms(g0_ms), frac, roles,
                        depths], dim=-1)


def hat_weights(x: torch.Tensor, n: int) -> torch.Tensor:
    r"""``(G, n)`` linear-interpolation weights of points ``x`` in ``[0, 1]`` over ``n`` evenly
    spaced knots: :math:`w_k(x) = \max(0, 1 - |x(n-1) - k|)` (rows sum to 1; ``n = 1``: ones).
    The same weights as :func:`~metascale.optim.groups.anchor_weights`."""
    if n == 1:
        return torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
    pos = x.clamp(0.0, 1.0) * (n - 1)
    return (1.0 - (pos[:, None] - torch.arange(n, dtype=x.dtype, device=x.device)).abs()).clamp_min(0.0)


def table_offsets(table: torch.Tensor, features: torch.Tensor, step: int) -> torch.Tensor:
    r"""``(G, 2)`` offsets :math:`S[\rho_g, d_g, \min(t, n-1)]` of the ``(2, 2, bins, n)`` table
    at each row's role (feature 5; ``+1`` is index 0, matrix) and relative depth (feature 6,
    interpolated linearly between the depth anchors), at step ``t = step``."""
    role = (features[:, 5] < 0).long()
    column = table[:, :, :, min(step, table.shape[3] - 1)]  # (2, roles, bins)
    return torch.einsum("ogb,gb->go", column[:, role], hat_weights(features[:, 6], table.shape[2]))


def adaptive_factors(net: dict[str, torch.Tensor], features: torch.Tensor,
                     config: AdaptiveConfig, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Step sizes and rescaling factors ``(eta, s)``, each of shape ``(G,)``, at step ``t = step``
    from the feature matrix: :math:`r = W_\ell x + W_2\tanh(W_1x+b_1) + b_2 + S[\rho, d, \min(t, n-1)]`,
    :math:`\eta = \eta_0 e^{B\tanh(r_0/B)}`, :math:`s = e^{B\tanh(r_1/B)}`."""
    x = features.to(net["w1"].dtype)
    r = x @ net["wl"].T + torch.tanh(x @ net["w1"].T + net["b1"]) @ net["w2"].T + net["b2"]
    if TABLE in net:
        r = r + table_offsets(net[TABLE], x, step)
    b = config.bound
    log_change = b * torch.tanh(r / b)
    return config.init_lr * torch.exp(log_change[:, 0]), torch.exp(log_change[:, 1])


def update_average(v: torch.Tensor | None, g_ms: torch.Tensor, beta: float, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(v_t, v_hat_t)``: :math:`v_t = \beta v_{t-1} + (1-\beta) m_t` (``v_{-1} = 0``) and its
    bias-corrected value :math:`v_t / (1 - \beta^{t+1})` at step ``step = t``."""
    v = (1 - beta) * g_ms if v is None else beta * v + (1 - beta) * g_ms
    return v, v / (1 - beta ** (step + 1))


def group_geometry(infos: Sequence[GroupInfo], dtype=torch.float64, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Role (``+1`` matrix, ``-1`` vector) and relative depth of each group, as tensors."""
    roles = torch.tensor([1.0 if i.role == "matrix" else -1.0 for i in infos], dtype=dtype, device=device)
    depths = torch.tensor([i.depth for i in infos], dtype=dtype, device=device)
    return roles, depths


def mean_squares(groups: Sequence[Sequence[torch.Tensor | None]]) -> torch.Tensor:
    """Differentiable ``(1/n_g) * sum of squares`` of each group's tensors (``None`` skipped)."""
    out = []
    for ts in groups:
        live = [t for t in ts if t is not None]
        n = sum(t.numel() for t in live)
        out.append(sum((t * t).sum() for t in live) / n)
    return torch.stack(out)


@dataclasses.dataclass
class AdaptiveStats:
    """The per-group scalars the rule carries: ``v`` (running mean square gradient), ``g0``
    (the first step's mean square gradient), both ``(G,)`` tensors (``None`` before step 0)."""

    v: torch.Tensor | None = None
    g0: torch.Tensor | None = None

    def detach(self) -> "AdaptiveStats":
        """A copy cut from the graph."""
        return AdaptiveStats(None if self.v is None else self.v.detach(),
                             None if self.g0 is None else self.g0.detach())


def adaptive_step(net: dict[str, torch.Tensor], config: AdaptiveConfig, infos: Sequence[GroupInfo],
                  params: list[list[torch.Tensor]], grads: list[list[torch.Tensor | None]],
                  bufs: list[list[torch.Tensor | None]], stats: AdaptiveStats, step: int, total_steps: int,
                  ) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor | None]], AdaptiveStats,
                             torch.Tensor, torch.Tensor]:
    """One differentiable (out-of-place) step of the adaptive rule on all groups.

    Returns ``(new_params, new_bufs, new_stats, eta, s)`` with ``eta``, ``s`` the ``(G,)``
    step sizes and rescaling factors used. This is the function the ``higher`` twin and the
    ``torch.func`` engine run; the frozen optimizer computes the same numbers in place."""
    dtype, device = net["w1"].dtype, net["w1"].device
    g_ms = mean_squares(grads).to(dtype)
    p_ms = mean_squares(params).to(dtype)
    v, v_hat = update_average(stats.v, g_ms, config.beta, step)
    g0 = g_ms if stats.g0 is None else stats.g0
    roles, depths = group_geometry(infos, dtype, device)
    eta, s = adaptive_factors(net, adaptive_features(g_ms, p_ms, v_hat, g0, step / total_steps, roles, depths), config,
                              step)
    new_p, new_b = [], []
    for k, (ps, gs, bs) in enumerate(zip(params, grads, bufs)):
        p2, b2 = layerwise_update(list(ps), list(gs), list(bs), step_size=eta[k], scale=s[k],
                                  momentum=config.momentum, nesterov=config.nesterov, inplace=False)
        new_p.append(p2)
        new_b.append(b2)
    return new_p, new_b, AdaptiveStats(v, g0), eta, s


# --------------------------------------------------------------------------- frozen optimizer
class AdaptiveOptimizer(torch.optim.Optimizer):
    r"""The frozen adaptive layer-wise optimizer: a drop-in ``torch.optim.Optimizer``.

    Build it from the meta-trained network (usually via :func:`metascale.load_optimizer`)::

        opt = AdaptiveOptimizer(model.parameters(), net, config, total_steps=1000)

    ``total_steps`` is the training budget ``T`` (the ``fraction_done`` feature is
    ``min(t / T, 1)``); ``lr`` multiplies every step size (for ``torch.optim.lr_scheduler``).

    State: per group, three scalars in the state of the group's first parameter (``step``,
    ``avg_sq_grad`` = ``v``, ``first_sq_grad`` = ``m_0``); with ``momentum > 0`` also a
    ``momentum_buffer`` per parameter. After each step every group holds the step size and
    rescaling factor it used in ``group["last_step_size"]`` and ``group["last_scale"]``.
    """

    def __init__(self, params: Iterable[torch.Tensor], net: dict[str, torch.Tensor], config: AdaptiveConfig, *,
                 total_steps: int, lr: float = 1.0, foreach: bool | None = None):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        groups = [{"params": ps, "role": info.role, "layer": info.layer, "num_layers": info.num_layers}
                  for info, ps in group_parameters(params)]
        defaults = {"lr": lr, "momentum": config.momentum, "nesterov": config.nesterov, "foreach": foreach,
                    "total_steps": total_steps}
        super().__init__(groups, defaults)
        self.config = config
        self.net = {k: v.detach().clone() for k, v in net.items()}
        self._geometry: tuple | None = None

    def _net_on(self, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        w = self.net["w1"]
        if w.device != device or w.dtype != dtype:
            self.net = {k: v.to(device=device, dtype=dtype) for k, v in self.net.items()}
            self._geometry = None
        return self.net

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimisation step (``closure`` re-evaluates the loss, as in torch.optim)."""
        loss = run_closure(closure)
        live = live_groups(self)
        if not live:
            return loss
        flat_p = [p for _, ps in live for p in ps]
        device = flat_p[0].device
        dtype = torch.float64 if flat_p[0].dtype == torch.float64 else torch.float32
        net = self._net_on(device, dtype)
        # two reductions over all tensors: ||G||, ||P|| (one fused kernel each), summed per group
        sizes = [len(ps) for _, ps in live]
        owner = torch.repeat_interleave(torch.arange(len(live), device=device), torch.tensor(sizes, device=device))
        numel = torch.zeros(len(live), dtype=dtype, device=device).index_add_(
            0, owner, torch.tensor([float(p.numel()) for p in flat_p], dtype=dtype, device=device))
        g_sq = torch.stack(torch._foreach_norm([p.grad for p in flat_p])).to(dtype) ** 2
        p_sq = torch.stack(torch._foreach_norm(flat_p)).to(dtype) ** 2
        g_ms = torch.zeros_like(numel).index_add_(0, owner, g_sq) / numel
        p_ms = torch.zeros_like(numel).index_add_(0, owner, p_sq) / numel
        firsts = [self.state[ps[0]] for _, ps in live]
        t = firsts[0].get("step", 0)
        v_old = torch.tensor([st.get("avg_sq_grad", 0.0) for st in firsts], dtype=dtype, device=device)
        v, v_hat = update_average(None if t == 0 else v_old, g_ms, self.config.beta, t)
        g0 = g_ms if t == 0 else torch.tensor([st["first_sq_grad"] for st in firsts], dtype=dtype, device=device)
        roles, depths = group_geometry([GroupInfo(g["role"], g["layer"], g["num_layers"]) for g, _ in live],
                                       dtype, device)
        total = live[0][0]["total_steps"]
        eta, s = adaptive_factors(net, adaptive_features(g_ms, p_ms, v_hat, g0, t / total, roles, depths), self.config,
                                  t)
        eta, s, v, g0 = eta.tolist(), s.tolist(), v.tolist(), g0.tolist()
        for k, (group, ps) in enumerate(live):
            states = [self.state[p] for p in ps]
            foreach = group["foreach"]
            if foreach is None:
                foreach = True  # the foreach/fused kernels, also for one tensor (benchmarks/step_cost.py)
            step_size = group["lr"] * eta[k]
            _, bufs = layerwise_update(ps, [p.grad for p in ps], [st.get("momentum_buffer") for st in states],
                                       step_size=step_size, scale=s[k], momentum=group["momentum"],
                                       nesterov=group["nesterov"], inplace=True, foreach=foreach)
            for st, b in zip(states, bufs):
                if b is not None:
                    st["momentum_buffer"] = b
            first = states[0]
            first["step"], first["avg_sq_grad"], first["first_sq_grad"] = t + 1, v[k], g0[k]
            group["last_step_size"], group["last_scale"] = step_size, s[k]
        return loss


# --------------------------------------------------------------------------- higher twin
class DifferentiableAdaptive(higher.optim.DifferentiableOptimizer):
    """``higher``'s differentiable twin of :class:`AdaptiveOptimizer`.

    Registered with ``higher.register_optim`` when this module is imported. Pass the network as
    an override: ``higher.innerloop_ctx(model, AdaptiveOptimizer(...), override={"net": [net]})``
    (one dict of tensors that may require grad, shared by all groups); each step runs
    :func:`adaptive_step` on all groups at once."""

    def _update(self, grouped_grads, **kwargs) -> None:
        groups = self.param_groups
        net, config = groups[0]["net"], groups[0]["config"]
        live = [k for k, gs in enumerate(grouped_grads) if any(g is not None for g in gs)]
        if not live:
            return
        firsts = [self.state[k][0] for k in live]
        t = firsts[0].get("step", 0)
        dtype, device = net["w1"].dtype, net["w1"].device
        # the (G,) statistics live in one place during the unroll; a frozen optimizer's per-group
        # floats (a run continued from a state_dict) are gathered once
        stats = self.state[live[0]][0].get("stats")
        if stats is None:
            as_t = lambda key: torch.stack([torch.as_tensor(st[key], dtype=dtype, device=device) for st in firsts])
            stats = AdaptiveStats(as_t("avg_sq_grad"), as_t("first_sq_grad")) if t > 0 else AdaptiveStats()
        infos = [GroupInfo(groups[k]["role"], groups[k]["layer"], groups[k]["num_layers"]) for k in live]
        bufs = [[self.state[k][i].get("momentum_buffer") for i in range(len(groups[k]["params"]))] for k in live]
        new_p, new_b, stats, eta, s = adaptive_step(
            net, config, infos, [groups[k]["params"] for k in live], [list(grouped_grads[k]) for k in live],
            bufs, stats, t, groups[0]["total_steps"])
        eta, s = eta.detach(), s.detach()
        for j, k in enumerate(live):
            groups[k]["params"] = new_p[j]
            groups[k]["last_step_size"], groups[k]["last_scale"] = eta[j], s[j]
            for i, b in enumerate(new_b[j]):
                if b is not None:
                    self.state[k][i]["momentum_buffer"] = b
            firsts[j]["step"] = t + 1
        self.state[live[0]][0]["stats"] = stats


higher.register_optim(AdaptiveOptimizer, DifferentiableAdaptive)


def differentiable_override(net: dict[str, torch.Tensor], config: AdaptiveConfig) -> dict:
    """The ``override`` dict for ``higher.innerloop_ctx`` with an :class:`AdaptiveOptimizer`:
    the (differentiable) network and the config, shared by all groups."""
    return {"net": [net], "config": [config]}
