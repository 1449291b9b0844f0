#!/usr/bin/env bash
# GPU check of the parallelism tuner (tools/tune_parallelism.py): the olmo_hybrid_1b preset on one
# GPU, bf16, distributed optimizer, mock data, ITERS iterations per plan through
# `tune_parallelism.py --measure` (torchrun pretrain_olmo_hybrid.py --mock-data). Prints, last, a
# markdown table of predicted vs measured peak memory (torch.cuda.max_memory_allocated) and
# tokens/s/GPU with the error of each.
#   OUT=/tmp/out bash tools/gpu_check_tuner.sh
# PLANS: space-separated MICRO_BATCH:SEQ_LENGTH:RECOMPUTE:VOCAB (default below; the last one is
# the configuration of the H200 reference in docs/gpu.md, 57.4 GiB and 46,800 tokens/s/GPU).
# ITERS [6] per plan; GPU_MEMORY_GB [141]; RUN_TIMEOUT [300] s per plan; MODEL_PRESET
# [olmo_hybrid_1b] (tiny: a CPU smoke run). About 60-90 s per plan on an H200 (start-up, the fla
# warm-up for the plan's shapes, fla's Hopper self-check, 6 iterations); measured 2026-11-29: 6 min.
# On Hopper with Triton < 3.7.1 it opts in to the fla gradient self-check, as gpu_check_training.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check_tuner}
ITERS=${ITERS:-6}
PLANS=${PLANS:-"1:4096:none:100278 2:4096:selective:8192 1:8192:full:8192 4:4096:none:8192"}
export MEGATRON_HYBRID_FLA_HOPPER_SELFCHECK=${MEGATRON_HYBRID_FLA_HOPPER_SELFCHECK:-1}
mkdir -p "$OUT/logs"
rm -f "$OUT/results.jsonl"
for plan in $PLANS; do
    IFS=: read -r mbs seq recompute vocab <<< "$plan"
    echo "[$(date +%T)] micro-batch $mbs, sequence $seq, recompute $recompute, vocabulary $vocab"
    logs="$OUT/logs/mbs${mbs}_seq${seq}_${recompute}_vocab${vocab}"
    python3 tools/tune_parallelism.py --model-preset "${MODEL_PRESET:-olmo_hybrid_1b}" \
        --vocab-size "$vocab" \
        --num-gpus 1 --gpu-memory-gb "${GPU_MEMORY_GB:-141}" --seq-length "$seq" \
        --global-batch-size "$mbs" --micro-batch-size "$mbs" --recompute-granularity "$recompute" \
        --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 \
        --use-distributed-optimizer --top 1 --measure --measure-top-k 1 \
        --measure-iters "$ITERS" --measure-dir "$logs" --measure-output "$OUT/results.jsonl" \
        --measure-timeout "${RUN_TIMEOUT:-300}" \
        2>&1 | grep -E "^\[|^\||error|no iteration" \
        || echo "  (no result for this plan: see $logs)"
    grep -hE "Error|error:" "$logs"/*.log 2>/dev/null | tail -3
done
echo "[$(date +%T)] done"
if [[ -s "$OUT/results.jsonl" ]]; then
    python3 tools/tune_parallelism.py --measure-report "$OUT/results.jsonl"
else
    echo "no measurement recorded (see $OUT/logs)"; exit 1
fi
