#!/usr/bin/env bash
# Install learn2learn 0.2.0 into .venv for metascale.interop.learn2learn, without touching
# torch (2.13.0 CPU) or numpy (2.x). Called by scripts/setup.sh; safe to re-run: it returns at
# once when learn2learn already imports.
#
# Why not `pip install learn2learn`: 0.2.0 (the latest release) is an sdist whose shipped
# Cython C files include longintrepr.h, removed in Python 3.11, so the build fails; and its
# dependencies pull a CUDA torch and force numpy below 2. So:
#   1. learn2learn: download the sdist, regenerate the C files with Cython 3 (installed into a
#      throwaway folder), build a wheel (cached in .venv/.learn2learn/), install it --no-deps.
#   2. torchvision 0.16.2 --no-deps: `import learn2learn` imports torchvision (for its vision
#      benchmarks). No torchvision built for torch 2.13 imports with the CPU torch (their
#      compiled ops fail to register); 0.16.2 imports with its C extension unloaded, and only its
#      pure-Python parts are reachable. Its other dependencies (pillow, requests) are real.
#   3. the `l2l` extra of pyproject.toml, resolved (constrained by constraints.txt): gym 0.26.2
#      with its dependencies, because `import learn2learn` imports learn2learn.gym (the RL
#      environments; metascale never uses them; gym prints a notice on import that it does not
#      support numpy 2, true for its environments, importing works), and requests, pillow.
# Not installed: gsutil (a command-line downloader for one vision data set) and qpth (imported
# lazily by MetaOptNet only). `pip check` lists them, and torchvision's torch==2.1.2 pin.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$PWD/.venv/bin/python"
L2L=0.2.0 TORCHVISION=0.16.2
CACHE=.venv/.learn2learn
STAMP="$CACHE/installed-$L2L"
[ -x "$PY" ] || { echo "install_learn2learn: no .venv; run scripts/setup.sh first" >&2; exit 1; }

# fast path: installed before and the modules are still there (no import of torch)
if [ -f "$STAMP" ] && "$PY" -c "import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ('learn2learn', 'torchvision', 'gym', 'requests')))"; then
    exit 0
fi
if "$PY" -W ignore -c "import learn2learn" >/dev/null 2>&1; then
    mkdir -p "$CACHE" && touch "$STAMP"
    exit 0
fi

pip_q() { "$PY" -m pip --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location" >&2); }
versions() { "$PY" -c "import torch, numpy; print(torch.__version__, numpy.__version__)"; }
before=$(versions)
t0=$(date +%s)
echo "setup: installing learn2learn $L2L (rebuilt for Python 3.11; torch and numpy untouched)"
mkdir -p "$CACHE"
wheel=$(ls "$CACHE"/learn2learn-$L2L-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$wheel" ]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    pip_q download --quiet --no-deps --no-binary learn2learn "learn2learn==$L2L" -d "$tmp"
    tar xzf "$tmp/learn2learn-$L2L.tar.gz" -C "$tmp"
    pip_q install --quiet --target "$tmp/cython" "cython>=3,<4"
    (cd "$tmp/learn2learn-$L2L" && PYTHONPATH="$tmp/cython" "$PY" -m Cython.Build.Cythonize -3 -f -q learn2learn/data/*.pyx)
    pip_q wheel --quiet --no-deps "$tmp/learn2learn-$L2L" -w "$CACHE"
    wheel=$(ls "$CACHE"/learn2learn-$L2L-*.whl | head -n1)
fi
# real dependencies first (resolved, constrained so torch can never be replaced), then the two
# packages whose declared dependencies must not be followed
extra=$("$PY" -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['l2l'])")
pip_q install --quiet -c constraints.txt $extra
pip_q install --quiet --no-deps "torchvision==$TORCHVISION" "$wheel"
after=$(versions)
if [ "$before" != "$after" ]; then
    echo "install_learn2learn: torch/numpy changed ($before -> $after); this must not happen" >&2
    exit 1
fi
"$PY" -W ignore -c "import learn2learn" >/dev/null 2>&1 || {
    echo "install_learn2learn: learn2learn was installed but does not import:" >&2
    "$PY" -c "import learn2learn" >&2; exit 1; }
touch "$STAMP"
echo "setup: learn2learn $L2L installed in $(( $(date +%s) - t0 )) s (torch, numpy: $after)"
