"""The package's structure: the import-layering contract, a spec that loads without the
meta-training machinery, and rule names known only to the registry."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from importlinter.cli import lint_imports

from metascale.optim import RULES

REPO = Path(__file__).resolve().parent.parent


def test_import_layers_contract_is_kept(monkeypatch):
    monkeypatch.chdir(REPO)  # the contract lives in pyproject.toml
    assert lint_imports(no_cache=True) == 0


def test_loading_a_spec_imports_no_higher():
    code = ("import sys, metascale.spec; s = metascale.spec.load_spec('tasks/sine.toml'); "
            "s.rule_config('layerwise'); s.sampler('train', 0).task(0); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('higher', 'metascale')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    loaded = eval(out)  # a list of module names printed by the child
    assert "higher" not in loaded and not any(m.startswith(("metascale.meta", "metascale.inner")) for m in loaded)


def test_rule_names_live_only_in_the_registry():
    """No string literal outside metascale/optim/ names a rule (the CLI, spec, trainer, export,
    checkpoint, report and info all read RULES)."""
    names = set(RULES)
    found = []
    for path in (REPO / "metascale").rglob("*.py"):
        if path.parent.name == "optim":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in names:
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}")
    assert not found, found
