#!/usr/bin/env bash
# The main job: set up, meta-train a layer-wise optimizer (RULE, default: the command line's
# default rule, metascale.optim.registry.DEFAULT_RULE = layerwise; RULE=adaptive-momentum for the
# adaptive one) on the default task distribution
# (sine-wave regression, tasks/sine.toml), export it, apply it to held-out tasks next to tuned
# SGD / SGD+momentum / Adam, and print the comparison. Extra arguments go to meta-train
# (e.g. --meta-steps 50 --seed 1). Output: runs/quickstart/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
SPEC="${SPEC:-tasks/sine.toml}"
OUT="${OUT:-runs/quickstart}"
RULE_ARGS=()
if [ -n "${RULE:-}" ]; then RULE_ARGS=(--rule "$RULE"); fi
.venv/bin/metascale meta-train --spec "$SPEC" --out "$OUT" ${RULE_ARGS[@]+"${RULE_ARGS[@]}"} "$@"
.venv/bin/metascale info "$OUT/optimizer.safetensors"
.venv/bin/metascale evaluate "$OUT/optimizer.safetensors" --spec "$SPEC" --json "$OUT/eval.json"
