r"""Meta-gradient estimators that need no graph through the unroll: ES and PES.

Both perturb the flat meta-parameters :math:`\theta \in \mathbb{R}^d` antithetically,
:math:`\theta \pm \sigma\epsilon` with :math:`\epsilon \sim N(0, I)` drawn from a generator
seeded by ``(seed, meta-step, task)``, so any process computes the same estimate. The inner
runs take no second-order graph (``create_graph=False``) and carry their state detached from
window to window, so memory is that of one training step whatever the horizon.

**ES** (antithetic evolution strategies) over the whole horizon of ``W`` windows:

.. math:: \hat g = \frac{1}{P}\sum_{i=1}^{P} \frac{L(\theta + \sigma\epsilon_i) - L(\theta - \sigma\epsilon_i)}{2\sigma}\,\epsilon_i,

an unbiased estimate of the gradient of the Gaussian-smoothed objective
:math:`\mathbb{E}_\epsilon L(\theta + \sigma\epsilon)` (``L``: the meta-objective of the run, the
mean over windows of each window's objective, as for backpropagation).

**PES** (persistent ES, Vicol et al. 2021) over windows: a particle is one task's run, a ``+``
and a ``-`` inner state, and the sum :math:`\xi` of the perturbations it has used. Each
meta-step every particle unrolls its next window ``w`` with a fresh :math:`\epsilon`, from its
``+`` state at :math:`\theta + \sigma\epsilon` and its ``-`` state at
:math:`\theta - \sigma\epsilon`, and contributes

.. math:: \xi \leftarrow \xi + \epsilon, \qquad
          \hat g = \frac{L_w^+ - L_w^-}{2\sigma}\,\xi,

an unbiased estimate of :math:`\nabla_\theta L_w` of the smoothed objective *through the whole
run so far* (truncated backpropagation sees only the current window). A particle that finishes
its ``W`` windows starts over on a new task draw. Particles start staggered (particle ``j`` at
window ``j W / B``, reached by unperturbed steps), so that a meta-batch covers the horizon.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch

from ..inner.func_engine import InnerState, unroll_func
from ..optim import GroupState
from ..tasks.base import Task, mix_seed

SALT_ES, SALT_PES, SALT_DRAW = 0xE5, 0x9E5, 0xD8A


def flatten(meta: dict[str, torch.Tensor]) -> torch.Tensor:
    """The meta-parameters as one float64 vector (dict order)."""
    return torch.cat([v.detach().reshape(-1).double() for v in meta.values()])


def unflatten(vec: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``vec`` split back into tensors shaped, typed and placed like ``like``."""
    out, i = {}, 0
    for k, v in like.items():
        out[k] = vec[i:i + v.numel()].reshape(v.shape).to(dtype=v.dtype, device=v.device)
        i += v.numel()
    return out


def perturbation(seed: int, salt: int, step: int, index: int, n: int, device=None) -> torch.Tensor:
    """``epsilon ~ N(0, I_n)`` (float64) of task ``index`` at meta-step ``step``: the same in
    every process."""
    gen = torch.Generator().manual_seed(mix_seed(seed, salt, step, index))
    return torch.randn(n, generator=gen, dtype=torch.float64).to(device)


def windows_objective(task: Task, meta: dict[str, torch.Tensor], rule: Any, inner, device, *,
                      state: InnerState | None = None, windows: int | None = None,
                      ) -> tuple[float, InnerState]:
    """The mean over ``windows`` windows (default all) of each window's meta-objective times
    its weight (:meth:`~metascale.spec.InnerConfig.window_weight`, ``[inner] tail``), run from
    ``state`` without a second-order graph; returns ``(objective, state after)``."""
    values = []
    for _ in range(inner.windows if windows is None else windows):
        weight = inner.window_weight(0 if state is None else state.step)
        res = unroll_func(task, meta, rule, inner.steps, objective=inner.objective, device=device,
                          create_graph=False, state=state, total_steps=inner.horizon)
        state = res.state.detach()
        loss = float(res.meta_loss.detach())
        values.append(weight * loss if math.isfinite(loss) else loss)
    return (sum(values) / len(values) if values else 0.0), state


def es_gradient(objective: Callable[[torch.Tensor], float], theta: torch.Tensor, sigma: float, pairs: int,
                noise: Callable[[int], torch.Tensor]) -> tuple[torch.Tensor | None, float]:
    """The antithetic ES estimate (module doc) of ``objective`` at flat ``theta`` with ``pairs``
    pairs, ``noise(i)`` the ``i``-th :math:`\\epsilon`; returns ``(g, mean of the 2P values)``,
    ``g = None`` when a value is not finite."""
    g, total = torch.zeros_like(theta), 0.0
    for i in range(pairs):
        eps = noise(i)
        up, down = objective(theta + sigma * eps), objective(theta - sigma * eps)
        if not (math.isfinite(up) and math.isfinite(down)):
            return None, math.nan
        g += (up - down) / (2 * sigma) * eps
        total += up + down
    return g / pairs, total / (2 * pairs)


def es_row(task: Task, meta: dict[str, torch.Tensor], rule: Any, inner, sigma: float, pairs: int, seed: int,
           step: int, index: int, device) -> torch.Tensor | None:
    """``[1, meta-loss, ES estimate]`` of task ``index`` at meta-step ``step`` (``None``: a
    perturbed run diverged)."""
    theta = flatten(meta).to(device)
    fn = lambda vec: windows_objective(task, unflatten(vec, meta), rule, inner, device)[0]
    noise = lambda i: perturbation(seed, SALT_ES, step, index * 1_000_003 + i, theta.numel(), device)
    g, loss = es_gradient(fn, theta, sigma, pairs, noise)
    if g is None:
        return None
    return torch.cat([torch.tensor([1.0, loss], dtype=torch.float64, device=device), g])


@dataclasses.dataclass
class Particle:
    """One PES particle: its task draw, the window it unrolls next, the perturbation sum and its
    two inner states (``None`` before its first window)."""

    draw: int
    window: int = 0
    xi: torch.Tensor | None = None
    plus: InnerState | None = None
    minus: InnerState | None = None


class PES:
    """The particles of one meta-training run and their estimates (module doc). Particle ``j``
    of ``batch`` draws tasks ``j, j + batch, j + 2 batch, ...`` of the sampler's
    ``draw_salt`` stream, one per run through the horizon."""

    def __init__(self, sample: Callable[[int], Task], rule: Any, inner, sigma: float, seed: int, batch: int,
                 device, stagger: bool = True):
        self.sample, self.rule, self.inner, self.sigma, self.seed = sample, rule, inner, sigma, seed
        self.batch, self.device, self.stagger = batch, device, stagger
        self.particles: dict[int, Particle] = {}

    def _start(self, j: int, meta: dict[str, torch.Tensor]) -> Particle:
        """Particle ``j``'s first run, advanced unperturbed to its staggered window."""
        p = Particle(draw=j, window=(j * self.inner.windows) // self.batch if self.stagger else 0)
        if p.window:
            with torch.no_grad():
                detached = {k: v.detach() for k, v in meta.items()}
            _, state = windows_objective(self.sample(p.draw), detached, self.rule, self.inner, self.device,
                                         windows=p.window)
            p.plus, p.minus = state, state
        return p

    def row(self, j: int, step: int, meta: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """``[1, meta-loss, PES estimate]`` of particle ``j`` at meta-step ``step`` (``None``:
        a perturbed window diverged; the particle then starts over on its next task)."""
        p = self.particles.get(j) or self._start(j, meta)
        task = self.sample(p.draw)
        theta = flatten(meta).to(self.device)
        eps = perturbation(self.seed, SALT_PES, step, j, theta.numel(), self.device)
        up, plus = windows_objective(task, unflatten(theta + self.sigma * eps, meta), self.rule, self.inner,
                                     self.device, state=p.plus, windows=1)
        down, minus = windows_objective(task, unflatten(theta - self.sigma * eps, meta), self.rule, self.inner,
                                        self.device, state=p.minus, windows=1)
        xi = eps if p.xi is None else p.xi + eps
        done = p.window + 1 >= self.inner.windows
        ok = math.isfinite(up) and math.isfinite(down)
        if done or not ok:  # the next run of this particle: a new task draw
            self.particles[j] = Particle(draw=p.draw + self.batch)
        else:
            self.particles[j] = Particle(p.draw, p.window + 1, xi, plus, minus)
        if not ok:
            return None
        g = (up - down) / (2 * self.sigma) * xi
        return torch.cat([torch.tensor([1.0, (up + down) / 2], dtype=torch.float64, device=self.device), g])

    # ------------------------------------------------------------------ checkpointing
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every particle as named CPU tensors (for a checkpoint; :meth:`load_tensors` reads them)."""
        out = {}
        for j, p in self.particles.items():
            out[f"{j}.draw_window"] = torch.tensor([p.draw, p.window], dtype=torch.int64)
            if p.xi is not None:
                out[f"{j}.xi"] = p.xi.cpu()
            for sign, st in (("plus", p.plus), ("minus", p.minus)):
                if st is not None:
                    out.update({f"{j}.{sign}.{k}": v for k, v in state_to_tensors(st).items()})
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore the particles written by :meth:`state_tensors`."""
        self.particles = {}
        for name, t in tensors.items():
            j, _, rest = name.partition(".")
            if rest == "draw_window":
                draw, window = (int(x) for x in t.tolist())
                self.particles[int(j)] = Particle(draw, window)
        for j, p in self.particles.items():
            if f"{j}.xi" in tensors:
                p.xi = tensors[f"{j}.xi"].to(self.device)
            for sign in ("plus", "minus"):
                sub = {n[len(f"{j}.{sign}."):]: t for n, t in tensors.items() if n.startswith(f"{j}.{sign}.")}
                if sub:
                    setattr(p, sign, state_from_tensors(sub, self.device))


def state_to_tensors(state: InnerState) -> dict[str, torch.Tensor]:
    """An :class:`InnerState` as named tensors: ``param.i``, ``step``, and per group ``k``
    ``group.k.step``, ``group.k.buf.NAME.i``, ``group.k.stat.NAME``."""
    out = {f"param.{i}": p.detach().cpu() for i, p in enumerate(state.params)}
    out["step"] = torch.tensor([state.step], dtype=torch.int64)
    for k, g in enumerate(state.groups or []):
        out[f"group.{k}.step"] = torch.tensor([g.step], dtype=torch.int64)
        for name, bufs in g.buffers.items():
            out[f"group.{k}.buflen.{name}"] = torch.tensor([len(bufs)], dtype=torch.int64)
            out.update({f"group.{k}.buf.{name}.{i}": b.detach().cpu() for i, b in enumerate(bufs) if b is not None})
        for name, v in g.stats.items():
            out[f"group.{k}.stat.{name}"] = torch.as_tensor(v).detach().cpu().reshape(())
    return out


def state_from_tensors(tensors: dict[str, torch.Tensor], device) -> InnerState:
    """The inverse of :func:`state_to_tensors`."""
    params = [tensors[f"param.{i}"].to(device) for i in range(sum(n.startswith("param.") for n in tensors))]
    ngroups = sum(n.startswith("group.") and n.endswith(".step") for n in tensors)
    groups = []
    for k in range(ngroups):
        pre = f"group.{k}."
        bufs: dict[str, dict[int, torch.Tensor]] = {}
        stats = {}
        for n, t in tensors.items():
            if n.startswith(pre + "buf."):
                name, _, i = n[len(pre) + 4:].rpartition(".")
                bufs.setdefault(name, {})[int(i)] = t.to(device)
            elif n.startswith(pre + "stat."):
                stats[n[len(pre) + 5:]] = t.to(device)
        lengths = {n[len(pre) + 7:]: int(t) for n, t in tensors.items() if n.startswith(pre + "buflen.")}
        buffers = {name: [bufs.get(name, {}).get(i) for i in range(n)] for name, n in lengths.items()}
        groups.append(GroupState(int(tensors[pre + "step"]), buffers, stats))
    return InnerState(params, groups if ngroups else None, int(tensors["step"]))


# --------------------------------------------------------------------------- PES state on disk
PES_FORMAT = "metascale.pes"


def pes_state_path(checkpoint_path, rank: int, step: int):
    """Where rank ``rank`` keeps its PES particles for the checkpoint at meta-step ``step``
    (next to the checkpoint; each rank writes its own particles)."""
    from pathlib import Path
    path = Path(checkpoint_path)
    return path.with_name(f"{path.stem}.pes-rank{rank}.step{step}.safetensors")


def save_pes_state(checkpoint_path, rank: int, step: int, pes: PES) -> None:
    """Write this rank's particles for meta-step ``step`` atomically, before the checkpoint of
    that step; shards older than the previous one are removed."""
    from safetensors.torch import save as serialise

    from .checkpoint import _write_atomic
    path = pes_state_path(checkpoint_path, rank, step)
    tensors = {k: v.contiguous() for k, v in pes.state_tensors().items()}
    _write_atomic(path, serialise(tensors, {"format": PES_FORMAT, "step": str(step), "rank": str(rank)}))
    shards = sorted(path.parent.glob(f"{path.name.split('.pes-rank')[0]}.pes-rank{rank}.step*.safetensors"),
                    key=lambda f: int(f.name.rsplit(".step", 1)[1].split(".")[0]))
    for old in shards[:-2]:
        old.unlink(missing_ok=True)


def load_pes_state(checkpoint_path, rank: int, step: int, pes: PES) -> None:
    """Restore this rank's particles of the checkpoint at meta-step ``step``."""
    from ..errors import CheckpointError
    from ..safeio import read_safetensors
    path = pes_state_path(checkpoint_path, rank, step)
    if not path.is_file():
        raise CheckpointError(f"{path}: the PES particles of rank {rank} at meta-step {step} are missing; "
                              "cannot resume a PES run without them")
    meta, tensors = read_safetensors(path, PES_FORMAT, error=CheckpointError)
    if meta.get("step") != str(step) or meta.get("rank") != str(rank):
        raise CheckpointError(f"{path}: holds the particles of rank {meta.get('rank')} at meta-step "
                              f"{meta.get('step')}, not of rank {rank} at {step}")
    pes.load_tensors(tensors)


def remove_pes_state(checkpoint_path) -> None:
    """Remove every rank's PES shards next to ``checkpoint_path`` (a fresh run)."""
    from pathlib import Path
    path = Path(checkpoint_path)
    for f in path.parent.glob(f"{path.stem}.pes-rank*.step*.safetensors"):
        f.unlink(missing_ok=True)
