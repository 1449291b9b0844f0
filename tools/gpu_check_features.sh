#!/usr/bin/env bash
# GPU check of every training feature of pretrain_olmo_hybrid.py: one short run of the
# olmo_hybrid_1b preset per feature (sequence 2048, micro-batch 2, 20-30 iterations, one GPU,
# torchrun), through megatron_hybrid/gpu_checks/features.py. Rows: mock data, the embedded
# corpus (built here with tools/build_embedded_corpus.py, beside the first row), intra-document
# masking, --reset-attention-mask --reset-position-ids, selective and full recompute, z-loss,
# skip-step with an injected NaN, save + reload, finetune, resume overrides stopped by SIGUSR1,
# model-shape flags, a data blend, --exit-duration-in-mins, --dry-run; together they run every
# flag of the trainer (the report lists any that none ran). Prints a table (feature, ran, lm loss
# first -> last, tokens/s/GPU, peak memory, wall time) last and writes it to OUT/features.md;
# each row's log goes to OUT/logs/ (PACK_LOGS=1: one OUT/feature_logs.tar.gz instead).
#   OUT=/tmp/out bash tools/gpu_check_features.sh
#   CPU=1 OUT=/tmp/out bash tools/gpu_check_features.sh   # CPU smoke: tiny preset, 3-4 iterations
# Env: WORK [/tmp/gpu_check_features] (data, checkpoints of ~17 GB, TensorBoard), BUDGET_S [510]
# (seconds from the start after which no row starts; the rest are reported as not run), ROWS
# (comma-separated row numbers to run, e.g. ROWS=2,7,8). On Hopper with Triton < 3.7.1 it opts
# in to the fla gradient self-check (MEGATRON_HYBRID_FLA_HOPPER_SELFCHECK=1).
# Measured 2026-12-08 on the H100 (cold kernel cache): a warm row takes 36-46 s (about 30 s of it
# start-up: imports, NCCL, the per-process Hopper self-check), the first row 134 s and the first
# masked row 113 s (fla warm-up 74 s and 62 s), the save row 91 s, the GQA row 87 s (warm-up of
# its norm widths): all 15 rows need about 11 minutes, so one 10-minute device command with
# BUDGET_S=470 ran rows 1-6; the rest ran (ROWS=2,7,8,9,10,...) on the same warm machine.
# Restore the kernel cache first (tools/gpu_kernel_cache.sh) and give each call what fits.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
OUT=${OUT:-runs/gpu_check_features}
WORK=${WORK:-/tmp/gpu_check_features}
mkdir -p "$OUT/logs" "$WORK/data"
export MEGATRON_HYBRID_FLA_HOPPER_SELFCHECK=${MEGATRON_HYBRID_FLA_HOPPER_SELFCHECK:-1}
export CUDA_DEVICE_MAX_CONNECTIONS=1 PYTHONUNBUFFERED=1
if [[ -n "${CPU:-}" ]]; then
    corpus_args=(--max-chars 300000 --vocab-size 1024)
    driver_args=(--cpu)
else
    corpus_args=(--workers 4)
    driver_args=()
fi
[[ -n "${ROWS:-}" ]] && driver_args+=(--rows "$ROWS")
rm -f "$WORK/data/READY" "$WORK/data/FAILED"
echo "[$(date +%T)] building the embedded corpus in $WORK/data (beside the first row)"
( python3 tools/build_embedded_corpus.py --output-dir "$WORK/data" "${corpus_args[@]}" \
      > "$OUT/logs/00_corpus.log" 2>&1 && touch "$WORK/data/READY" || touch "$WORK/data/FAILED" ) &
corpus_pid=$!
python3 -m megatron_hybrid.gpu_checks.features --out "$OUT" --work "$WORK" \
    --corpus "$WORK/data" --start "$START" --budget-s "${BUDGET_S:-510}" "${driver_args[@]}"
status=$?
wait "$corpus_pid"
if [[ "${PACK_LOGS:-0}" == 1 ]]; then
    tar -czf "$OUT/feature_logs.tar.gz" -C "$OUT" logs && rm -rf "$OUT/logs"
fi
exit $status
