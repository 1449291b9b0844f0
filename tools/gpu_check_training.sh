#!/usr/bin/env bash
# GPU acceptance run of the training job: the olmo_hybrid_1b preset on the embedded corpus at
# sequence 4096, bf16, one GPU, through examples/train_olmo_hybrid_1b.sh. The first launch stops
# after the checkpoint at iteration HALF; the same command relaunched reloads it and trains to
# ITERS. Prints a table (tokens/s/GPU, MFU, peak memory, losses, reload) last.
#   OUT=/tmp/out ITERS=200 bash tools/gpu_check_training.sh
# On Hopper with Triton < 3.7.1 it opts in to the fla gradient self-check
# (MEGATRON_HYBRID_FLA_HOPPER_SELFCHECK=1); the logs show the measured errors.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check_training}
ITERS=${ITERS:-200}
HALF=${HALF:-$((ITERS / 2))}
mkdir -p "$OUT"
python3 tools/build_embedded_corpus.py --output-dir "$OUT/data" 2>&1 | tail -2
export MEGATRON_HYBRID_FLA_HOPPER_SELFCHECK=${MEGATRON_HYBRID_FLA_HOPPER_SELFCHECK:-1}
export RUN_DIR="$OUT/run" DATA_PATH="$OUT/data/corpus_text_document"
export TOKENIZER_MODEL="$OUT/data/tokenizer.model" GPUS_PER_NODE=1 SEQ_LENGTH=4096
export MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-4} GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-4}
export WARMUP_ITERS=${WARMUP_ITERS:-20} LR=${LR:-6e-4} MIN_LR=6e-5 SAVE_INTERVAL=$HALF
export LOG_INTERVAL=${LOG_INTERVAL:-5} EVAL_INTERVAL=$HALF EVAL_ITERS=2 SPLIT=98,2,0
rm -rf "$RUN_DIR"
echo "[$(date +%T)] launch 1: iterations 1..$HALF, then save and exit"
TRAIN_ITERS=$ITERS bash examples/train_olmo_hybrid_1b.sh --exit-interval "$HALF" 2>&1 \
    | tee "$OUT/part1.log" | grep --line-buffered -E "iteration|loss at|> |Error|LIFTED|KEPT" \
    | cut -c1-330
echo "[$(date +%T)] launch 2 (same command): reload iteration $HALF, train to $ITERS"
TRAIN_ITERS=$ITERS bash examples/train_olmo_hybrid_1b.sh 2>&1 | tee "$OUT/part2.log" \
    | grep --line-buffered -E "iteration|loss at|> |Error" | cut -c1-330
echo "[$(date +%T)] done"
python3 - "$OUT" "$HALF" <<'PY'
import re, statistics, sys
out, half = sys.argv[1], int(sys.argv[2])
pat = re.compile(r"iteration\s+(\d+)/.*?tokens per second per GPU: ([\d.]+) \|(?: MFU: ([\d.]+)% \|)?"
                 r".*?lm loss: ([-+\dEe.]+) \|.*?mem-max-allocated-gib: ([\d.]+)")
rows = {}
for part in ("part1", "part2"):
    for line in open(f"{out}/{part}.log"):
        m = pat.search(line)
        if m:
            rows[int(m.group(1))] = (part, float(m.group(2)), float(m.group(3) or 0), float(m.group(4)), float(m.group(5)))
its = sorted(rows)
if not its:
    sys.exit("no iteration lines in the logs (see part1.log / part2.log)")
steady = [rows[i] for i in its if i > 20 and i != half + int(__import__("os").environ.get("LOG_INTERVAL", "5"))]  # skip warm-up/autotune intervals
steady = steady or [rows[i] for i in its]  # short warm-up runs: every logged interval
tps = statistics.median(r[1] for r in steady)
mfu = statistics.median(r[2] for r in steady)
loaded = any("loaded checkpoint" in l and f"iteration {half}" in l for l in open(f"{out}/part2.log"))
print("\n| quantity | value |\n|---|---|")
print(f"| iterations logged | {its[0]}..{its[-1]} ({len(its)} lines) |")
print(f"| lm loss first -> last | {rows[its[0]][3]:.3f} -> {rows[its[-1]][3]:.3f} |")
print(f"| tokens/s/GPU (median, steady) | {tps:,.0f} |")
print(f"| MFU (median, 989.4 TFLOP/s peak) | {mfu:.2f}% |")
print(f"| peak memory allocated (GiB) | {max(r[4] for r in rows.values()):.1f} |")
print(f"| checkpoint at {half} reloaded by the relaunch | {loaded} |")
PY
