#!/usr/bin/env bash
# One device-machine call per phase: set up, check, then time, writing everything under $OUT.
#
#   bash bench/device_run.sh tests    # CUDA tests of the engine (tiny models, kernels, graphs)
#   bash bench/device_run.sh mix      # helm_mix: this tree, then the tree in .old/src (before)
#   bash bench/device_run.sh speed    # generate() baselines, decode.py, a load test
#   bash bench/device_run.sh tests mix
#
# Needs .whl (see scripts/device-setup) and, for `mix`, .old/src (git archive OLD src | tar -x
# -C .old). Each step has its own time limit so that a slow one cannot eat the call; the Marlin
# kernels compile once per machine (about 200 s) and are kept in $MARLIN_CACHE.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
LOG="$OUT/device.log"
export PYTHONUNBUFFERED=1
export GPTQMODEL_TORCH_EXTENSIONS_DIR=${MARLIN_CACHE:-/tmp/marlin}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
CKPT=/tmp/onegpu-ckpt
source scripts/device-setup >>"$LOG" 2>&1 || { tail -20 "$LOG"; exit 1; }
t0=$SECONDS

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log, say how it ended
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "=== $name (limit ${limit}s, at $((SECONDS - t0))s)" >>"$LOG"
    timeout "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    echo "=== $name: rc=$rc in $((SECONDS - start))s" | tee -a "$LOG"
}

marlin() {
    python3 -c "from gptqmodel import extension; extension.load('marlin_fp16')"
}

for phase in "$@"; do
    case $phase in
    tests)
        step cuda-tests 200 python3 -m pytest tests/engine -m cuda -q -x -p no:cacheprovider
        ;;
    mix)
        step marlin 300 marlin
        step mix-after 200 python3 bench/helm_mix.py --label after --baseline-samples 0 \
            --checkpoint "$CKPT" --out "$OUT"
        step mix-before 200 env PYTHONPATH=".old/src:$PYTHONPATH" python3 bench/helm_mix.py \
            --label before --baseline-samples 0 --checkpoint "$CKPT" --out "$OUT"
        ;;
    speed)
        step marlin 300 marlin
        step mix-baseline 300 python3 bench/helm_mix.py --label after-baseline \
            --baseline-samples 1 --checkpoint "$CKPT" --out "$OUT"
        step decode 200 python3 bench/decode.py --prompt-lengths 128 --out "$OUT"
        ;;
    *)
        echo "unknown phase $phase" >&2
        exit 2
        ;;
    esac
done
grep -E "^(===|helm-mix|helm:|interleaved:|by scenario| +(onegpu|after|before|generate)|[0-9 ]+ +[0-9.]+ )" \
    "$LOG" | tail -60
