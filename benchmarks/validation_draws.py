"""Meta-train validation measure of optimizers: the spec's meta-objective (its ``[inner]``
objective and ``tail``, over the whole horizon of ``windows * steps`` inner steps) on fixed
meta-train draws that no meta-training step used. Design choices for the shipped optimizer are
made on this measure, never on the held-out suite.

    OMP_NUM_THREADS=1 python benchmarks/validation_draws.py --spec tasks/long_mixture.toml \
        untrained mix1k-v1 runs/x/optimizer.safetensors --draws 12 --jobs 2 --out results.json

``--windows N`` measures at another horizon (``N * steps``) on the same draws, e.g. ``--windows
250`` for T = 5,000 on a spec of 50 windows of 20 steps. ``--tail F`` weighs the last fraction
``F`` of the run's windows instead of the spec's ``[inner] tail``: ``--tail 1`` counts the whole
run, so reaching a low loss early (speed) counts as well as ending low.

``untrained`` is the spec's ``--rule`` before meta-training (``--time-eta a,b,...`` sets its
learned ``t/T`` schedule of log step-size offsets by hand: a hand-designed decay to compare
with). The draws are those of the trainer's selection measure
(:func:`metascale.meta.trainer.selection_sampler`, seed ``--seed``), so lower is better and the
values compare with a run's ``selection_loss``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time

import torch

from metascale.export import read_optimizer
from metascale.meta.estimators import windows_objective
from metascale.meta.trainer import selection_sampler
from metascale.optim import get_rule
from metascale.parallel import map_jobs
from metascale.spec import load_spec


def _candidate(name: str, spec, rule: str, time_eta: list[float] | None):
    """``(rule config, meta-parameters)`` of ``name``."""
    if name != "untrained":
        exp = read_optimizer(name)
        return exp.config, exp.meta
    r = get_rule(rule)
    cfg = r.resolve(spec.rule_config(rule), spec.inner.horizon)
    if time_eta is not None:
        cfg = dataclasses.replace(cfg, time_knots=len(time_eta))
    meta = r.init_meta(cfg, spec.inner.horizon, seed=0)
    if time_eta is not None:
        meta["time"][0] = torch.tensor(time_eta)
    return cfg, meta


def _one(item: dict) -> float:
    spec = load_spec(item["spec"])
    cfg, meta = _candidate(item["name"], spec, item["rule"], item["time_eta"])
    task = selection_sampler(spec, item["seed"]).task(item["draw"])
    inner = spec.inner
    if item["windows"] is not None:
        inner = dataclasses.replace(inner, windows=item["windows"])
    if item["tail"] is not None:
        inner = dataclasses.replace(inner, tail=item["tail"])
    with torch.no_grad():
        value, _ = windows_objective(task, meta, cfg, inner, None)
    return value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("optimizers", nargs="+", help="exported files, pretrained names, or 'untrained'")
    ap.add_argument("--spec", required=True)
    ap.add_argument("--rule", default="adaptive-momentum", help="the rule of 'untrained' (default %(default)s)")
    ap.add_argument("--time-eta", help="comma-separated log step-size offsets at evenly spaced t/T knots for "
                                       "'untrained' (a hand-set decay)")
    ap.add_argument("--windows", type=int, help="windows per run instead of the spec's [inner] windows (the "
                                                   "horizon is windows * steps; the draws stay the same)")
    ap.add_argument("--tail", type=float, help="fraction of the run's windows the measure weighs instead of the "
                                               "spec's [inner] tail (1 = the whole run)")
    ap.add_argument("--draws", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out")
    args = ap.parse_args()
    time_eta = [float(x) for x in args.time_eta.split(",")] if args.time_eta else None
    items = [{"spec": args.spec, "name": n, "rule": args.rule, "time_eta": time_eta, "seed": args.seed, "draw": d,
              "windows": args.windows, "tail": args.tail}
             for n in args.optimizers for d in range(args.draws)]
    t0 = time.time()
    values = map_jobs(_one, items, args.jobs)
    out = {"spec": args.spec, "windows": args.windows, "tail": args.tail, "draws": args.draws, "seed": args.seed,
           "time_eta": time_eta, "results": {}}
    for k, n in enumerate(args.optimizers):
        v = values[k * args.draws:(k + 1) * args.draws]
        finite = [x for x in v if math.isfinite(x)]
        mean = sum(finite) / len(finite) if len(finite) == len(v) else math.inf
        out["results"][n] = {"mean": mean, "per_draw": v}
        print(f"{n:<50} {mean:+.4f}  ({len(v) - len(finite)} not finite)")
    out["wall_s"] = time.time() - t0
    if args.out:
        json.dump(out, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
