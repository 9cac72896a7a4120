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

    r = W_\ell x + W_2 \tanh(W_1 x + b_1) + b_2 + S[\rho_g, d_g, \min(t, n-1)] + \sum_k h_k(t/T)\, D_k
    \in \mathbb{R}^2, \qquad
    \eta_{g,t} = \eta_0\, e^{B\tanh(r_0/B)}, \quad s_{g,t} = e^{B\tanh(r_1/B)},

gives the step size and rescaling factor, which drive the layer-wise update
(:func:`~metascale.optim.kernels.heavy_ball_` / ``heavy_ball``): ``p -= eta * s * g`` without momentum,
``b = mu b + s g; p -= eta b`` with it. The linear path ``W_l`` can express per-layer
normalised steps (``eta ~ RMS(P) / RMS(G)``, as LARS: ``W_l[0, :2] = (-1/c, 1/c)``) exactly; the ``tanh`` layer adds
schedules and interactions. ``S`` is a table of (log step size, log scale) offsets per role,
``depth_bins`` depth anchors (interpolated linearly in depth) and each of the first
``n = table_steps`` steps, the last one held after them: the static layer-wise rule's per-step
schedules. The static rule learns sharp schedules (e.g. a 100x warm-up and decay within 5 of 20
steps) that the network's smooth terms cannot express; with the table the adaptive rule can
represent the static one exactly, and learns its corrections from the training state on top.
The table is indexed by the step, not by ``t/T`` (stretched to a longer horizon, a few steps
of warm-up at a huge step size become many; docs/benchmarks.md). ``D`` (``time_knots`` columns; none by default) is a learned schedule in the fraction of
training done: (log step size, log scale) offsets at ``K`` evenly spaced knots of ``t/T`` in
``[0, 1]``, interpolated linearly (``h_k``: the hat functions of :func:`hat_weights`). Unlike
the table it stretches with the horizon, and unlike the network's smooth ``t/T`` terms one
knot moves one stretch of the run, so a decay to a small step at the end of training (what
held-out long runs on small data need, docs/benchmarks.md) is a few numbers that an
evolution-strategies estimate finds quickly. With ``time_horizons`` :math:`T_1 < .. < T_A` there
is one such schedule per anchor horizon, :math:`D_k = \sum_a w_a(T) D_{k,a}`, interpolated
linearly in :math:`\log T` (:func:`horizon_weights`): a t/T schedule does not transfer between
horizons (a run that overfits small data at T = 5,000 wants its decay earlier than one of
1,000 steps), and this lets one file hold a schedule for each. ``W_l``, ``W_2``, ``b_2``, ``S``
and ``D`` start at zero, so the untrained rule *is* ``torch.optim.SGD(lr=eta_0,
momentum=mu)``; ``B`` bounds ``|log(eta/eta_0)|`` and ``|log s|``.

Two variants: ``momentum = 0`` keeps **no per-parameter state** (three floats per group:
``v``, ``m_0`` and the step); ``momentum > 0`` keeps one buffer per parameter (half of Adam's
state). Statistics cost two reductions per step (``||G||``, ``||P||``: ``torch._foreach_norm``
on the frozen path), the network one batched forward over all groups.

Every group carries its own step count, so a group that starts receiving gradients later (a
layer unfrozen mid-run) starts its statistics and its fraction of training at its own step 0.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import torch

from ..config import check
from .groups import GroupInfo
from .layerwise import heavy_ball_group
from .rule import GroupState, GroupUpdate, GroupView, Rule

NUM_FEATURES = 7
FEATURES = ("log_grad_rms", "log_param_rms", "grad_rms_vs_average", "average_vs_first",
            "fraction_done", "role", "depth")
NET_NAMES = ("w1", "b1", "w2", "b2", "wl")  # always present; "table" / "time" too when configured
TABLE = "table"
TIME = "time"
EPS = 1e-8
LOG_SCALE = 0.1  # c: the factor on the absolute log-RMS features
MAX_WEIGHT = 1e30
"""Largest magnitude of a stored weight: features are below ~200 in magnitude, so every sum
of the forward stays below float32's 3.4e38."""


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
            held after them); unset: the meta-training horizon ``K`` (0: no table).
        depth_bins: depth anchors of the offset table (input ... output).
        time_knots: knots ``K`` of the learned schedule ``D`` in ``t/T`` (0: none; at least 2
            otherwise).
        time_horizons: horizons ``T_1 < .. < T_A`` (at least 2) with a schedule ``D`` each,
            interpolated linearly in ``log T`` and held beyond the ends (unset: one schedule
            for every horizon; needs ``time_knots``).
    """

    init_lr: float = dataclasses.field(default=0.01, metadata=check("float", 1e-8, 100.0))
    momentum: float = dataclasses.field(default=0.9, metadata=check("float", 0.0, 0.999))
    nesterov: bool = dataclasses.field(default=False, metadata=check("bool"))
    hidden: int = dataclasses.field(default=16, metadata=check("int", 1, 1024))
    beta: float = dataclasses.field(default=0.9, metadata=check("float", 0.0, 0.9999))
    bound: float = dataclasses.field(default=10.0, metadata=check("float", 0.1, 50.0))
    table_steps: int | None = dataclasses.field(default=None, metadata=check("int", 0, 100_000))
    depth_bins: int = dataclasses.field(default=3, metadata=check("int", 1, 64))
    time_knots: int = dataclasses.field(default=0, metadata=check("int", 0, 1024))
    time_horizons: tuple | None = dataclasses.field(default=None, metadata=check("int_list", 1, 10_000_000))

    def validate(self) -> None:
        """Raise ``ValueError`` for inconsistent settings."""
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov = true needs momentum > 0")
        if self.time_knots == 1:
            raise ValueError("time_knots = 1 is a constant, which b2 already is; use 0 (none) or at least 2")
        if self.time_horizons is not None:
            h = self.time_horizons
            if len(h) < 2 or any(b <= a for a, b in zip(h, h[1:])):
                raise ValueError(f"time_horizons = {list(h)}: expected at least 2 increasing horizons")
            if self.time_knots == 0:
                raise ValueError("time_horizons needs a schedule in t/T: set time_knots >= 2")


def net_shapes(config: AdaptiveConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the meta-parameters (the shared network's weights)."""
    h, f = config.hidden, NUM_FEATURES
    shapes = {"w1": (h, f), "b1": (h,), "w2": (2, h), "b2": (2,), "wl": (2, f)}
    if config.table_steps > 0:  # (output, role, depth anchor, step)
        shapes[TABLE] = (2, 2, config.depth_bins, config.table_steps)
    if config.time_knots > 0:  # (output, knot[, horizon])
        shapes[TIME] = (2, config.time_knots, *(() if config.time_horizons is None else (len(config.time_horizons),)))
    return shapes


def init_net(config: AdaptiveConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
             device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Meta-parameters of the untrained rule: ``W_1 ~ N(0, 0.1^2 / F)`` from a generator seeded
    with ``seed``; ``b_1``, ``W_2``, ``b_2``, ``W_l``, the table ``S`` and the schedule ``D``
    zero (so ``eta = eta_0``, ``s = 1``)."""
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
                      fraction: torch.Tensor | float, roles: torch.Tensor, depths: torch.Tensor) -> torch.Tensor:
    """The ``(G, 7)`` feature matrix of the module doc, one row per group (differentiable);
    ``fraction``: ``t / T`` per group (or one number for all)."""
    lg, lv = _log_rms(g_ms), _log_rms(v_hat)
    frac = torch.as_tensor(fraction, dtype=lg.dtype, device=lg.device).clamp(0.0, 1.0).expand_as(lg)
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


def horizon_weights(horizon: int, anchors: Sequence[int]) -> list[float]:
    r"""Linear-interpolation weights in :math:`\log T` of horizon ``T`` over the increasing
    ``anchors`` :math:`T_1 < .. < T_A` (they sum to 1; held at the end anchors beyond them):
    between :math:`T_i` and :math:`T_{i+1}`,
    :math:`w_{i+1} = \log(T/T_i) / \log(T_{i+1}/T_i) = 1 - w_i`."""
    x = min(max(math.log(horizon), math.log(anchors[0])), math.log(anchors[-1]))
    w = [0.0] * len(anchors)
    for i in range(len(anchors) - 1):
        lo, hi = math.log(anchors[i]), math.log(anchors[i + 1])
        if x <= hi:
            w[i + 1] = (x - lo) / (hi - lo)
            w[i] = 1.0 - w[i + 1]
            return w
    return w  # unreachable: x <= log(anchors[-1])


def table_offsets(table: torch.Tensor, features: torch.Tensor, steps: list[int]) -> torch.Tensor:
    r"""``(G, 2)`` offsets :math:`S[\rho_g, d_g, \min(t_g, n-1)]` of the ``(2, 2, bins, n)`` table
    at each row's role (feature 5; ``+1`` is index 0, matrix), relative depth (feature 6,
    interpolated linearly between the depth anchors) and step ``t_g = steps[g]``."""
    role = (features[:, 5] < 0).long()
    n = table.shape[3]
    w = hat_weights(features[:, 6], table.shape[2])
    if len(set(steps)) == 1:  # all groups at one step: one column
        return torch.einsum("ogb,gb->go", table[:, :, :, min(steps[0], n - 1)][:, role], w)
    col = torch.tensor([min(t, n - 1) for t in steps], device=table.device)
    return torch.einsum("gob,gb->go", table.permute(1, 3, 0, 2)[role, col], w)


def adaptive_factors(net: dict[str, torch.Tensor], features: torch.Tensor,
                     config: AdaptiveConfig, steps: list[int],
                     horizon: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Step sizes and rescaling factors ``(eta, s)``, each of shape ``(G,)``, at steps ``steps``
    (one per row) from the feature matrix:
    :math:`r = W_\ell x + W_2\tanh(W_1x+b_1) + b_2 + S[\rho, d, \min(t, n-1)] + \sum_k h_k(t/T) D_k`
    (``t/T``: feature 4; with ``time_horizons``, :math:`D_k = \sum_a w_a(T) D_{k,a}` by
    :func:`horizon_weights` of the run's ``horizon`` ``T``),
    :math:`\eta = \eta_0 e^{B\tanh(r_0/B)}`, :math:`s = e^{B\tanh(r_1/B)}`."""
    x = features.to(net["w1"].dtype)
    r = x @ net["wl"].T + torch.tanh(x @ net["w1"].T + net["b1"]) @ net["w2"].T + net["b2"]
    if TABLE in net:
        r = r + table_offsets(net[TABLE], x, steps)
    if TIME in net:
        d = net[TIME]
        if d.dim() == 3:  # one schedule per horizon anchor: interpolate in log T
            if horizon is None:
                raise ValueError("a schedule per horizon (time_horizons) needs the run's horizon")
            d = sum(w * d[:, :, a] for a, w in enumerate(horizon_weights(horizon, config.time_horizons)) if w)
        r = r + hat_weights(x[:, 4], d.shape[1]) @ d.T
    b = config.bound
    log_change = b * torch.tanh(r / b)
    return config.init_lr * torch.exp(log_change[:, 0]), torch.exp(log_change[:, 1])


def update_average(v: torch.Tensor | None, g_ms: torch.Tensor, beta: float,
                   steps: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(v_t, v_hat_t)`` per group: :math:`v_t = \beta v_{t-1} + (1-\beta) m_t`
    (:math:`v_{-1} = 0`; ``v`` is ``None`` when every group is at its step 0, and its rows at
    step 0 are ignored) and the bias-corrected :math:`v_t / (1 - \beta^{t+1})`."""
    fresh = (1 - beta) * g_ms
    if v is None:
        new = fresh
    else:
        new = beta * v + fresh
        if 0 in steps:
            new = torch.where(torch.tensor([t == 0 for t in steps], device=g_ms.device), fresh, new)
    if len(set(steps)) == 1:
        return new, new / (1 - beta ** (steps[0] + 1))
    return new, new / torch.tensor([1 - beta ** (t + 1) for t in steps], dtype=new.dtype, device=new.device)


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


def fused_mean_squares(groups: Sequence[Sequence[torch.Tensor]], *more: Sequence[Sequence[torch.Tensor]],
                       dtype: torch.dtype) -> list[torch.Tensor]:
    """:func:`mean_squares` of each set of groups of tensors (no ``None``, the same sizes in
    every set), each by one ``torch._foreach_norm`` over all its tensors summed per group (the
    frozen path: two such reductions per step)."""
    device = groups[0][0].device
    owner = torch.repeat_interleave(torch.arange(len(groups), device=device),
                                    torch.tensor([len(ts) for ts in groups], device=device))
    numel = torch.zeros(len(groups), dtype=dtype, device=device).index_add_(
        0, owner, torch.tensor([float(t.numel()) for ts in groups for t in ts], dtype=dtype, device=device))
    out = []
    for sets in (groups, *more):
        flat = [t for ts in sets for t in ts]
        if any(t.dtype in (torch.float16, torch.bfloat16) for t in flat):  # float32 norms: no overflow at 65504
            sq = torch.stack(torch._foreach_norm(flat, 2, dtype=torch.float32)).to(dtype) ** 2
        else:
            sq = torch.stack(torch._foreach_norm(flat)).to(dtype) ** 2
        out.append(torch.zeros_like(numel).index_add_(0, owner, sq) / numel)
    return out


def one_buffer_group(view: GroupView, key: str, step_size, scale, inplace: bool,
                     in_place: Callable, out_of_place: Callable) -> GroupUpdate:
    """One group's update by a kernel with one buffer ``key`` per parameter, on the parameters
    that have a gradient, at step ``view.lr * step_size * scale``; the step count advances by
    one. ``in_place(live, params, grads, bufs, lr)`` (``lr`` a float) updates the parameters
    and returns the buffers; ``out_of_place(...)`` (``lr`` a tensor where it carries gradients)
    returns ``(new_params, new_bufs)``; ``live`` are the indices of those parameters in the
    group. Buffers of parameters without a gradient are kept."""
    eta = step_size if isinstance(view.lr, float) and view.lr == 1.0 else view.lr * step_size
    bufs = view.state.buffers.get(key) or [None] * len(view.params)
    live = [i for i, g in enumerate(view.grads) if g is not None]
    ps, gs, bs = [view.params[i] for i in live], [view.grads[i] for i in live], [bufs[i] for i in live]
    new_p, new_b = list(view.params), list(bufs)
    if inplace:
        kept = in_place(live, ps, gs, bs, float(eta) * float(scale))
    else:
        moved, kept = out_of_place(live, ps, gs, bs, eta * scale)
        for i, p in zip(live, moved):
            new_p[i] = p
    for i, b in zip(live, kept):
        new_b[i] = b
    return GroupUpdate(new_p, GroupState(view.state.step + 1, {key: new_b}, {}), eta, scale)


# --------------------------------------------------------------------------- the rule
@dataclasses.dataclass
class _Bound:
    """The network (moved to the parameters' device and dtype on first use on the frozen path),
    the config and the groups' geometry."""

    net: dict[str, torch.Tensor]
    config: AdaptiveConfig
    infos: list[GroupInfo]
    frozen: bool
    geometry: dict = dataclasses.field(default_factory=dict)

    def on(self, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        w = self.net["w1"]
        if w.device != device or w.dtype != dtype:
            self.net = {k: v.to(device=device, dtype=dtype) for k, v in self.net.items()}
            self.geometry.clear()
        return self.net

    def roles_depths(self, index: tuple[int, ...], dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        if index not in self.geometry:
            self.geometry[index] = group_geometry([self.infos[i] for i in index], dtype, device)
        return self.geometry[index]


class AdaptiveRule(Rule):
    """The adaptive rule (see the module doc); ``with_momentum`` picks the variant."""

    config_type = AdaptiveConfig
    table = "adaptive"
    stats = ("avg_sq_grad", "first_sq_grad")

    def __init__(self, name: str, with_momentum: bool):
        self.name, self.with_momentum = name, with_momentum
        self.buffers = ("momentum_buffer",) if with_momentum else ()
        self.state_text = "one momentum buffer" if with_momentum else "none"
        self.summary = ("a tiny network shared by all layers maps each layer's gradient and parameter statistics to "
                        "its step size and rescaling factor every step (spec table [adaptive]); "
                        + ("one momentum buffer per parameter" if with_momentum else "no per-parameter state, "
                           "the table's momentum is set to 0"))

    def config_from(self, config):
        if not self.with_momentum:
            return dataclasses.replace(config, momentum=0.0, nesterov=False)
        if config.momentum == 0:
            raise ValueError(f"rule {self.name} needs [adaptive] momentum > 0")
        return config

    def upgrade(self, stored, version):
        """Version-1 files without ``table_steps`` predate the offset table: 0."""
        return {"table_steps": 0, **stored} if version == "1" else stored

    def owns(self, config):
        return type(config) is AdaptiveConfig and (config.momentum > 0) == self.with_momentum

    def resolve(self, config, horizon):
        return config if config.table_steps is not None else dataclasses.replace(config, table_steps=horizon)

    def meta_shapes(self, config, horizon):
        return net_shapes(self.resolve(config, horizon))

    def init_meta(self, config, horizon, *, seed=0, dtype=torch.float32, device=None):
        return init_net(self.resolve(config, horizon), seed, dtype, device)

    def check_meta(self, meta, config):
        """Weights beyond :data:`MAX_WEIGHT` can overflow the network's float32 forward
        (``inf - inf``), and ``tanh`` of NaN is NaN: such a file would give NaN factors."""
        for k, v in meta.items():
            if v.numel() and float(v.abs().max()) > MAX_WEIGHT:
                return f"{k} holds weights beyond {MAX_WEIGHT:g}, which overflow the network's float32 forward"
        return None

    def check_stats(self, stats):
        bad = [k for k, v in stats.items() if v < 0]
        return f"{bad[0]} = {stats[bad[0]]!r} is a mean square; expected >= 0" if bad else None

    def anchor_axes(self, meta):
        """The offset table ``(output, role, depth anchor, step)``; the network is shared."""
        return {TABLE: (1, 2)} if TABLE in meta else {}

    def meta_groups(self, meta, lr, net_lr):
        """The output offsets ``b_2``, the table and the ``t/T`` schedule are log step sizes and
        scales like the static rule's (``lr``); the weights that read the features move slower
        (``net_lr``)."""
        fast = [k for k in ("b2", TABLE, TIME) if k in meta]
        return [{"params": [meta[k] for k in fast], "lr": lr},
                {"params": [v for k, v in meta.items() if k not in fast], "lr": net_lr}]

    def describe(self, meta, config, horizon):
        n = sum(v.numel() for v in meta.values())
        lines = [f"a shared network of {n} numbers maps each layer's statistics ({', '.join(FEATURES)}) to its "
                 f"step size and rescaling factor every step; default total_steps {horizon} (the meta-training "
                 f"horizon); per-parameter state: {self.state_text}",
                 "linear path (log step size, log rescaling factor) per feature:"]
        lines += [f"  {f:<20} {meta['wl'][0, j]:+.3f} {meta['wl'][1, j]:+.3f}" for j, f in enumerate(FEATURES)]
        if TIME in meta:
            d = meta[TIME]
            k = d.shape[1]
            lines.append("learned schedule in t/T: step-size multiplier exp(D_eta) x rescaling factor exp(D_s) at "
                         + ", ".join(f"{j / (k - 1):.2f}" for j in range(k)) + ":")
            if d.dim() == 2:
                lines.append("  " + ", ".join(f"{float(m):.3g}" for m in torch.exp(d[0] + d[1])))
            for a, T in enumerate(config.time_horizons if d.dim() == 3 else ()):
                lines.append(f"  T = {T:<6} "
                             + ", ".join(f"{float(m):.3g}" for m in torch.exp(d[0, :, a] + d[1, :, a])))
        if TABLE in meta:
            tab, (bins, n) = meta[TABLE], meta[TABLE].shape[2:]
            cols = sorted({round(i * (n - 1) / 4) for i in range(5)})
            lines.append("offset table: step-size multiplier exp(S_eta) x rescaling factor exp(S_s) by role and "
                         f"depth, at steps {', '.join(map(str, cols))} (of {n}; the last is held after):")
            for r, role in enumerate(("matrix", "vector")):
                for b in range(bins):
                    m = torch.exp(tab[0, r, b] + tab[1, r, b])
                    lines.append(f"  {role:<6} depth {b / max(bins - 1, 1):.2f}: "
                                 + ", ".join(f"{float(m[c]):.3g}" for c in cols))
        return lines

    def bind(self, meta, config, infos, *, differentiable):
        net = meta if differentiable else {k: v.detach().clone() for k, v in meta.items()}
        return _Bound(net, config, list(infos), not differentiable)

    def update(self, view, step_size, scale, config, inplace, info):
        """One group's update at the network's factors (``info``: the group's
        :class:`~metascale.optim.groups.GroupInfo`): the heavy-ball kernel
        (:func:`~metascale.optim.layerwise.heavy_ball_group`). Variants over another direction
        override this alone."""
        return heavy_ball_group(view, step_size, scale, config.momentum, config.nesterov, inplace)

    def step(self, bound, views, *, total_steps, inplace):
        """Statistics of every live group, one batched network forward, then the heavy-ball
        kernel per group at its factors (floats in place: one host sync per step)."""
        cfg, steps = bound.config, [v.state.step for v in views]
        if inplace:
            first = views[0].params[0]
            dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
            net, device = bound.on(first.device, dtype), first.device
            g_ms, p_ms = fused_mean_squares([v.grads for v in views], [v.params for v in views], dtype=dtype)
            stat = lambda key, fill: torch.tensor([v.state.stats.get(key, fill) for v in views], dtype=dtype,
                                                  device=device)
        else:
            net = bound.net
            dtype, device = net["w1"].dtype, net["w1"].device
            g_ms = mean_squares([v.grads for v in views]).to(dtype)
            p_ms = mean_squares([v.params for v in views]).to(dtype)
            zero = torch.zeros((), dtype=dtype, device=device)
            stat = lambda key, fill: torch.stack([torch.as_tensor(v.state.stats.get(key, zero), dtype=dtype,
                                                                  device=device) for v in views])
        if all(t == 0 for t in steps):  # every group at its first step
            v_old, g0 = None, g_ms
        elif 0 not in steps:
            v_old, g0 = stat("avg_sq_grad", 0.0), stat("first_sq_grad", 1.0)
        else:  # some groups start now (e.g. a layer unfrozen mid-run)
            v_old = stat("avg_sq_grad", 0.0)
            g0 = torch.where(torch.tensor([t == 0 for t in steps], device=device), g_ms, stat("first_sq_grad", 1.0))
        v, v_hat = update_average(v_old, g_ms, cfg.beta, steps)
        roles, depths = bound.roles_depths(tuple(v.index for v in views), dtype, device)
        frac = steps[0] / total_steps if len(set(steps)) == 1 else torch.tensor(steps, dtype=dtype,
                                                                                device=device) / total_steps
        eta, s = adaptive_factors(net, adaptive_features(g_ms, p_ms, v_hat, g0, frac, roles, depths), cfg, steps,
                                  total_steps)
        if inplace:
            eta, s, v, g0 = eta.tolist(), s.tolist(), v.tolist(), g0.tolist()
        else:
            v, g0 = v.unbind(), g0.unbind()
        out = []
        for k, view in enumerate(views):
            up = self.update(view, eta[k], s[k], cfg, inplace, bound.infos[view.index])
            up.state.stats = {"avg_sq_grad": v[k], "first_sq_grad": g0[k]}
            out.append(up)
        return out
