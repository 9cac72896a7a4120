#!/usr/bin/env bash
# GPU checks and figures in one short call (at most 8 minutes on one GPU: each step has a time
# limit, 150 + 180 + 45 + 45 + 60 s), JSON under one folder:
#   1. the CUDA test subset (pytest -m cuda)                      -> pytest_cuda.json
#   2. meta-steps/s on the default spec (tasks/sine.toml), CPU (1 process at 1 thread; the
#      default --jobs) against CUDA                                -> meta_rate.json
#   3. vmap over task draws on/off (benchmarks/vmap_tasks.py)      -> vmap_tasks.json
#   4. the fp16 GradScaler fold: ScaledAdam on scaled gradients against unscale_ + Adam,
#      fused and foreach (benchmarks/amp_adam.py)                   -> amp_adam.json
#   5. the frozen step cost on a 10M-parameter MLP against torch's fused Adam and SGD
#      (benchmarks/step_cost_device.py)                             -> step_cost.json
#   and summary.json with the headline numbers of each.
#
#   bash benchmarks/gpu.sh [--device cuda|cpu] [--out DIR] [--quick]
#
# --device cpu runs the same steps on the CPU at reduced sizes (the CUDA tests skip; a CI check
# that the script works, well under 3 minutes); --quick shrinks everything further (the test
# suite runs it). Default --out: benchmarks/results/gpu (benchmarks/results/gpu-cpu for --device cpu).
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
OUT=""
QUICK=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --device=*) DEVICE="${1#*=}"; shift ;;
        --out) OUT="$2"; shift 2 ;;
        --out=*) OUT="${1#*=}"; shift ;;
        --quick) QUICK=1; shift ;;
        -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$DEVICE" in cpu|cuda|cuda:*) ;; *) echo "gpu.sh: --device must be cuda or cpu, got $DEVICE" >&2; exit 2 ;; esac
if [[ -z "$OUT" ]]; then
    if [[ "$DEVICE" == cpu ]]; then OUT=benchmarks/results/gpu-cpu; else OUT=benchmarks/results/gpu; fi
fi
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python; fi
fi
mkdir -p "$OUT"
# one intra-op thread per process unless told otherwise: the CPU side of these measurements is
# tiny tensors (or, for --device cpu, a shared CI machine); meta_rate.py sets its own threads
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
if [[ "$DEVICE" != cpu ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu.sh: --device $DEVICE but torch sees no CUDA device (torch $("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)')); use --device cpu" >&2
    exit 1
fi

# sizes: full on CUDA; reduced on CPU; tiny with --quick
if [[ "$DEVICE" != cpu ]]; then
    META=(--meta-steps 20 --repeats 2 --configs cpu1 cpu cuda); VMAP=(--tasks 8 --k 20 --repeats 5)
    AMP=(--width 2048 --layers 4 --repeats 30); STEP=(--width 1584 --repeats 50)
else
    META=(--meta-steps 6 --repeats 1 --configs cpu1 cpu); VMAP=(--tasks 4 --k 10 --repeats 2)
    AMP=(--width 512 --layers 4 --repeats 5); STEP=(--width 512 --repeats 5)
fi
PYTEST=(-m cuda -q -p no:cacheprovider tests/)
if [[ "$QUICK" == 1 ]]; then
    META=(--meta-steps 2 --repeats 1 --configs cpu1); VMAP=(--tasks 2 --k 3 --repeats 1)
    AMP=(--width 64 --layers 2 --repeats 2 --warmup 1); STEP=(--width 64 --repeats 2 --warmup 1)
    PYTEST=(-m cuda -q -p no:cacheprovider tests/test_cuda.py)
fi

start=$(date +%s)
step() {  # step NAME TIMEOUT_S COMMAND...: run with a time limit, report its seconds
    local name="$1" limit="$2"; shift 2
    local t0=$(date +%s)
    echo "== $name"
    if ! timeout "$limit" "$@"; then
        echo "gpu.sh: step $name failed or ran past ${limit}s" >&2
        exit 1
    fi
    echo "   ($name: $(( $(date +%s) - t0 )) s)"
}

# 1. CUDA tests: exit status 0 when they pass or (no device) all skip
set +e
t0=$(date +%s)
echo "== pytest -m cuda"
timeout 150 "$PY" -m pytest "${PYTEST[@]}" 2>&1 | tee "$OUT/pytest_cuda.log" | tail -n 15
rc=${PIPESTATUS[0]}
set -e
"$PY" - "$OUT" "$rc" "$(( $(date +%s) - t0 ))" <<'EOF'
import json, re, sys
out, rc, secs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
log = open(f"{out}/pytest_cuda.log").read().strip().splitlines()
summary = next((l for l in reversed(log) if re.search(r"passed|skipped|failed|error|deselected", l)), "")
counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|skipped|failed|errors?|deselected)", summary)}
json.dump({"returncode": rc, "summary": summary.strip("= "), "counts": counts, "seconds": secs},
          open(f"{out}/pytest_cuda.json", "w"), indent=1)
EOF
if [[ $rc -ne 0 ]]; then echo "gpu.sh: pytest -m cuda failed (exit $rc); see $OUT/pytest_cuda.log" >&2; exit 1; fi

# 2-5. figures
step meta_rate 180 "$PY" benchmarks/meta_rate.py --spec tasks/sine.toml "${META[@]}" --out "$OUT/meta_rate.json"
step vmap_tasks 45 "$PY" benchmarks/vmap_tasks.py --device "$DEVICE" "${VMAP[@]}" --out "$OUT/vmap_tasks.json"
step amp_adam 45 "$PY" benchmarks/amp_adam.py --device "$DEVICE" "${AMP[@]}" --out "$OUT/amp_adam.json"
step step_cost 60 "$PY" benchmarks/step_cost_device.py --device "$DEVICE" "${STEP[@]}" --out "$OUT/step_cost.json"

"$PY" - "$OUT" "$DEVICE" "$(( $(date +%s) - start ))" <<'EOF'
import json, sys
out, device, secs = sys.argv[1], sys.argv[2], int(sys.argv[3])
load = lambda n: json.load(open(f"{out}/{n}.json"))
meta, vmap, amp, step, tests = (load(n) for n in ("meta_rate", "vmap_tasks", "amp_adam", "step_cost", "pytest_cuda"))
summary = {
    "device": device, "cuda_device": meta.get("cuda_device"), "wall_s": secs, "pytest_cuda": tests["summary"],
    "meta_steps_per_s": {c: r["meta_steps_per_s"] for c, r in meta["median"].items()},
    "vmap_to_sequential_time": vmap["ratio_vmap_to_sequential"],
    "amp_time_ratio_to_unscale_plus_adam_foreach": amp["ratio_to_unscale_plus_adam_foreach"],
    "step_ms": {k: r["median_ms"] for k, r in step["rows"].items()},
    "step_ratio_to_adam_fused": {k: r.get("ratio_to_adam_fused") for k, r in step["rows"].items()},
}
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
print(json.dumps(summary, indent=1))
print(f"gpu.sh: done in {secs} s; JSON in {out}/")
EOF
