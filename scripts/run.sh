#!/usr/bin/env bash
# The main job: set up, meta-train the adaptive layer-wise optimizer (RULE, default
# adaptive-momentum; RULE=layerwise for the static one) on the default task distribution
# (sine-wave regression, tasks/sine.toml), export it, apply it to held-out tasks next to tuned
# SGD / SGD+momentum / Adam, and print the comparison. Extra arguments go to meta-train
# (e.g. --meta-steps 50 --seed 1). Output: runs/quickstart/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
SPEC="${SPEC:-tasks/sine.toml}"
OUT="${OUT:-runs/quickstart}"
RULE="${RULE:-adaptive-momentum}"
.venv/bin/metascale meta-train --spec "$SPEC" --out "$OUT" --rule "$RULE" "$@"
.venv/bin/metascale info "$OUT/optimizer.safetensors"
.venv/bin/metascale evaluate "$OUT/optimizer.safetensors" --spec "$SPEC" --json "$OUT/eval.json"
