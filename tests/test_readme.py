"""The README reproduces (issue 16): scripts/run.sh meta-trains the command line's default rule,
the README's main-job table and its spread are the ones benchmarks/quickstart_spread.py recorded
(benchmarks/results/quickstart_spread.json), and no message names an install command that fails."""
import json
import re
from pathlib import Path

from metascale.cli import build_parser
from metascale.optim import DEFAULT_RULE

REPO = Path(__file__).parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")
SPREAD = json.loads((REPO / "benchmarks" / "results" / "quickstart_spread.json").read_text(encoding="utf-8"))


def test_run_sh_and_the_command_line_default_agree():
    run_sh = (REPO / "scripts" / "run.sh").read_text(encoding="utf-8")
    assert "--rule" not in run_sh.replace('RULE_ARGS=(--rule "$RULE")', "")  # only when RULE is set
    meta_train = build_parser()._subparsers._group_actions[0].choices["meta-train"]
    assert {a.dest: a.default for a in meta_train._actions}["rule"] == DEFAULT_RULE
    assert f"meta-trains the command line's default rule, `{DEFAULT_RULE}`" in README


def test_readme_table_and_spread_are_the_recorded_runs():
    runs = SPREAD["rules"][DEFAULT_RULE]["runs"]
    first = runs[0]
    assert (first["seed"], first["threads"]) == (0, 1)
    row = re.search(r"^learned +- +([0-9.]+) +([0-9.]+) +(\d+|never) +(\d+)%", README, re.M)
    assert row, "the README's main-job table has a learned row"
    assert float(row.group(1)) == round(first["learned_median"], 4)
    for rule, rec in SPREAD["rules"].items():
        assert all(rec["thread_invariant"].values()), rule
        for r in rec["runs"]:
            assert f"{r['learned_median']:.4f}" in README, (rule, r["seed"], r["threads"])


def test_no_message_names_a_package_that_is_not_on_the_index():
    for path in (REPO / "metascale").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"pip install 'metascale\[", text.replace("so ``pip install 'metascale[...]'`` fails", "")), path
