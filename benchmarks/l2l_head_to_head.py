r"""Head-to-head on learn2learn tasks: metascale's learned optimizers against learn2learn's.

The same task distribution for every method: learn2learn ``Taskset``\ s, adapted by
:mod:`metascale.interop.learn2learn`, so every method sees the same tasks (draw ``step*B + j``
of the meta-train split at meta-step ``step``), the same inits, the same inner minibatches and
the same held-out tasks:

* ``digits``: 5-way tasks on scikit-learn's 8x8 digits (``NWays(5)``, ``KShots(30)``,
  ``LoadData``), 10 support and 20 query images per class, MLP 64-32-5, cross-entropy. Meta-
  train and meta-test tasksets hold disjoint images (per digit, the first 60% of its images in
  data-set order train). Tables of ``tasks/digits.toml``: K = 20, inner batch 25, B = 8,
  200 meta-steps, objective ``log_mean``.
* ``sine``: MAML sine waves (A ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5]) as a learn2learn
  regression taskset: a pool of 4000 waves (meta-test: another 1000) of 110 points each, a
  task is one wave (``NWays(1)`` over wave ids, ``KShots(110)``), 10 support points and 100
  query points; MLP 1-40-40-1, MSE. Tables of ``tasks/sine.toml``: K = 20, full batch, B = 8,
  300 meta-steps, ``log_mean``.

Methods (all meta-trained with Adam for the spec's meta-steps on the same meta-batches, the
meta-gradient clipped to the spec's norm, tasks with a non-finite meta-loss skipped, the same
meta-objective: ``inner.objective`` of the validation losses after each inner step):

* ``metascale-layerwise``: :class:`metascale.MetaTrainer` (the spec's ``[optimizer]``: step size
  and rescaling factor per role, depth anchor and step; momentum 0.9), exported and reloaded.
* ``metascale-adaptive``: ``MetaTrainer(spec, rule="adaptive")`` when this checkout has it.
* ``l2l-metasgd``: ``l2l.algorithms.MetaSGD``: one learning rate per parameter *entry*; the
  init is the task's fresh one (only the rates are meta-learned, as for every other row).
* ``l2l-lslr``: per-layer per-step learning rates (MAML++'s LSLR): one rate per parameter
  tensor and inner step. ``l2l.algorithms.GBML`` has no per-step transform, so this is built on
  learn2learn's ``clone_module``/``update_module`` (what GBML and MetaSGD use inside).
* ``l2l-learnable-opt``: ``l2l.optim.LearnableOptimizer`` with the transform of its docstring,
  ``ModuleTransform(torch.nn.Linear)`` (a dense ``numel x numel`` map per parameter tensor).
  LearnableOptimizer detaches the parameters at every step, so its meta-gradient reaches back
  one inner step (truncation 1), by construction.
* ``l2l-learnable-opt-hypergrad``: the same with the per-parameter rate transform of
  learn2learn's hypergradient example (``examples/optimization/hypergrad_mnist.py``).
* ``l2l-metasgd+init`` (context): MetaSGD as published, also meta-learning the initial weights;
  held out it starts from its learned init, not the task's fresh one: another problem.
* ``adam-tuned`` (reference): Adam with its rate tuned on meta-train draws
  (:func:`metascale.evaluate.tune_lr`, the spec's grid).

Starting points: MetaSGD, LSLR and both LearnableOptimizer variants start as SGD at
``init_lr / (1 - momentum)`` of the spec's ``[optimizer]`` (0.1: metascale's initial rule's
effective step); their Adam step is ``meta.lr`` times their initial value (the same relative
move per meta-step as Adam on metascale's log step sizes), 1e-3 for the dense transform and for
learned initial weights.

Measured: held-out quality (median over the held-out tasks of the validation loss, and
accuracy, after K steps; per seed), meta-step time (one meta-step of B tasks, drawing them
included, the methods interleaved in one process after a warm-up, median over repeats; ratio
to ``metascale-layerwise``; extra timing rows: ``metascale-layerwise-func``, the same rule on
the torch.func engine, ``torchopt-metasgd``, a K-step MAML meta-step through
``torchopt.MetaSGD`` at a fixed rate with the gradient w.r.t. the initial weights, and
``draw-tasks``, drawing the B tasks alone), peak memory (growth of peak RSS over the RSS before
one meta-step, the peak reset first, each method in a fresh process), and learned-state size
(meta-parameters). ``--timing-only`` is a diagnostic of the meta-step time alone, with
metascale's rule at momentum 0 (LSLR's plain-SGD rule) on the func engine.

Needs learn2learn (scripts/setup.sh installs it) and, for the torchopt row only, torchopt
(``.venv/bin/python -m pip install -c constraints.txt torchopt``: a benchmark dependency).

    python benchmarks/l2l_head_to_head.py [--problems digits sine] [--seeds 0 1 2] [--jobs 2]
    python benchmarks/l2l_head_to_head.py --timing-only --repeats 20
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import inspect
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import metascale
from metascale.evaluate import BASELINES, train_run, tune_lr, tuning_tasks
from metascale.inner import meta_objective
from metascale.interop.learn2learn import import_learn2learn, learn2learn_spec
from metascale.tasks.base import mlp
from metascale.tasks.digits import load

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "metascale-layerwise"
L2L_METHODS = ("l2l-metasgd", "l2l-lslr", "l2l-learnable-opt", "l2l-learnable-opt-hypergrad", "l2l-metasgd+init")


def has_adaptive() -> bool:
    """Whether this checkout's MetaTrainer takes ``rule="adaptive"``."""
    return "rule" in inspect.signature(metascale.MetaTrainer.__init__).parameters


def methods(adaptive: bool) -> list[str]:
    return ["metascale-layerwise"] + (["metascale-adaptive"] if adaptive else []) + list(L2L_METHODS)


# ----------------------------------------------------------------------------- problems

def make_spec(problem: str):
    """The learn2learn tasksets of ``problem`` as a metascale spec (see the module docstring)."""
    l2l = import_learn2learn()
    tf = l2l.data.transforms
    if problem == "digits":
        x, y = load()
        train = torch.cat([torch.nonzero(y == d).flatten()[: int(0.6 * (y == d).sum())] for d in range(10)])
        test = torch.tensor(sorted(set(range(len(y))) - set(train.tolist())))

        def taskset(idx):
            data = l2l.data.MetaDataset(torch.utils.data.TensorDataset(x[idx], y[idx]))
            return l2l.data.Taskset(data, [tf.NWays(data, n=5), tf.KShots(data, k=30), tf.LoadData(data)])

        return learn2learn_spec(taskset(train), lambda: mlp((64, 32, 5)), kind="classification", support=10,
                                test=taskset(test), base=ROOT / "tasks" / "digits.toml", name="l2l-digits")
    if problem == "sine":
        def taskset(functions, seed, points=110):
            g = torch.Generator().manual_seed(seed)
            amp = 0.1 + 4.9 * torch.rand(functions, 1, generator=g)
            phase = math.pi * torch.rand(functions, 1, generator=g)
            xs = -5 + 10 * torch.rand(functions, points, generator=g)
            data = l2l.data.MetaDataset(
                torch.utils.data.TensorDataset(xs.reshape(-1, 1), (amp * torch.sin(xs - phase)).reshape(-1)),
                indices_to_labels={i: i // points for i in range(functions * points)})
            return l2l.data.Taskset(data, [tf.NWays(data, n=1), tf.KShots(data, k=points), tf.LoadData(data)])

        return learn2learn_spec(taskset(4000, 1), lambda: mlp((1, 40, 40, 1)), kind="regression", support=10,
                                test=taskset(1000, 2), base=ROOT / "tasks" / "sine.toml", name="l2l-sine")
    raise ValueError(f"unknown problem {problem!r}")


# ----------------------------------------------------------------------------- learn2learn methods

class HypergradTransform(torch.nn.Module):
    """learn2learn's hypergradient example transform: ``update = rate * grad``, one rate per
    parameter entry (initialised to 1; LearnableOptimizer's ``lr`` sets the step)."""

    def __init__(self, param):
        super().__init__()
        self.lr = torch.nn.Parameter(torch.ones_like(param))

    def forward(self, grad):
        return self.lr * grad


def accuracy(model, task) -> float | None:
    if task.kind != "classification":
        return None
    with torch.no_grad():
        return float((model(task.x_val).argmax(-1) == task.y_val).double().mean())


class L2LMethod:
    """A learn2learn learner: meta-parameters, the per-task meta-gradient and a held-out run."""

    def __init__(self, name: str, spec, seed: int):
        self.l2l, self.name, self.spec, self.K = import_learn2learn(), name, spec, spec.inner.steps
        torch.manual_seed(seed)  # the dense transform's random init
        opt = spec.rules["optimizer"]
        self.lr0 = opt.init_lr / (1 - opt.momentum)
        template = spec.sampler("train", seed).task(0).make_model()
        rel = spec.meta.lr * self.lr0  # Adam step on a rate: the relative move of Adam on a log rate
        if name in ("l2l-metasgd", "l2l-metasgd+init"):
            self.msgd = self.l2l.algorithms.MetaSGD(template, lr=self.lr0)
            groups = [{"params": list(self.msgd.lrs), "lr": rel}]
            if name == "l2l-metasgd+init":
                groups.append({"params": list(self.msgd.module.parameters()), "lr": 1e-3})
        elif name == "l2l-lslr":
            self.rates = torch.nn.Parameter(torch.full((len(list(template.parameters())), self.K), self.lr0))
            groups = [{"params": [self.rates], "lr": rel}]
        elif name in ("l2l-learnable-opt", "l2l-learnable-opt-hypergrad"):
            dense = name == "l2l-learnable-opt"
            transform = self.l2l.optim.ModuleTransform(torch.nn.Linear) if dense else HypergradTransform
            self.lopt = self.l2l.optim.LearnableOptimizer(template, transform, lr=self.lr0)
            groups = [{"params": list(self.lopt.parameters()), "lr": 1e-3 if dense else spec.meta.lr}]
        else:
            raise ValueError(name)
        self.params = [p for g in groups for p in g["params"]]
        self.adam = torch.optim.Adam(groups)

    # one task: validation losses after each inner step (graphs to the meta-parameters when
    # ``track``), and the adapted model
    def run(self, task, track: bool):
        K, l2l = self.K, self.l2l
        vals = []
        if hasattr(self, "msgd"):
            if self.name == "l2l-metasgd":  # the task's fresh init; only the rates are learned
                with torch.no_grad():
                    for p, q in zip(self.msgd.module.parameters(), task.make_model().parameters()):
                        p.copy_(q)
            learner = self.msgd.clone()
            for t in range(K):
                x, y = task.train_batch(t)
                learner.adapt(task.loss(learner(x), y), first_order=not track)
                vals.append(task.loss(learner(task.x_val), task.y_val))
            return vals, learner
        if hasattr(self, "rates"):
            learner = l2l.clone_module(task.make_model())
            for t in range(K):
                x, y = task.train_batch(t)
                grads = torch.autograd.grad(task.loss(learner(x), y), list(learner.parameters()), create_graph=track)
                l2l.update_module(learner, updates=[-self.rates[i, t] * g for i, g in enumerate(grads)])
                vals.append(task.loss(learner(task.x_val), task.y_val))
            return vals, learner
        raise AssertionError

    def task_meta_grad(self, task):
        """``(meta-loss, [grads])``, or ``None`` when not finite."""
        obj = self.spec.inner.objective
        if hasattr(self, "lopt"):
            # LearnableOptimizer: parameters are detached at every step, so each validation loss
            # L_t reaches the transform through the last update only; the meta-gradient is
            # sum_t d obj / d L_t * d L_t / d theta, where d obj / d L_t is the same for every t
            # (mean, log_mean) or zero before the last step (final, log_final)
            model = task.make_model()
            self.lopt.info["model"] = model
            losses, total = [], [torch.zeros_like(p) for p in self.params]
            for t in range(self.K):
                self.lopt.zero_grad()
                x, y = task.train_batch(t)
                task.loss(model(x), y).backward()
                self.lopt.step()
                val = task.loss(model(task.x_val), task.y_val)
                if obj in ("mean", "log_mean") or t == self.K - 1:
                    g = torch.autograd.grad(val, self.params, retain_graph=True, allow_unused=True)
                    for acc, gi in zip(total, g):
                        if gi is not None:
                            acc.add_(gi)
                losses.append(val.detach())
            leaves = [v.clone().requires_grad_() for v in losses]
            meta = meta_objective(leaves, obj)
            w = torch.autograd.grad(meta, leaves)[-1]
            total = [w * acc for acc in total]
            for p in self.params:
                p.grad = None  # the inner backward passes deposit hypergradients there
        else:
            vals, _ = self.run(task, track=True)
            meta = meta_objective(vals, obj)
            if not torch.isfinite(meta):
                return None
            total = torch.autograd.grad(meta, self.params, allow_unused=True)
            total = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, total)]
        if not torch.isfinite(meta) or not all(torch.isfinite(g).all() for g in total):
            return None
        return float(meta.detach()), total

    def meta_step(self, tasks) -> tuple[float | None, int]:
        """One Adam step on the mean meta-gradient of ``tasks`` (clipped as metascale clips)."""
        sums, losses = [torch.zeros_like(p, dtype=torch.float64) for p in self.params], []
        for task in tasks:
            out = self.task_meta_grad(task)
            if out is None:
                continue
            losses.append(out[0])
            for s, g in zip(sums, out[1]):
                s.add_(g.double())
        if losses:
            mean = [s / len(losses) for s in sums]
            norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(m) for m in mean])))
            clip = self.spec.meta.clip
            coef = min(1.0, clip / (norm + 1e-6)) if clip > 0 else 1.0
            for p, m in zip(self.params, mean):
                p.grad = (m * coef).to(p.dtype)
            self.adam.step()
            self.adam.zero_grad(set_to_none=True)
        return (sum(losses) / len(losses) if losses else None), len(tasks) - len(losses)

    def heldout(self, task) -> tuple[float, float | None]:
        """Validation loss and accuracy after K steps on ``task`` (meta-parameters frozen)."""
        if hasattr(self, "lopt"):
            model = task.make_model()
            self.lopt.info["model"] = model
            for t in range(self.K):
                self.lopt.zero_grad()
                x, y = task.train_batch(t)
                loss = task.loss(model(x), y)
                if not torch.isfinite(loss):
                    return math.inf, None
                loss.backward()
                self.lopt.step()
                for p in model.parameters():  # cut the graph: nothing is meta-learned here
                    p.detach_().requires_grad_()
            for p in self.params:
                p.grad = None
        else:
            vals, model = self.run(task, track=False)
        with torch.no_grad():
            v = float(task.loss(model(task.x_val), task.y_val))
        return (v if math.isfinite(v) else math.inf), accuracy(model, task)

    def state_numel(self) -> int:
        return sum(p.numel() for p in self.params)


# ----------------------------------------------------------------------------- one (problem, seed)

def metascale_trainer(spec, seed: int, rule: str, meta_steps: int | None = None, engine: str | None = None):
    kw = {"rule": "adaptive"} if rule == "adaptive" else {}
    if engine:
        spec = dataclasses.replace(spec, inner=dataclasses.replace(spec.inner, engine=engine))
    return metascale.MetaTrainer(spec, seed=seed, device="cpu", progress=False, meta_steps=meta_steps, **kw)


def quality(problem: str, seed: int, names: list[str], n_heldout: int, meta_steps: int | None) -> dict:
    """Meta-train every method on ``problem`` with ``seed``; held-out results per method."""
    torch.set_num_threads(1)
    spec = make_spec(problem)
    if meta_steps is not None:
        spec = dataclasses.replace(spec, meta=dataclasses.replace(spec.meta, steps=meta_steps))
    K, B = spec.inner.steps, spec.meta.batch_size
    test = spec.sampler("test", seed).tasks(n_heldout)
    out = {}

    def row(losses, accs, **extra):
        accs = [a for a in accs if a is not None]
        r = {"median_val_loss": float(np.median(losses)), "q25": float(np.percentile(losses, 25)),
             "q75": float(np.percentile(losses, 75)), "val_losses": losses, **extra}
        if accs:
            r["median_accuracy"] = float(np.median(accs))
        return r

    for name in names:
        t0 = time.time()
        if name.startswith("metascale-"):
            with tempfile.TemporaryDirectory() as d:
                res = metascale_trainer(spec, seed, name.split("-", 1)[1]).train(Path(d) / "metrics.jsonl")
                lines = [json.loads(s) for s in (Path(d) / "metrics.jsonl").read_text().splitlines()]
                path = metascale.save_optimizer(Path(d) / "o.safetensors", res.meta, res.rule, spec.to_dict(),
                                                res.summary)
                runs = [train_run(t, lambda p: metascale.load_optimizer(path, p), K) for t in test]
            out[name] = row([r[0][-1] for r in runs], [r[1] for r in runs],
                            meta_train_s=round(time.time() - t0, 1), skipped_tasks=res.summary["skipped_tasks"],
                            first_meta_loss=lines[0]["meta_loss"], last_meta_loss=lines[-1]["meta_loss"],
                            state_numel=sum(v.numel() for v in res.meta.values()))
        else:
            m = L2LMethod(name, spec, seed)
            sampler, hist, skipped = spec.sampler("train", seed), [], 0
            for step in range(spec.meta.steps):
                loss, sk = m.meta_step([sampler.task(step * B + j) for j in range(B)])
                hist.append(loss)
                skipped += sk
            runs = [m.heldout(t) for t in test]
            done = [h for h in hist if h is not None]
            out[name] = row([r[0] for r in runs], [r[1] for r in runs], meta_train_s=round(time.time() - t0, 1),
                            skipped_tasks=skipped, first_meta_loss=done[0] if done else None,
                            last_meta_loss=done[-1] if done else None, state_numel=m.state_numel())
        print(f"  {problem}/seed{seed} {name}: {out[name]['median_val_loss']:.4g} "
              f"({out[name]['meta_train_s']} s)", flush=True)
    lr, _ = tune_lr(BASELINES["adam"], tuning_tasks(spec, seed), K, spec.evaluate.grid())
    runs = [train_run(t, lambda p: BASELINES["adam"](p, lr), K) for t in test]
    out["adam-tuned"] = row([r[0][-1] for r in runs], [r[1] for r in runs], tuned_lr=lr, state_numel=0)
    return out


# ----------------------------------------------------------------------------- speed and memory

def torchopt_meta_step(tasks, K: int, lr: float, objective: str) -> None:
    """A MAML meta-step through torchopt.MetaSGD (fixed rate; gradient w.r.t. the init)."""
    import torchopt
    for task in tasks:
        net = task.make_model()
        init = list(net.parameters())
        opt = torchopt.MetaSGD(net, lr=lr)
        vals = []
        for t in range(K):
            x, y = task.train_batch(t)
            opt.step(task.loss(net(x), y))
            vals.append(task.loss(net(task.x_val), task.y_val))
        torch.autograd.grad(meta_objective(vals, objective), init)


def step_fn(name: str, spec, seed: int):
    """A callable running one meta-step of ``name`` on draws 0..B-1, the draws included (as in
    MetaTrainer); ``draw-tasks`` only draws them."""
    def tasks():
        return spec.sampler("train", seed).tasks(spec.meta.batch_size)
    if name == "metascale-layerwise-func":  # the same rule and numbers on the torch.func engine
        return lambda: metascale_trainer(spec, seed, "layerwise", meta_steps=1, engine="func").train()
    if name in ("metascale-sgd-rule-func", "metascale-sgd-rule-higher"):  # momentum 0: LSLR's plain-SGD rule
        plain = spec.with_table("optimizer", dataclasses.replace(spec.rules["optimizer"], momentum=0.0))
        engine = name.rsplit("-", 1)[1]
        return lambda: metascale_trainer(plain, seed, "layerwise", meta_steps=1, engine=engine).train()
    if name.startswith("metascale-"):
        rule = name.split("-", 1)[1]
        return lambda: metascale_trainer(spec, seed, rule, meta_steps=1).train()
    if name == "torchopt-metasgd":
        lr0 = spec.rules["optimizer"].init_lr / (1 - spec.rules["optimizer"].momentum)
        return lambda: torchopt_meta_step(tasks(), spec.inner.steps, lr0, spec.inner.objective)
    if name == "draw-tasks":
        return tasks
    m = L2LMethod(name, spec, seed)
    return lambda: m.meta_step(tasks())


def timing(problem: str, names: list[str], repeats: int) -> dict:
    """Median wall time of one meta-step per method, interleaved in this process."""
    torch.set_num_threads(1)
    spec = make_spec(problem)
    # one meta-step each: the selection guard ([meta] select_every) measures 16 more tasks after
    # the last meta-step of a run, which is not part of a meta-step
    spec = dataclasses.replace(spec, meta=dataclasses.replace(spec.meta, select_every=0))
    fns = {n: step_fn(n, spec, 0) for n in names}
    for f in fns.values():  # warm-up
        f()
    times = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(repeats):
        metascale_trainer(spec, 0, "layerwise", meta_steps=0).train()
    setup = (time.perf_counter() - t0) / repeats
    base = statistics.median(times[BASELINE])
    return {"repeats": repeats, "metascale_setup_ms": round(1000 * setup, 2),
            "methods": {n: {"median_ms": round(1000 * statistics.median(ts), 2),
                            "ratio": round(statistics.median(ts) / base, 3),
                            "times_ms": [round(1000 * t, 2) for t in ts]} for n, ts in times.items()}}


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field (``VmRSS``, ``VmHWM``) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def memory_child(problem: str, name: str) -> None:
    """Peak RSS growth of one meta-step: the peak (VmHWM) is reset to the current RSS first
    (``/proc/self/clear_refs``), so building the data sets earlier cannot hide it."""
    torch.set_num_threads(1)
    spec = make_spec(problem)
    fn = step_fn(name, spec, 0)
    Path("/proc/self/clear_refs").write_text("5")
    base = status_kib("VmRSS")
    fn()
    peak = status_kib("VmHWM")
    print(json.dumps({"base_kib": base, "peak_kib": peak, "growth_mib": round((peak - base) / 1024, 1)}))


def memory(problem: str, names: list[str]) -> dict:
    out = {}
    for n in names:
        proc = subprocess.run([sys.executable, __file__, "--memory-child", problem, n], capture_output=True,
                              text=True, check=True)
        out[n] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


# ----------------------------------------------------------------------------- report

def table(problem: str, res: dict, seeds: list[int]) -> str:
    q = res["quality"]
    names = list(q[str(seeds[0])])
    acc = "median_accuracy" in q[str(seeds[0])][names[0]]
    head = ["method", "held-out val loss after K (median per seed)"] + (["accuracy (median per seed)"] if acc else []) \
        + ["meta-step ms", "vs layerwise", "peak RSS growth MiB", "learned state"]
    lines = [f"**{problem}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    timing_rows, mem = res.get("timing", {}).get("methods", {}), res.get("memory", {})
    for n in names + [k for k in timing_rows if k not in names]:
        cells = [n]
        if n in names:
            cells.append(" / ".join(f"{q[str(s)][n]['median_val_loss']:.4g}" for s in seeds))
            if acc:
                cells.append(" / ".join(f"{q[str(s)][n].get('median_accuracy', float('nan')):.3f}" for s in seeds))
        else:
            cells += ["-"] * (2 if acc else 1)
        t = timing_rows.get(n)
        cells += [f"{t['median_ms']:.0f}" if t else "-", f"{t['ratio']:.2f}" if t else "-"]
        cells.append(f"{mem[n]['growth_mib']:.1f}" if n in mem else "-")
        numel = q[str(seeds[0])][n]["state_numel"] if n in names else None
        cells.append("-" if not numel else f"{numel:,} ({4 * numel / 1024:,.1f} KiB)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", nargs="+", default=["digits", "sine"], choices=["digits", "sine"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--heldout", type=int, default=50, help="held-out tasks per seed")
    ap.add_argument("--meta-steps", type=int, default=None, help="override the specs' meta-steps (all methods)")
    ap.add_argument("--repeats", type=int, default=10, help="timing repeats")
    ap.add_argument("--adaptive", choices=["auto", "yes", "no"], default="auto",
                    help="include metascale-adaptive (auto: when MetaTrainer takes rule=)")
    ap.add_argument("--no-torchopt", action="store_true", help="leave out the torchopt timing row")
    ap.add_argument("--jobs", type=int, default=2, help="parallel processes for the quality runs (1 thread each)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "l2l_head_to_head.json"))
    ap.add_argument("--timing-only", action="store_true",
                    help="diagnostic: only the meta-step times of metascale's layer-wise rule (higher, func, and "
                         "func with momentum 0) against l2l's MetaSGD and LSLR and torchopt; default --out "
                         "benchmarks/results/l2l_head_to_head_timing.json")
    ap.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        return memory_child(*args.memory_child)
    if args.timing_only:
        names = ["metascale-layerwise", "metascale-layerwise-func", "metascale-sgd-rule-func",
                 "metascale-sgd-rule-higher", "l2l-lslr", "l2l-metasgd", "torchopt-metasgd", "draw-tasks"]
        out = {p: timing(p, names, args.repeats) for p in args.problems}
        path = Path(args.out if "--out" in sys.argv else ROOT / "benchmarks" / "results" / "l2l_head_to_head_timing.json")
        path.write_text(json.dumps({"command": "python benchmarks/l2l_head_to_head.py " + " ".join(sys.argv[1:]),
                                    "results": out}, indent=1))
        for p, r in out.items():
            print(p, {n: (m["median_ms"], m["ratio"]) for n, m in r["methods"].items()})
        return
    adaptive = has_adaptive() if args.adaptive == "auto" else args.adaptive == "yes"
    names = methods(adaptive)
    timed = names[:1] + ["metascale-layerwise-func"] + names[1:] + ([] if args.no_torchopt else ["torchopt-metasgd"]) \
        + ["draw-tasks"]
    t_start = time.time()
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(args.jobs) as ex:
        futs = {(p, s): ex.submit(quality, p, s, names, args.heldout, args.meta_steps)
                for p in args.problems for s in args.seeds}
        results = {p: {"quality": {str(s): futs[(p, s)].result() for s in args.seeds}} for p in args.problems}
    for p in args.problems:
        print(f"timing {p}", flush=True)
        results[p]["timing"] = timing(p, timed, args.repeats)
        print(f"memory {p}", flush=True)
        results[p]["memory"] = memory(p, timed)
    cmd = "python benchmarks/l2l_head_to_head.py " + " ".join(sys.argv[1:])
    versions = {k: importlib.metadata.version(k) for k in ("torch", "learn2learn", "numpy")}
    try:
        versions["torchopt"] = importlib.metadata.version("torchopt")
    except importlib.metadata.PackageNotFoundError:
        pass
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": cmd.strip(), "versions": versions, "adaptive_included": adaptive,
                                          "seeds": args.seeds, "heldout_tasks": args.heldout,
                                          "wall_s": round(time.time() - t_start), "results": results}, indent=1))
    for p in args.problems:
        print(table(p, results[p], args.seeds) + "\n")
    if not adaptive:
        print("metascale-adaptive: not included (this checkout's MetaTrainer has no rule=); re-run with it to add the row")
    print(f"wrote {args.out} ({round(time.time() - t_start)} s)")


if __name__ == "__main__":
    main()
