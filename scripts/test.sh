#!/usr/bin/env bash
# Set up and run the test suite. Extra arguments go to pytest (e.g. -k export -x).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    # pytest's "no tests collected": fine for a filter that matched nothing, an error otherwise.
    if [ "$#" -gt 0 ]; then
        echo "test.sh: no test matched the arguments: $*"
        exit 0
    fi
    echo "test.sh: pytest collected no tests: the suite is missing" >&2
    exit 1
fi
exit "$rc"
