r"""The outer meta-trainer: Adam on the meta-parameters over meta-batches of tasks.

One meta-step draws ``B`` fresh meta-train tasks (draws ``i*B .. i*B+B-1`` of the train
split), unrolls the learnable optimizer on each (:func:`metascale.inner.unroll`), averages the
meta-losses and backpropagates:

.. math:: \nabla_\theta \frac1B \sum_{j} \ell_j(\theta),

skipping tasks whose meta-loss or meta-gradient is not finite (counted), clipping the
meta-gradient to global norm ``clip``, and taking one Adam step. Every meta-step appends one
JSON line to the metrics file.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from ..inner.func_engine import unroll_func
from ..inner.higher_engine import unroll
from ..losses import LossConfig, make_loss
from ..optim import RULES, rule_for, sgd_config
from ..optim.rule import never_trained
from ..spec import LEARN, MetaConfig
from ..tasks.base import mix_seed
from .checkpoint import open_metrics, restore, run_identity, save_checkpoint, snapshot
from .distributed import gather_in_task_order, my_tasks, world
from .estimators import PES, es_row, load_pes_state, remove_pes_state, save_pes_state

if TYPE_CHECKING:
    from ..spec import Spec


def selection_sampler(spec: "Spec", seed: int):
    """The sampler of the fixed meta-train draws on which ``select_every`` measures the
    meta-parameters: a stream of the train split apart from the training draws and from
    evaluation's tuning draws."""
    return spec.sampler("train", mix_seed(seed, 0x5E1))


def selection_tasks(spec: "Spec", seed: int, cfg: MetaConfig) -> list:
    """The first ``cfg.select_tasks`` draws of :func:`selection_sampler`."""
    sampler = selection_sampler(spec, seed)
    return [sampler.task(i) for i in range(cfg.select_tasks)]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/``None`` picks CUDA when available, else CPU."""
    if isinstance(device, torch.device):
        device = str(device)
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from ..errors import MetascaleError
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise MetascaleError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MetascaleError(f"device {device!r} requested but CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise MetascaleError(f"device {device!r} is not supported; use auto, cpu, cuda or cuda:N")
    return dev


@dataclasses.dataclass
class MetaResult:
    """Meta-trained parameters (detached, CPU, float32), a summary for the export file, the rule
    config the inner loop ran, and the learned loss (``None`` unless it was learned)."""

    meta: dict[str, torch.Tensor]
    summary: dict
    rule: Any = None
    loss: torch.nn.Module | None = None


def clipped_mean(sums: list[torch.Tensor], n: int, clip: float) -> tuple[list[torch.Tensor], float]:
    """The mean ``sums / n`` of per-task meta-gradients, clipped to global norm ``clip`` (0: not
    clipped), and its norm before clipping, all in float64: ``clip_grad_norm_`` on float32
    gradients overflows to an infinite norm (at ~1.8e19 on CUDA), which zeroes the step, or
    makes it NaN when clipping is off."""
    mean = [s / n for s in sums]
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(m) for m in mean])))
    coef = min(1.0, clip / (norm + 1e-6)) if clip > 0 else 1.0
    return [m * coef for m in mean], norm


def clip_task(g: torch.Tensor, clip: float) -> torch.Tensor:
    r"""One task's flat meta-gradient clipped to norm ``clip`` (0: unchanged):
    :math:`g \min(1, c / \lVert g\rVert)`."""
    if clip <= 0:
        return g
    norm = float(torch.linalg.vector_norm(g))
    return g * (clip / norm) if norm > clip else g


class MetaTrainer:
    """Meta-train a learnable optimizer (``rule``: a name in :data:`metascale.optim.RULES`)
    and/or a learned loss on a spec's meta-train distribution.

    Example::

        spec = load_spec("tasks/sine.toml")
        result = MetaTrainer(spec, seed=0).train(metrics_path="runs/sine/metrics.jsonl")
    """

    def __init__(self, spec: "Spec", *, seed: int = 0, device: str | torch.device | None = "auto",
                 meta_steps: int | None = None, progress: bool = True, learn: str = "optimizer",
                 loss_config: LossConfig | None = None, inner_lr: float | None = None, rule: str | None = None):
        from ..optim import DEFAULT_RULE
        rule = DEFAULT_RULE if rule is None else rule
        if rule not in RULES:
            raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
        self.rule = rule
        if learn not in LEARN:
            raise ValueError(f"learn must be one of {LEARN}, got {learn!r}")
        if learn == "loss" and inner_lr is None:
            raise ValueError("learn='loss' trains the loss under plain SGD: give its inner_lr "
                             "(metascale.evaluate.tune_lr picks it on meta-train tasks)")
        self.learn, self.loss_config, self.inner_lr = learn, loss_config or LossConfig(), inner_lr
        self.spec = spec
        self.seed = seed
        self.device = resolve_device(device)
        self.steps = spec.meta.steps if meta_steps is None else meta_steps
        self.progress = progress

    def train(self, metrics_path: str | Path | None = None, *, checkpoint_path: str | Path | None = None,
              checkpoint_every: int = 10, resume: bool = False) -> MetaResult:
        """Run the meta-training loop; write one JSON line per meta-step to ``metrics_path``.

        With ``checkpoint_path``, write a checkpoint (:mod:`metascale.meta.checkpoint`) after
        every ``checkpoint_every``-th meta-step (0: never) and after the last; a fresh run first
        removes a stale one. ``resume=True`` continues from it instead, cutting the metrics file
        back to the checkpoint's meta-step: the result equals an uninterrupted run's.

        Raises:
            CheckpointError: ``resume`` without an intact checkpoint of this same run.
        """
        if resume and checkpoint_path is None:
            raise ValueError("resume=True needs the checkpoint_path to resume from")
        spec, cfg = self.spec, self.spec.meta
        sampler = spec.sampler("train", self.seed)
        rank, _ = world()
        learn_opt, learn_loss = self.learn in ("optimizer", "both"), self.learn in ("loss", "both")
        # learn='loss': the inner optimizer is plain SGD, i.e. the layer-wise rule at unit
        # meta-parameters without momentum (tests/test_optim.py proves the equality)
        rule = spec.rule_config(self.rule) if learn_opt else sgd_config(self.inner_lr)
        the_rule = rule_for(rule)
        meta = the_rule.init_meta(rule, spec.inner.horizon, seed=self.seed, device=self.device)
        untouched = {k: v.clone() for k, v in meta.items()}
        # entries that ever received a non-zero meta-gradient (backprop estimators: ES/PES give
        # every entry noise, so nothing is tracked there)
        touched = {k: torch.zeros_like(v, dtype=torch.bool) for k, v in meta.items()} \
            if learn_opt and cfg.estimator in ("backprop", "truncated") else None
        loss_fn = make_loss(sampler.task(0).kind, self.loss_config, seed=self.seed).to(self.device) if learn_loss else None
        params, groups = [], []
        if learn_opt:
            params += [v.requires_grad_(True) for v in meta.values()]
            groups += [g for g in the_rule.meta_groups(meta, cfg.lr, cfg.net_lr) if g["params"]]
        if learn_loss:
            params += list(loss_fn.parameters())
            groups.append({"params": list(loss_fn.parameters()), "lr": cfg.loss_lr})
        adam = torch.optim.Adam(groups)
        if cfg.estimator in ("es", "pes") and self.learn != "optimizer":
            raise ValueError(f"estimator {cfg.estimator!r} meta-trains the optimizer alone (learn='optimizer'); "
                             "a learned loss needs backprop or truncated")
        pes = PES(sampler.task, rule, spec.inner, cfg.sigma, self.seed, cfg.batch_size, self.device) \
            if cfg.estimator == "pes" else None
        # selection keeps the optimizer's meta-parameters only: not used when a loss is learned
        select = selection_tasks(spec, self.seed, cfg) if cfg.select_every > 0 and self.learn == "optimizer" else None
        best: tuple[int, float, dict] | None = None  # (meta-step, selection loss, meta-parameters)
        sizes = [v.numel() for v in params]
        n_flat = sum(sizes)
        if rank != 0:  # only rank 0 writes files and logs
            metrics_path, self.progress = None, False
        run = run_identity(spec.to_dict(), self.seed, self.learn, rule, self.loss_config if learn_loss else None,
                           self.inner_lr)
        skipped, history, start, elapsed = 0, [], 0, 0.0
        # the selection measure of the untrained meta-parameters: the "before" of the summary line
        untrained_sel = self._select(select, meta, rule, loss_fn, 0, None)[0] if select is not None else None
        if resume:  # every rank loads it: same meta-parameters and Adam state everywhere
            ck = restore(checkpoint_path, run, meta, loss_fn, adam, self.steps)
            skipped, history, start, elapsed = ck.skipped, ck.history, ck.step, ck.elapsed_s
            if ck.best is not None:
                best = (ck.best[0], ck.best[1], {k: v.to(self.device) for k, v in ck.best[2].items()})
            if pes is not None and start > 0:  # every rank its own particles
                load_pes_state(checkpoint_path, rank, start, pes)
        elif checkpoint_path is not None and rank == 0:
            Path(checkpoint_path).unlink(missing_ok=True)  # an earlier run's: never resume into this one
            remove_pes_state(checkpoint_path)
        if metrics_path:
            Path(metrics_path).parent.mkdir(parents=True, exist_ok=True)
        out = open_metrics(metrics_path, start) if metrics_path else None
        t0 = time.time() - elapsed
        bar = tqdm(range(start, self.steps), initial=start, total=self.steps, desc=f"meta-train {spec.name}",
                   disable=not self.progress, dynamic_ncols=True)
        try:
            for step in bar:
                adam.zero_grad(set_to_none=True)
                # float64 sums: B float32-finite meta-gradients can overflow a float32 sum
                grads = [torch.zeros_like(v, dtype=torch.float64) for v in params]
                losses, n_ok, dropped = [], 0, []
                # rows [finite, meta-loss, flat meta-gradient] of this rank's tasks, then of all
                # tasks in task order (distributed.py); reduced in that order on every rank
                mine = [self._row(step, j, sampler, meta, rule, loss_fn, params, pes)
                        for j in my_tasks(cfg.batch_size)]
                rows = gather_in_task_order(torch.stack(mine) if mine else torch.zeros((0, 2 + n_flat)),
                                            cfg.batch_size)
                for j, row in enumerate(rows):
                    if row[0] == 0:  # diverged: its meta-gradient is dropped
                        skipped += 1
                        dropped.append(step * cfg.batch_size + j)
                        continue
                    for acc, x in zip(grads, torch.split(clip_task(row[2:], cfg.task_clip), sizes)):
                        acc.add_(x.view_as(acc))
                    losses.append(float(row[1]))
                    n_ok += 1
                gnorm = None
                if n_ok:  # none finite: no Adam step, meta-parameters and Adam state untouched
                    mean, gnorm = clipped_mean(grads, n_ok, cfg.clip)
                    if touched is not None:
                        for t, g in zip(touched.values(), mean):
                            t |= g.view_as(t) != 0
                    for v, g in zip(params, mean):
                        v.grad = g.to(v.dtype)
                    adam.step()
                sel = None
                if select is not None and (step + 1) % cfg.select_every == 0:
                    sel, best = self._select(select, meta, rule, loss_fn, step + 1, best)
                loss = sum(losses) / len(losses) if losses else None
                history.append(loss)
                record = {"meta_step": step, "meta_loss": loss, "meta_grad_norm": gnorm, "tasks_ok": n_ok,
                          "selection_loss": sel, "tasks_skipped": len(dropped), "skipped_draws": dropped,
                          "skipped_total": skipped, "elapsed_s": round(time.time() - t0, 3),
                          "learned": the_rule.learned({k: v.detach().cpu() for k, v in meta.items()}) if learn_opt else None}
                if out:
                    out.write(json.dumps(record) + "\n")
                    out.flush()
                bar.set_postfix(meta_loss="skipped" if loss is None else f"{loss:.4f}", gnorm="-" if gnorm is None else f"{gnorm:.3g}")
                due = checkpoint_path is not None and checkpoint_every > 0 \
                    and ((step + 1) % checkpoint_every == 0 or step + 1 == self.steps)
                if due and pes is not None:  # each rank's particles, before the checkpoint that needs them
                    save_pes_state(checkpoint_path, rank, step + 1, pes)
                if due and rank == 0:
                    save_checkpoint(checkpoint_path, snapshot(run, step + 1, skipped, history, time.time() - t0, meta,
                                                              loss_fn, adam, self.device, best), metrics=out)
        finally:
            if out:
                out.close()
        if select is not None and self.steps % cfg.select_every:  # the last meta-parameters, if not yet
            # measured: after the loop, so a checkpoint never holds a measure a longer run would not make
            _, best = self._select(select, meta, rule, loss_fn, self.steps, best)
        chosen = meta if best is None else best[2]
        final = {k: v.detach().cpu().float().clone() for k, v in chosen.items()}
        tail = [h for h in history[-max(1, len(history) // 10):] if h is not None]
        summary = {"meta_steps": self.steps, "seed": self.seed, "device": str(self.device),
                   "skipped_tasks": skipped, "skipped_meta_steps": history.count(None),
                   "wall_time_s": round(time.time() - t0, 2),
                   "first_meta_loss": next((h for h in history if h is not None), None),
                   "final_meta_loss_avg_last_10pct": sum(tail) / len(tail) if tail else None,
                   "torch_version": torch.__version__, "learn": self.learn,
                   "rule": self.rule if learn_opt else None}
        if best is not None:
            summary["selected_meta_step"], summary["selection_loss"] = best[0], best[1]
            summary["selection_loss_untrained"] = untrained_sel
        if touched is not None:
            if resume:  # steps before the checkpoint: an entry Adam moved had a non-zero meta-gradient
                for k, t in touched.items():
                    t |= meta[k].detach() != untouched[k]
            summary["never_trained"] = never_trained(the_rule, {k: t.cpu() for k, t in touched.items()})
        if resume:
            summary["resumed_from_meta_step"] = start
        if loss_fn is not None:
            loss_fn = loss_fn.cpu().float().requires_grad_(False)
            summary["inner_lr"] = self.inner_lr
        return MetaResult(meta=final, summary=summary, rule=rule, loss=loss_fn)

    def _select(self, tasks, meta, rule, loss_fn, step: int, best):
        """Measure the current meta-parameters (mean meta-loss on the selection tasks; ``None``
        if one is not finite, and they are not chosen); returns ``(measure, best)`` with
        ``best = (meta-step, measure, meta-parameters)`` the lowest so far. Under several
        ranks each unrolls its share of the tasks; the measure is summed in task order, as in
        one process."""
        mine = [self._task_row(tasks[j], meta, rule, loss_fn, None) for j in my_tasks(len(tasks))]
        rows = torch.tensor([[0.0, 0.0] if v is None else [1.0, v] for v in mine], dtype=torch.float64,
                            device=self.device).reshape(-1, 2)
        rows = gather_in_task_order(rows, len(tasks))
        if bool((rows[:, 0] == 0).any()):
            return None, best
        losses = rows[:, 1].tolist()
        sel = sum(losses) / len(losses)
        if best is None or sel < best[1]:
            best = (step, sel, {k: v.detach().clone() for k, v in meta.items()})
        return sel, best

    def _row(self, step, j, sampler, meta, rule, loss_fn, params, pes):
        """The row of task ``j`` of meta-step ``step`` by the spec's estimator (zeros: skipped)."""
        cfg, n = self.spec.meta, sum(v.numel() for v in params)
        if cfg.estimator == "pes":
            row = pes.row(j, step, meta)
        elif cfg.estimator == "es":
            row = es_row(sampler.task(step * cfg.batch_size + j), meta, rule,
                         self.spec.inner.for_task(j, cfg.batch_size), cfg.sigma, cfg.pairs, self.seed, step, j,
                         self.device)
        else:
            return self._task_row(sampler.task(step * cfg.batch_size + j), meta, rule, loss_fn, params,
                                  self.spec.inner.for_task(j, cfg.batch_size))
        if row is None or not torch.isfinite(row).all():
            return torch.zeros(2 + n, dtype=torch.float64, device=self.device)
        return row

    def _task_row(self, task, meta, rule, loss_fn, params, inner=None):
        """``[finite, meta-loss, flat meta-gradient]`` of one task (float64 row; zeros when the
        meta-loss or its gradient is not finite, so the task is skipped). With ``params=None``
        only the meta-loss, a float (``None`` if not finite), with no meta-gradient: the unroll
        then builds no second-order graph (the same values). ``inner``: the task's
        :class:`~metascale.spec.InnerConfig` (default the spec's)."""
        inner = inner or self.spec.inner
        n = 0 if params is None else sum(v.numel() for v in params)
        bad = None if params is None else torch.zeros(2 + n, dtype=torch.float64, device=self.device)
        flat, total, state = torch.zeros(n, dtype=torch.float64, device=self.device), 0.0, None
        carry = self.spec.meta.estimator == "backprop" and params is not None  # the graph across windows
        whole = []
        for k in range(inner.windows):
            weight = inner.window_weight(k * inner.steps)
            if inner.engine == "higher" and inner.windows == 1:
                res = unroll(task, meta, rule, inner.steps, objective=inner.objective, device=self.device,
                             train_loss=loss_fn, track_higher_grads=params is not None)
            else:  # func engine; windows > 1 carry the inner state, detached: the truncation point
                res = unroll_func(task, meta, rule, inner.steps, objective=inner.objective, device=self.device,
                                  train_loss=loss_fn, state=state, total_steps=inner.horizon,
                                  create_graph=params is not None)
                state = res.state if carry else res.state.detach()
            if not torch.isfinite(res.meta_loss):
                return bad
            res.meta_loss = weight * res.meta_loss  # [inner] tail: 0 before the counted windows
            total += float(res.meta_loss.detach()) / inner.windows
            if params is None or (weight == 0 and not carry):
                continue
            if carry:
                whole.append(res.meta_loss)
                if len(whole) < inner.windows:
                    continue
                res.meta_loss = torch.stack(whole).sum()  # the mean over windows, below
            g = torch.autograd.grad(res.meta_loss, params, allow_unused=True)
            # unused: e.g. a learned loss's output bias, a constant that moves no gradient
            g = torch.cat([(torch.zeros_like(v) if x is None else x).reshape(-1) for v, x in zip(params, g)])
            if not torch.isfinite(g).all():
                return bad
            flat += g.double() / inner.windows
        if params is None:
            return total
        head = torch.tensor([1.0, total], dtype=torch.float64, device=self.device)
        return torch.cat([head, flat])
