#!/usr/bin/env bash
# One device-machine call per phase: set up, check, then time, writing everything under $OUT.
#
#   bash bench/device_run.sh tests    # CUDA tests of the engine (tiny models, kernels, graphs)
#   bash bench/device_run.sh check    # CUDA tests of the engine, then decode.py at batch 1 (profiled)
#                                     # for this tree and .prev/src
#   bash bench/device_run.sh checklite # the same CUDA tests but the GPTQ and dense ones (no Marlin)
#   bash bench/device_run.sh checkspeed # checklite's tests beside Marlin's build, then batch 1
#                                       # profiled for this tree and .prev/src
#   bash bench/device_run.sh overlap  # every CUDA test of the engine, then decode.py at 1, 4 and 16
#                                     # rows, overlapped (the default) and in order, profiled
#   bash bench/device_run.sh overlapmix # CUDA tests but GPTQ and dense; helm_mix overlapped (the
#                                       # default), then in order; batch 1 overlapped, in order
#   bash bench/device_run.sh overlapsum # `overlap`, then a summary-shaped step profiled (9 rows
#                                       # of 1,000 tokens sampled at 0.3), default and split4
#   bash bench/device_run.sh mixonly  # helm_mix overlapped and in order, batch 1 both ways (no tests)
#   bash bench/device_run.sh timeline # batch 1 profiled: kernels, pauses inside and between passes
#   bash bench/device_run.sh mix      # helm_mix: this tree, then the tree in .old/src (before)
#   bash bench/device_run.sh speed    # generate() baselines, decode.py
#   bash bench/device_run.sh variants # helm_mix with the defaults, --prefill-chunk 2048, int8 KV
#   bash bench/device_run.sh decode   # decode.py: fused and unfused engines, with a profile
#   bash bench/device_run.sh dense    # CUDA tests; prefill per chunk, Marlin vs dequantized + cuBLAS;
#                                     # helm_mix: the defaults, before (.old/src)
#   bash bench/device_run.sh together # the peer compiling beside the CUDA tests and the builds,
#                                     # timed alone; onegpu's batch-1 profile; helm_mix after, before
#   bash bench/device_run.sh closing  # CUDA tests (no Marlin); decode.py at batch 1 (profiled);
#                                     # helm_mix after, before; decode.py of .prev/src
#   bash bench/device_run.sh verdict  # CUDA tests, attention tests of .prev/src; helm_mix after
#                                     # (steps traced), before; decode.py at batch 1 of .prev/src;
#                                     # helm_mix with sampled drafts, without drafts; decode.py at
#                                     # batch 1
#   bash bench/device_run.sh sampled  # CUDA tests of speculation; helm_mix: defaults,
#                                     # --speculate-sampled, before
#   bash bench/device_run.sh spectests # CUDA tests of speculation, batching and sampling (no Marlin)
#   bash bench/device_run.sh attn     # spectests, decode attention alone (attention_cost.py), both
#                                     # for this tree and .prev/src (no Marlin)
#   (steps of .prev/src are skipped when there is none: git archive REV src | tar -x -C .prev)
#   bash bench/device_run.sh peeronly # the peer alone (460 s) on a fresh machine: no Marlin build,
#                                     # no checkpoint (the peer needs the shape and tokenizer only)
#   bash bench/device_run.sh mixfused # helm_mix with the defaults (fused projections and kernels)
#   bash bench/device_run.sh final    # CUDA tests, then decode.py (fused, with the profile)
#   bash bench/device_run.sh determinism  # CUDA tests of the batch-invariant kernels, then
#                                         # decode.py fused (Marlin) vs deterministic
#   bash bench/device_run.sh detmix   # helm_mix: --deterministic, then the default
#   bash bench/device_run.sh detload  # load.py 5 min, 30 clients, against serve --deterministic
#   bash bench/device_run.sh spec     # CUDA tests, step_cost.py (k + 1 positions per row, prefill
#                                     # chunks, Marlin vs dequantize + cuBLAS), decode.py profile
#   bash bench/device_run.sh spec5    # CUDA tests, decode.py profile, step_cost.py
#   bash bench/device_run.sh mixes    # helm_mix: the defaults, before (.old/src), k = 0
#   bash bench/device_run.sh rule     # CUDA tests; decode.py, decode splits by batch size vs 16
#   bash bench/device_run.sh tests mix
#
# Needs .whl (see scripts/device-setup) and, for `mix`, .old/src (git archive OLD src | tar -x
# -C .old). Each step has its own time limit so that a slow one cannot eat the call. A Marlin
# build carried back as .marlin/marlin.tgz.* (from an earlier call's $OUT) is unpacked first.
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
if ls .marlin/marlin.tgz.* >/dev/null 2>&1; then
    mkdir -p "$GPTQMODEL_TORCH_EXTENSIONS_DIR" && cat .marlin/marlin.tgz.* | tar -xz -C "$GPTQMODEL_TORCH_EXTENSIONS_DIR"
fi

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log, say how it ended
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "=== $name (limit ${limit}s, at $((SECONDS - t0))s)" >>"$LOG"
    timeout "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    echo "=== $name: rc=$rc in $((SECONDS - start))s" | tee -a "$LOG"
}

prev() {  # prev NAME LIMIT COMMAND...: a step for the tree in .prev/src, skipped without one
    [ -d .prev/src ] || { echo "=== $1: no .prev/src, skipped" | tee -a "$LOG"; return 0; }
    step "$@"
}

# Marlin's JIT build (about 200 s on a fresh machine) runs in the background from the start, so
# the CUDA tests and the checkpoint build overlap with it; `wait_marlin` joins it.
MARLIN="import gptqmodel.extension as e; e.load('marlin_fp16')"
case "${1:-}" in peeronly | spectests | attn | checklite) MARLIN="pass" ;; esac  # phases that need no Marlin
(timeout 400 python3 -c "$MARLIN" >/tmp/marlin.log 2>&1; echo "marlin rc=$?" >>/tmp/marlin.log) &
MARLIN_PID=$!
wait_marlin() {
    local start=$SECONDS
    wait "$MARLIN_PID" 2>/dev/null
    echo "=== marlin: $(tail -1 /tmp/marlin.log) (waited $((SECONDS - start))s, at $((SECONDS - t0))s)" | tee -a "$LOG"
    # Keep the build for the next call when it is small enough to carry back (<= 45 MB).
    if [ "$(du -sm "$GPTQMODEL_TORCH_EXTENSIONS_DIR" | cut -f1)" -le 200 ] && [ ! -e "$OUT/marlin.tgz.00" ]; then
        tar -C "$GPTQMODEL_TORCH_EXTENSIONS_DIR" -czf /tmp/marlin.tgz . &&
            [ "$(du -m /tmp/marlin.tgz | cut -f1)" -le 45 ] &&
            split -b 15m -d /tmp/marlin.tgz "$OUT/marlin.tgz."
        ls -la "$OUT" | grep marlin >>"$LOG"
    fi
}
CHECKPOINT="import sys; sys.path.insert(0, 'bench')
from pathlib import Path
from train_14b import QWEN_14B, WORDS, build_checkpoint, make_tokenizer
t = make_tokenizer(WORDS); shape = dict(QWEN_14B); shape['vocab_size'] = max(shape['vocab_size'], len(t))
folder = Path('$CKPT/gptq8-qwen14b')
(folder / 'config.json').exists() or build_checkpoint(folder, shape, t)"

SHAPE="import json, sys; sys.path.insert(0, 'bench')
from pathlib import Path
from train_14b import QWEN_14B, WORDS, make_tokenizer, qwen2_config
t = make_tokenizer(WORDS); shape = dict(QWEN_14B); shape['vocab_size'] = max(shape['vocab_size'], len(t))
folder = Path('$CKPT/shape-qwen14b'); folder.mkdir(parents=True, exist_ok=True)
(folder / 'config.json').write_text(json.dumps(qwen2_config(shape, t, 'float16'))); t.save_pretrained(folder)"

engine_tests() {  # engine_tests LIMIT: the CUDA tests of attention, speculation, batching,
    # sampling and generation (none needs Marlin)
    step cuda-tests "$1" python3 -m pytest tests/engine/test_attention.py \
        tests/engine/test_speculate.py tests/engine/test_batching.py \
        tests/engine/test_sampling.py tests/engine/test_generate.py -m cuda -q -p no:cacheprovider
}

batch1() {  # batch1 LIMIT: decode.py at one request, profiled
    step decode "$1" python3 bench/decode.py --prompt-lengths 128 --variants fused --batches 1 \
        --profile --no-transformers --variant-timeout $(($1 - 10)) --checkpoint "$CKPT/gptq8-qwen14b" \
        --out "$OUT"
}

helm_after_before() {  # helm_after_before LIMIT: the HELM-ordered mix, this tree then .old/src
    step mix-after "$1" python3 bench/helm_mix.py --label after --orders helm --baseline-samples 0 \
        --checkpoint "$CKPT" --out "$OUT"
    step mix-before "$1" env PYTHONPATH=".old/src:$PYTHONPATH" python3 bench/helm_mix.py \
        --label before --orders helm --baseline-samples 0 --checkpoint "$CKPT" --out "$OUT"
}

marlin_free_tests() {  # marlin_free_tests LIMIT: every CUDA test of the engine but the GPTQ
    # and dense-prefill ones (those need Marlin)
    step cuda-tests "$1" python3 -m pytest tests/engine -m cuda -q -p no:cacheprovider \
        -k "not gptq and not dense"
}

checkpoint_start() {  # the 14B checkpoint built in the background, beside the tests
    (python3 -c "$CHECKPOINT" >/tmp/checkpoint.log 2>&1; echo "checkpoint rc=$?" >>/tmp/checkpoint.log) &
    CKPT_PID=$!
}

checkpoint_join() {
    wait "$CKPT_PID"
    echo "=== $(tail -1 /tmp/checkpoint.log) (at $((SECONDS - t0))s)" | tee -a "$LOG"
}

batch1_prev() {  # batch1_prev LIMIT: decode.py at one request, profiled, for .prev/src
    prev decode-prev "$1" env PYTHONPATH=".prev/src:$PYTHONPATH" python3 bench/decode.py \
        --prompt-lengths 128 --variants fused --batches 1 --profile --no-transformers \
        --variant-timeout $(($1 - 5)) --checkpoint "$CKPT/gptq8-qwen14b" --out "$OUT/prev"
}

ready() {  # the 14B checkpoint (kept on a warm machine) and the Marlin build, before timing
    step checkpoint 120 python3 -c "$CHECKPOINT"
    wait_marlin
}

for phase in "$@"; do
    case $phase in
    tests)
        # The GPTQ tests need Marlin: they wait for the background build.
        step cuda-tests 330 python3 -m pytest tests/engine -m cuda -q -p no:cacheprovider
        ;;
    check)  # about 450 s on a fresh machine: every CUDA test of the engine (the GPTQ ones wait
        # for Marlin's build), then batch 1 profiled, for this tree and .prev/src
        checkpoint_start
        step cuda-tests 300 python3 -m pytest tests/engine -m cuda -q -p no:cacheprovider
        checkpoint_join
        wait_marlin
        batch1 60
        batch1_prev 60
        ;;
    overlap | overlapsum)  # about 400 s (overlapsum: 550 s) on a fresh machine: every CUDA test
        # of the engine (the GPTQ ones wait for Marlin's build), then decode.py overlapped and in
        # order, one call
        checkpoint_start
        step cuda-tests 300 python3 -m pytest tests/engine -m cuda -q -p no:cacheprovider
        checkpoint_join
        wait_marlin
        step decode 220 python3 bench/decode.py --prompt-lengths 128 --variants fused,in-order \
            --batches 1,4,16 --profile --no-transformers --variant-timeout 105 \
            --checkpoint "$CKPT/gptq8-qwen14b" --out "$OUT"
        if [ "$phase" = overlapsum ]; then
            mkdir -p "$OUT/summary"
            step decode-summary 150 python3 bench/decode.py --prompt-lengths 1000 --batches 1 \
                --new-tokens 32 --variants fused,split4 --profile --profile-rows 9 \
                --profile-length 1000 --profile-temperature 0.3 --no-transformers \
                --variant-timeout 72 --checkpoint "$CKPT/gptq8-qwen14b" --out "$OUT/summary"
        fi
        ;;
    overlapmix | mixonly)  # overlapmix: about 550 s on a fresh machine, the CUDA tests but the
        # GPTQ and dense ones (beside Marlin's build); then (mixonly: all of it, 220 s on a warm
        # machine) helm_mix overlapped (the default) and in order, then batch 1 both ways
        checkpoint_start
        [ "$phase" = overlapmix ] && marlin_free_tests 150
        checkpoint_join
        wait_marlin
        step mix-after 130 python3 bench/helm_mix.py --label after --orders helm --baseline-samples 0 \
            --checkpoint "$CKPT" --out "$OUT"
        step mix-in-order 130 python3 bench/helm_mix.py --label in-order --orders helm \
            --baseline-samples 0 --engine-args '{"overlap": false}' --checkpoint "$CKPT" --out "$OUT"
        step decode 100 python3 bench/decode.py --prompt-lengths 128 --variants fused,in-order \
            --batches 1 --profile --no-transformers --variant-timeout 48 \
            --checkpoint "$CKPT/gptq8-qwen14b" --out "$OUT"
        ;;
    timeline)  # about 250 s on a fresh machine: batch 1 profiled, its GPU time split into
        # kernels, pauses inside a pass and pauses between passes
        ready
        batch1 60
        ;;
    checklite)  # about 150 s, no Marlin: every CUDA test of the engine but the GPTQ and dense ones
        marlin_free_tests 200
        ;;
    checkspeed)  # about 330 s: the CUDA tests but the GPTQ and dense ones (beside Marlin's
        # build), then batch 1 profiled for this tree and .prev/src
        checkpoint_start
        marlin_free_tests 150
        checkpoint_join
        wait_marlin
        batch1 45
        batch1_prev 45
        ;;
    decode)
        ready
        step decode 300 python3 bench/decode.py --prompt-lengths 128 --variants fused,unfused \
            --profile --no-transformers --checkpoint "$CKPT/gptq8-qwen14b" --out "$OUT"
        step fusion-check 90 python3 bench/fusion_check.py --out "$OUT"
        ;;
    unfused)
        ready
        step decode-unfused 150 python3 bench/decode.py --prompt-lengths 128 --variants unfused \
            --no-transformers --checkpoint "$CKPT/gptq8-qwen14b" --out "$OUT/unfused"
        ;;
    final)  # tests first (the GPTQ ones wait for Marlin, so they run last), then decode.py
        step cuda-tests 200 python3 -m pytest tests/engine -m cuda -q -p no:cacheprovider -k "not gptq"
        ready
        step decode 150 python3 bench/decode.py --prompt-lengths 128 --variants fused --profile \
            --no-transformers --checkpoint "$CKPT/gptq8-qwen14b" --out "$OUT"
        step cuda-tests-gptq 120 python3 -m pytest tests/engine -m cuda -q -p no:cacheprovider -k gptq
        ;;
    spec)
        step cuda-tests 210 python3 -m pytest tests/engine -m cuda -q -p no:cacheprovider -k "not gptq"
        ready
        step step-cost 170 python3 bench/step_cost.py --checkpoint "$CKPT/gptq8-qwen14b" --out "$OUT"
        step decode 110 python3 bench/decode.py --prompt-lengths 128 --variants fused --batches 1,4,16 \
            --profile --no-transformers --checkpoint "$CKPT/gptq8-qwen14b" --out "$OUT"
        step cuda-tests-gptq 60 python3 -m pytest tests/engine -m cuda -q -p no:cacheprovider -k gptq
        ;;
    spec5)  # about 400 s: CUDA tests, profile (two decode splits), step costs
        step cuda-tests 150 python3 -m pytest tests/engine -m cuda -q -p no:cacheprovider -k "not gptq"
        ready
        step decode 150 python3 bench/decode.py --prompt-lengths 128 --variants fused,split4 \
            --batches 1,16 --profile --no-transformers --checkpoint "$CKPT/gptq8-qwen14b" --out "$OUT"
        step step-cost 80 python3 bench/step_cost.py --checkpoint "$CKPT/gptq8-qwen14b" \
            --rows 1,10 --widths 1,4,5 --chunks 512,2048 --gemm-m "" --out "$OUT"
        ;;
    mixes)  # helm_mix: the defaults (speculation on, on CUDA), before (.old/src), k = 0
        ready
        step mix-after 100 python3 bench/helm_mix.py --label after --orders helm --baseline-samples 0 \
            --checkpoint "$CKPT" --out "$OUT"
        step mix-before 100 env PYTHONPATH=".old/src:$PYTHONPATH" python3 bench/helm_mix.py \
            --label before --orders helm --baseline-samples 0 --checkpoint "$CKPT" --out "$OUT"
        step mix-k0 100 python3 bench/helm_mix.py --label k0 --orders helm --baseline-samples 0 \
            --engine-args '{"speculative_tokens": 0}' --checkpoint "$CKPT" --out "$OUT"
        ;;
    rule)  # CUDA tests, then decode.py: split blocks by batch size against 16 everywhere
        step cuda-tests 150 python3 -m pytest tests/engine -m cuda -q -p no:cacheprovider -k "not gptq"
        ready
        step decode 200 python3 bench/decode.py --prompt-lengths 128 --variants fused,split16 \
            --batches 1,4,8,16 --profile --no-transformers --checkpoint "$CKPT/gptq8-qwen14b" \
            --out "$OUT"
        ;;
    dense)  # about 500 s: CUDA tests, prefill per chunk on Marlin and on dequantized weights,
        # helm_mix: the defaults, then before (.old/src)
        marlin_free_tests 100
        ready
        step cuda-tests-marlin 90 python3 -m pytest tests/engine -m cuda -q -p no:cacheprovider \
            -k "gptq or dense"
        step prefill 90 python3 bench/step_cost.py --checkpoint "$CKPT/gptq8-qwen14b" --rows "" \
            --chunks 512,1024,2048 --gemm-m "" --out "$OUT"
        step mix-after 90 python3 bench/helm_mix.py --label after --orders helm --baseline-samples 0 \
            --checkpoint "$CKPT" --out "$OUT"
        step mix-before 90 env PYTHONPATH=".old/src:$PYTHONPATH" python3 bench/helm_mix.py \
            --label before --orders helm --baseline-samples 0 --checkpoint "$CKPT" --out "$OUT"
        ;;
    mixfused)
        ready
        step mix-fused 150 python3 bench/helm_mix.py --label fused --baseline-samples 0 \
            --checkpoint "$CKPT" --out "$OUT"
        ;;
    together)  # about 550 s on a fresh machine
        step shape 60 python3 -c "$SHAPE"
        rm -f /tmp/peer-go
        (timeout 420 env ONEGPU_PEER_GO=/tmp/peer-go python3 bench/decode.py --prompt-lengths 128 \
            --variants "" --batches 1 --peer-timeout 410 --checkpoint "$CKPT/shape-qwen14b" \
            --out "$OUT/peer" >"$OUT/peer.log" 2>&1) &
        PEER_PID=$!
        checkpoint_start
        marlin_free_tests 180
        step peer-compile 240 bash -c "until grep -q waiting '$OUT/peer/decode-transformers.json' \
            2>/dev/null || ! kill -0 $PEER_PID 2>/dev/null; do sleep 2; done"
        if grep -q waiting "$OUT/peer/decode-transformers.json" 2>/dev/null; then
            touch /tmp/peer-go
            step peer-timed 60 bash -c "while kill -0 $PEER_PID 2>/dev/null; do sleep 1; done"
        else  # never timed beside onegpu's figures
            pkill -f transformers-child
            echo "=== peer: not compiled in time, stopped (at $((SECONDS - t0))s)" | tee -a "$LOG"
        fi
        cat "$OUT/peer/decode-transformers.json" >>"$LOG"
        checkpoint_join
        wait_marlin
        step cuda-tests-marlin 90 python3 -m pytest tests/engine -m cuda -q -p no:cacheprovider \
            -k "gptq or dense"
        batch1 100
        helm_after_before 80
        ;;
    closing)  # about 560 s on a fresh machine: the CUDA tests of attention, speculation, batching,
        # sampling and generation; batch 1 profiled; helm_mix after, before; batch 1 of another
        # tree in .prev/src (git archive REV src | tar -x -C .prev)
        checkpoint_start
        engine_tests 150
        checkpoint_join
        wait_marlin
        batch1 90
        helm_after_before 70
        prev decode-prev 55 env PYTHONPATH=".prev/src:$PYTHONPATH" python3 bench/decode.py \
            --prompt-lengths 128 --variants fused --batches 1 --no-transformers \
            --variant-timeout 50 --checkpoint "$CKPT/gptq8-qwen14b" --out "$OUT/prev"
        ;;
    verdict)  # about 450 s on a fresh machine: the CUDA tests of this tree and the attention tests
        # of .prev/src (beside Marlin's build); helm_mix after (each scenario's steps traced),
        # before; batch 1 profiled of .prev/src; helm_mix with sampled drafts, without drafts
        # (k = 0); batch 1
        checkpoint_start
        engine_tests 150
        prev cuda-tests-prev 60 env PYTHONPATH=".prev/src:$PYTHONPATH" python3 -m pytest \
            tests/engine/test_attention.py -m cuda -q -p no:cacheprovider
        checkpoint_join
        wait_marlin
        helm_after_before 60
        batch1_prev 60
        step mix-sampled 60 python3 bench/helm_mix.py --label sampled --orders helm \
            --baseline-samples 0 --engine-args '{"speculate_sampled": true}' --checkpoint "$CKPT" \
            --out "$OUT"
        step mix-k0 60 python3 bench/helm_mix.py --label k0 --orders helm --baseline-samples 0 \
            --engine-args '{"speculative_tokens": 0}' --checkpoint "$CKPT" --out "$OUT"
        batch1 60
        ;;
    sampled)  # about 400 s on a fresh machine
        checkpoint_start
        step cuda-tests 120 python3 -m pytest tests/engine/test_speculate.py \
            tests/engine/test_batching.py tests/engine/test_sampling.py -m cuda -q -p no:cacheprovider
        checkpoint_join
        wait_marlin
        step mix-after 70 python3 bench/helm_mix.py --label after --orders helm --baseline-samples 0 \
            --checkpoint "$CKPT" --out "$OUT"
        step mix-sampled 70 python3 bench/helm_mix.py --label sampled --orders helm \
            --baseline-samples 0 --engine-args '{"speculate_sampled": true}' --checkpoint "$CKPT" \
            --out "$OUT"
        step mix-before 70 env PYTHONPATH=".old/src:$PYTHONPATH" python3 bench/helm_mix.py \
            --label before --orders helm --baseline-samples 0 --checkpoint "$CKPT" --out "$OUT"
        ;;
    attn)  # about 150 s, no Marlin: the CUDA tests of attention, speculation, batching, sampling
        # and generation; decode attention alone; the same two for .prev/src
        engine_tests 150
        step attention-cost 60 python3 bench/attention_cost.py --out "$OUT"
        prev cuda-tests-prev 60 env PYTHONPATH=".prev/src:$PYTHONPATH" python3 -m pytest \
            tests/engine/test_attention.py -m cuda -q -p no:cacheprovider
        prev attention-cost-prev 60 env PYTHONPATH=".prev/src:$PYTHONPATH" python3 \
            bench/attention_cost.py --label prev --out "$OUT"
        ;;
    spectests)
        engine_tests 200
        ;;
    peeronly)
        step shape 60 python3 -c "$SHAPE"
        step peer 470 env TORCH_LOGS=recompiles,graph_breaks python3 bench/decode.py \
            --prompt-lengths 128 --variants "" --batches 1 --peer-timeout 460 \
            --checkpoint "$CKPT/shape-qwen14b" --out "$OUT/peer"
        ;;
    mix)
        ready
        step mix-after 200 python3 bench/helm_mix.py --label after --baseline-samples 0 \
            --checkpoint "$CKPT" --out "$OUT"
        step mix-before 200 env PYTHONPATH=".old/src:$PYTHONPATH" python3 bench/helm_mix.py \
            --label before --baseline-samples 0 --checkpoint "$CKPT" --out "$OUT"
        ;;
    variants)
        ready
        step mix-default 120 python3 bench/helm_mix.py --label default --baseline-samples 0 \
            --checkpoint "$CKPT" --out "$OUT"
        step mix-chunk2048 90 python3 bench/helm_mix.py --label chunk2048 --orders helm \
            --baseline-samples 0 --engine-args '{"prefill_chunk": 2048}' --checkpoint "$CKPT" \
            --out "$OUT"
        step mix-int8 90 python3 bench/helm_mix.py --label int8 --orders interleaved \
            --baseline-samples 0 --engine-args '{"kv_cache_dtype": "int8"}' \
            --checkpoint "$CKPT" --out "$OUT"
        ;;
    speed)
        ready
        step mix-baseline 300 python3 bench/helm_mix.py --label after-baseline \
            --baseline-samples 1 --checkpoint "$CKPT" --out "$OUT"
        step decode 200 python3 bench/decode.py --prompt-lengths 128 \
            --checkpoint "$CKPT/gptq8-qwen14b" --out "$OUT"
        ;;
    determinism)
        step cuda-tests-invariant 240 python3 -m pytest tests/engine/test_invariant.py \
            tests/engine/test_batching.py tests/engine/test_attention.py -m cuda -q -p no:cacheprovider
        ready
        step decode-det 330 python3 bench/decode.py --prompt-lengths 128,1024 \
            --variants fused,deterministic --profile --no-transformers \
            --checkpoint "$CKPT/gptq8-qwen14b" --out "$OUT"
        ;;
    detmix)  # deterministic first: it needs no Marlin, which builds meanwhile
        step checkpoint 120 python3 -c "$CHECKPOINT"
        step mix-det 220 python3 bench/helm_mix.py --label deterministic --baseline-samples 0 \
            --engine-args '{"deterministic": true}' --checkpoint "$CKPT" --out "$OUT"
        wait_marlin
        step mix-default 150 python3 bench/helm_mix.py --label default --baseline-samples 0 \
            --checkpoint "$CKPT" --out "$OUT"
        ;;
    detload)
        step checkpoint 120 python3 -c "$CHECKPOINT"
        step load-det 500 python3 bench/load.py --minutes 5 --clients 30 --out "$OUT/load-det" \
            --serve-args "--model $CKPT/gptq8-qwen14b --deterministic --gpu-memory-gib 24"
        ;;
    *)
        echo "unknown phase $phase" >&2
        exit 2
        ;;
    esac
done
grep -E "^(===|step |prefill |gemm |  rows|helm-mix|helm:|interleaved:|by scenario| +(onegpu|after|before|generate|fused|unfused|deterministic|default|int8)|[0-9]+ requests from|[0-9 ]+ +[0-9.]+ |profile|prompt|transformers|fusion check|where each|attention \[|[a-z_]+: [0-9]+ steps|    (prefill|decode|verify)|.*(passed|failed))" \
    "$LOG" | tail -120
