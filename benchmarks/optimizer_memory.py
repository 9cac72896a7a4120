"""Optimizer state and peak training memory: the adaptive rule against torch and third-party optimizers.

For MLPs of about 1M to 50M parameters (4 ``Linear(w, w)`` layers with ReLU between them,
float32, CPU, 1 thread) and every optimizer below, each (optimizer, size) runs in a **fresh
child process** forked from a parent that has imported everything and stepped every
optimizer once on a tiny model (so lazy imports and first-call code paths are loaded before
the fork and are the same for every child). The child builds the model and a fixed batch
(64 x w, MSE to a random target), then runs ``--steps`` training steps
(``zero_grad(set_to_none=True)``, forward, backward, ``opt.step()``). Reported per run:

* **optimizer state bytes** after the steps, counted exactly: the ``nbytes`` of every tensor
  in ``optimizer.state`` (each storage once), plus 8 bytes for every non-tensor number in
  ``optimizer.state`` (the adaptive rule's per-group ``step``, ``avg_sq_grad``,
  ``first_sq_grad``; Prodigy's ``step``) and 8 bytes for every per-group scalar that the
  optimizer keeps *as state* in ``param_groups`` (:data:`GROUP_STATE`: Prodigy's ``d`` and
  friends, Schedule-Free's ``k`` and weight sums, metascale's ``last_step_size`` /
  ``last_scale``); the script checks that no other group entry changes during the run.
  Hyperparameters (``lr``, ``betas``) are not state. The meta-parameters a learned optimizer
  carries (the layer-wise schedules, the adaptive network) are listed separately.
* **peak memory growth**: the child's ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` at the
  end minus its resident memory (``/proc/self/statm``) just before the model is built. Before
  that baseline the child runs the same optimizer for 2 steps on an 8-wide MLP: a forked child
  does not inherit the parent's page-table entries for shared-library code, so the first call
  of every code path adds its code pages to the resident set, a few MiB that differ by
  optimizer and are no training memory. (A fresh interpreter is no better: its import-time
  peak is above the whole training peak of the small models.) Also the same run without
  ``opt.step()`` (``none``: forward + backward only, gradients kept as in the other runs), so
  that ``growth - growth(none)`` is what the optimizer adds: state plus the temporaries of
  its step. By default (``--malloc fixed``) glibc's mmap threshold is pinned at 128 KiB, so
  every tensor of that size or more is its own mapping, unmapped when freed, and the peak
  follows the live tensors; with glibc's default adaptive threshold (``--malloc default``)
  heap reuse adds tens of MiB of slack that changes from run to run.

Optimizers: ``sgd`` (no momentum), ``sgd_momentum`` (0.9, foreach), ``adam`` (foreach),
``adafactor`` (torch.optim.Adafactor), ``prodigy`` (prodigyopt.Prodigy), ``schedulefree_adamw``
(schedulefree.AdamWScheduleFree, train mode), and metascale's frozen rules with untrained
meta-parameters from ``tasks/sine.toml`` (cost and memory do not depend on their values):
``layerwise`` (static, momentum 0.9), ``adaptive`` (state-free) and ``adaptive_momentum``.

    python benchmarks/optimizer_memory.py [--widths 512 1120 1584 2500 3536] [--steps 5] [--batch 64]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OPTIMIZERS = ("sgd", "sgd_momentum", "adam", "adafactor", "prodigy", "schedulefree_adamw", "layerwise", "adaptive",
              "adaptive_momentum")
# param_groups entries that an optimizer updates as state (8 bytes each); everything else in a group is a hyperparameter
GROUP_STATE = {
    "prodigy": ("d", "d_max", "d_numerator", "d_denom", "d_hat", "k"),
    "schedulefree_adamw": ("k", "weight_sum", "lr_max", "scheduled_lr"),
    "layerwise": ("last_step_size", "last_scale"),
    "adaptive": ("last_step_size", "last_scale"),
    "adaptive_momentum": ("last_step_size", "last_scale"),
}


def make_optimizer(name: str, params, steps: int):
    """The optimizer ``name`` on ``params`` (``steps``: the adaptive rule's training budget)."""
    import torch
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.01)
    if name == "sgd_momentum":
        return torch.optim.SGD(params, lr=0.01, momentum=0.9, foreach=True)
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3, foreach=True)
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=1e-2)
    if name == "prodigy":
        import prodigyopt
        return prodigyopt.Prodigy(params, lr=1.0)
    if name == "schedulefree_adamw":
        import schedulefree
        opt = schedulefree.AdamWScheduleFree(params, lr=1e-3)
        opt.train()
        return opt
    import metascale
    from metascale.optim import RULES, LearnedOptimizer
    spec = metascale.load_spec(ROOT / "tasks" / "sine.toml")
    rule = name.replace("_", "-")
    config = spec.rule_config(rule)
    meta = RULES[rule].init_meta(config, spec.inner.horizon)
    return LearnedOptimizer(params, meta, config, total_steps=steps)


def make_mlp(width: int, layers: int = 4):
    import torch
    mods = []
    for i in range(layers):
        mods.append(torch.nn.Linear(width, width))
        if i < layers - 1:
            mods.append(torch.nn.ReLU())
    return torch.nn.Sequential(*mods)


def state_bytes(name: str, opt, groups_before: list[dict]) -> dict:
    """Exact optimizer-state bytes (see the module doc for what is counted)."""
    import torch
    tensor_bytes, number_bytes, seen = 0, 0, set()
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                key = (v.untyped_storage().data_ptr(), v.storage_offset(), v.nbytes)
                if key not in seen:
                    seen.add(key)
                    tensor_bytes += v.nbytes
            elif isinstance(v, (int, float)):
                number_bytes += 8
            else:
                raise TypeError(f"{name}: unexpected state entry of type {type(v).__name__}")
    keys = GROUP_STATE.get(name, ())
    group_bytes = 0
    for before, group in zip(groups_before, opt.param_groups):
        changed = {k for k, v in group.items() if k != "params" and (k not in before or before[k] != v)}
        if not changed <= set(keys):
            raise RuntimeError(f"{name}: group entries {sorted(changed - set(keys))} change but are not counted")
        group_bytes += 8 * sum(1 for k in keys if k in group)
    meta_bytes = 0
    if hasattr(opt, "net"):  # adaptive: the shared network
        meta_bytes = sum(t.nbytes for t in opt.net.values())
    elif name == "layerwise":  # static: per-group schedules, stored as float tuples
        meta_bytes = 8 * sum(len(g["step_sizes"]) + len(g["scales"]) for g in opt.param_groups)
    return {"tensor_bytes": tensor_bytes, "number_bytes": number_bytes, "group_scalar_bytes": group_bytes,
            "state_bytes": tensor_bytes + number_bytes + group_bytes, "meta_param_bytes": meta_bytes}


def resident_kib() -> int:
    """The process's current resident memory (KiB), from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def train(model, opt, x, y, steps: int) -> float:
    import torch
    loss = None
    for _ in range(steps):
        for p in model.parameters():
            p.grad = None
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        if opt is not None:
            opt.step()
    return float(loss.detach())


def measure(name: str, width: int, steps: int, batch: int) -> dict:
    """One (optimizer, size) run; call it in a fresh (forked) process."""
    import torch
    fork_rss = resident_kib()
    # the same optimizer on a tiny model first: it faults in the code pages this run executes
    # (a forked child does not inherit the parent's page-table entries for shared libraries)
    tiny = make_mlp(8)
    train(tiny, None if name == "none" else make_optimizer(name, tiny.parameters(), steps),
          torch.randn(4, 8), torch.randn(4, 8), 2)
    del tiny
    gc.collect()
    base = resident_kib()
    torch.manual_seed(0)
    model = make_mlp(width)
    x, y = torch.randn(batch, width), torch.randn(batch, width)
    n_params = sum(p.numel() for p in model.parameters())
    opt = None if name == "none" else make_optimizer(name, model.parameters(), steps)
    groups_before = [] if opt is None else [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    t0 = time.perf_counter()
    loss = train(model, opt, x, y, steps)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    row = {"optimizer": name, "width": width, "params": n_params, "param_bytes": 4 * n_params,
           "fork_rss_kib": fork_rss, "base_rss_kib": base, "peak_kib": peak, "growth_kib": peak - base,
           "seconds": round(seconds, 2), "final_loss": loss}
    if opt is not None:
        row.update(state_bytes(name, opt, groups_before))
    return row


def in_fresh_process(fn, *args) -> dict:
    """Run ``fn(*args)`` in a forked child and return its JSON-able result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns
        os.close(r)
        code = 0
        try:
            out = {"ok": fn(*args)}
        except BaseException as e:  # report it to the parent, which raises
            out, code = {"error": f"{type(e).__name__}: {e}"}, 1
        with os.fdopen(w, "w") as f:
            f.write(json.dumps(out))
        os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        data = f.read()
    os.waitpid(pid, 0)
    out = json.loads(data) if data else {"error": "child died without a result"}
    if "error" in out:
        raise RuntimeError(f"{fn.__name__}{args}: {out['error']}")
    return out["ok"]


def pin_mmap_threshold(nbytes: int) -> None:
    """``mallopt(M_MMAP_THRESHOLD, nbytes)``: allocations of ``nbytes`` or more are mmapped and
    unmapped on free (setting it also turns off glibc's dynamic threshold)."""
    import ctypes
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    if not libc.mallopt(M_MMAP_THRESHOLD, nbytes) or not libc.mallopt(M_TRIM_THRESHOLD, nbytes):
        raise RuntimeError("mallopt failed")


def warm_up(names) -> None:
    """Import and step every optimizer once on a tiny model, so the children start equal."""
    import torch
    for name in names:
        model = make_mlp(8)
        opt = make_optimizer(name, model.parameters(), 2)
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            model(torch.randn(4, 8)).square().mean().backward()
            opt.step()
    gc.collect()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[512, 1120, 1584, 2500, 3536],
                    help="MLP widths (4 x (w^2 + w) parameters: 1.05M, 5.0M, 10.0M, 25.0M, 50.0M)")
    ap.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "optimizer_memory.json"))
    ap.add_argument("--malloc", choices=("fixed", "default"), default="fixed",
                    help="fixed: glibc mmap threshold pinned at 128 KiB (every tensor of 128 KiB or more is its "
                         "own mapping, returned on free), so the peak tracks live tensors; default: glibc's "
                         "adaptive threshold, whose heap reuse adds run-to-run slack of tens of MiB")
    args = ap.parse_args()
    if args.malloc == "fixed":
        pin_mmap_threshold(128 * 1024)
    import torch
    torch.set_num_threads(1)  # before any op: no OpenMP pool exists at the forks
    t_start = time.time()
    warm_up(args.optimizers)
    rows = []
    for width in args.widths:
        for name in ["none", *args.optimizers]:
            rows.append(in_fresh_process(measure, name, width, args.steps, args.batch))
            print(f"  {name:<20} w={width:<5} growth {rows[-1]['growth_kib'] / 1024:8.1f} MiB", file=sys.stderr)
    by = {(r["width"], r["optimizer"]): r for r in rows}
    for r in rows:
        none = by[(r["width"], "none")]
        r["peak_mib"] = r["peak_kib"] / 1024
        r["growth_mib"] = r["growth_kib"] / 1024
        r["growth_over_none_mib"] = (r["growth_kib"] - none["growth_kib"]) / 1024
        if r["optimizer"] != "none":
            adam = by.get((r["width"], "adam"))
            if adam is not None:
                r["state_fraction_of_adam"] = r["state_bytes"] / adam["state_bytes"]
            r["state_per_param_bytes"] = r["state_bytes"] / r["params"]
    names = [n for n in args.optimizers]
    print(f"\nOptimizer state after {args.steps} steps: MiB (fraction of Adam's); exact bytes in the JSON")
    print("| optimizer | " + " | ".join(f"{by[(w, 'none')]['params'] / 1e6:.1f}M" for w in args.widths)
          + " | bytes / parameter | meta-params held (B) |")
    print("|---" * (len(args.widths) + 3) + "|")
    for n in names:
        cells = []
        for w in args.widths:
            r = by[(w, n)]
            frac = r.get("state_fraction_of_adam")
            cells.append(f"{r['state_bytes'] / 2**20:.2f} ({frac:.4g})" if frac is not None else f"{r['state_bytes'] / 2**20:.2f}")
        last = by[(args.widths[-1], n)]
        print(f"| {n} | " + " | ".join(cells) + f" | {last['state_per_param_bytes']:.4g} | {last['meta_param_bytes']} |")
    print(f"\nPeak memory growth of {args.steps} training steps, batch {args.batch}: MiB over the resident memory "
          "before the model was built (increment over the run with no step)")
    print("| optimizer | " + " | ".join(f"{by[(w, 'none')]['params'] / 1e6:.1f}M" for w in args.widths) + " |")
    print("|---" * (len(args.widths) + 1) + "|")
    for n in ["none", *names]:
        cells = [f"{by[(w, n)]['growth_mib']:.1f}" + ("" if n == "none" else f" ({by[(w, n)]['growth_over_none_mib']:+.1f})")
                 for w in args.widths]
        print(f"| {n} | " + " | ".join(cells) + " |")
    result = {"command": " ".join(["python benchmarks/optimizer_memory.py", *sys.argv[1:]]),
              "torch": torch.__version__, "machine": platform.machine(), "python": platform.python_version(),
              "threads": 1, "malloc": args.malloc, "fork_rss_kib": sorted({r["fork_rss_kib"] for r in rows}), "steps": args.steps, "batch": args.batch, "widths": args.widths,
              "group_state_keys": {k: list(v) for k, v in GROUP_STATE.items()},
              "wall_s": round(time.time() - t_start, 1), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out} ({result['wall_s']} s)")


if __name__ == "__main__":
    main()
