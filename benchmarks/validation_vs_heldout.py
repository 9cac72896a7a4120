"""How well a validation measure ranks optimizers on held-out tasks: the Spearman rank
correlation, over optimizer files, of a ``validation_draws.py`` figure with each held-out task's
normalised final loss (``pretrained_heldout.py``), and a scatter plot per chosen task.

    python benchmarks/validation_vs_heldout.py \
        --validation benchmarks/results/validation_small_data_round6.json ... \
        --heldout mix1k5k-v5=benchmarks/results/tail1_s5_heldout.json ... \
        --tasks mnist1d_mlp_T5k mnist8_mlp_T10k mnist8_cnn_T5k \
        --out benchmarks/results/validation_vs_heldout.json --plot docs/images/validation_vs_heldout.png

``--validation`` files are merged by optimizer key (the names ``validation_draws.py`` was
given); ``--heldout KEY=FILE`` pairs each key with its held-out result. Both figures are
"lower is better", so a positive correlation means the validation measure orders the files
as the held-out task does. The correlation is also given without ``--drop`` keys (e.g. an
untrained rule far from the rest, which can make any measure look predictive).
"""
from __future__ import annotations

import argparse
import json

from scipy.stats import spearmanr


def _label(key: str) -> str:
    """A run's folder for ``runs/NAME/optimizer.safetensors``; the key otherwise."""
    parts = key.rstrip("/").split("/")
    return parts[-2] if len(parts) > 1 and parts[-1] == "optimizer.safetensors" else key


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--validation", nargs="+", required=True, help="validation_draws.py result files")
    ap.add_argument("--heldout", nargs="+", required=True, metavar="KEY=FILE",
                    help="optimizer key (as in the validation files) = its pretrained_heldout.py result")
    ap.add_argument("--tasks", nargs="*", default=[], help="held-out tasks to plot (all are correlated)")
    ap.add_argument("--drop", nargs="*", default=["untrained"], help="keys left out of the second correlation")
    ap.add_argument("--out")
    ap.add_argument("--plot")
    args = ap.parse_args()
    val: dict[str, float] = {}
    for path in args.validation:
        for key, r in json.load(open(path))["results"].items():
            val[key] = r["mean"]
    held: dict[str, dict] = {}
    for pair in args.heldout:
        key, sep, path = pair.partition("=")
        if not sep or key not in val:
            raise SystemExit(f"--heldout {pair!r}: expected KEY=FILE with KEY one of the validation keys {sorted(val)}")
        held[key] = {t: r["normalised_loss"] for t, r in json.load(open(path))["summary"]["tasks"].items()}
    keys = list(held)
    tasks = list(held[keys[0]])
    unknown = [t for t in args.tasks if t not in tasks]
    if unknown:
        raise SystemExit(f"--tasks {unknown}: not held-out tasks; choose from {tasks}")
    kept = [k for k in keys if k not in args.drop]
    out = {"validation": args.validation, "heldout": dict(p.partition("=")[::2] for p in args.heldout),
           "validation_mean": {k: val[k] for k in keys}, "tasks": {}}
    print(f"{len(keys)} files; Spearman rank correlation of the validation figure with held-out normalised loss")
    for t in tasks:
        rho = float(spearmanr([val[k] for k in keys], [held[k][t] for k in keys]).correlation)
        rho_kept = float(spearmanr([val[k] for k in kept], [held[k][t] for k in kept]).correlation)
        out["tasks"][t] = {"spearman": rho, "spearman_without_dropped": rho_kept,
                           "normalised_loss": {k: held[k][t] for k in keys}}
        print(f"  {t:<22} {rho:+.2f}   without {', '.join(args.drop) or '-'}: {rho_kept:+.2f}")
    if args.out:
        json.dump(out, open(args.out, "w"), indent=1)
    if args.plot and args.tasks:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
        fig, axes = plt.subplots(1, len(args.tasks), figsize=(4.2 * len(args.tasks), 3.8), squeeze=False)
        for ax, t in zip(axes[0], args.tasks):
            xs, ys = [val[k] for k in keys], [held[k][t] for k in keys]
            ax.scatter(xs, ys, s=22)
            for k, x, y in zip(keys, xs, ys):
                ax.annotate(_label(k), (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%.1f"))
            ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%.1f"))
            ax.set_xlabel("validation figure (lower is better)")
            ax.set_ylabel("held-out loss / tuned AdamW's")
            ax.set_title(f"{t}: Spearman {out['tasks'][t]['spearman']:+.2f}", fontsize=9)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=130)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
