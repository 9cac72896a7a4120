#!/usr/bin/env bash
# Create .venv (if missing) and install metascale into it, with torch pinned to the CPU
# build (constraints.txt). Re-runs are quick: the install is skipped while pyproject.toml and
# constraints.txt are unchanged. Set PYTHON to choose the interpreter (default python3.11, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $("$PY" --version)"
    "$PY" -m venv .venv
fi
stamp=".venv/.metascale-install-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || ! .venv/bin/python -c "import metascale, torch, higher, sklearn, pytest, matplotlib, prodigyopt, schedulefree, mlxtend, mnist1d, importlinter" 2>/dev/null; then
    echo "setup: installing metascale[test] (torch pinned by constraints.txt)"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]" \
        2> >(grep -v "^WARNING: Location" >&2)
    rm -f .venv/.metascale-install-*
    touch "$stamp"
fi
# learn2learn for metascale.interop (optional; not a pip install on Python 3.11: see the script)
bash scripts/install_learn2learn.sh || echo "setup: learn2learn was not installed (needs PyPI);" \
    "metascale.interop.learn2learn and tests/test_learn2learn.py need it: bash scripts/install_learn2learn.sh" >&2
