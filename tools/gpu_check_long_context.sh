#!/usr/bin/env bash
# GPU check of long sequences: the 7B widths at reduced depth (NUM_LAYERS [4]: G-G-G-*), bf16,
# micro-batch 1, distributed optimizer, full recompute, mock data, ITERS [4] iterations per
# sequence length (SEQ_LENGTHS ["32768 65536"]), one GPU, through pretrain_olmo_hybrid.py.
# Prints, last, a table of peak memory allocated and step time (median of the iterations after
# the first, which includes fla's autotuning). The run's own Hopper self-check opt-in applies.
#   OUT=/tmp/out bash tools/gpu_check_long_context.sh
# EXTRA: more flags, e.g. EXTRA="--intra-document-masking" or "--recompute-granularity selective".
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check_long_context}
mkdir -p "$OUT"
export MEGATRON_HYBRID_FLA_HOPPER_SELFCHECK=${MEGATRON_HYBRID_FLA_HOPPER_SELFCHECK:-1}
export CUDA_DEVICE_MAX_CONNECTIONS=1
for seq in ${SEQ_LENGTHS:-32768 65536}; do
    echo "[$(date +%T)] sequence $seq"
    # shellcheck disable=SC2086  # EXTRA is a flag list on purpose
    timeout "${RUN_TIMEOUT:-280}" python3 -m torch.distributed.run --standalone --nproc-per-node 1 \
        pretrain_olmo_hybrid.py --model-preset olmo_hybrid_7b --num-layers "${NUM_LAYERS:-4}" \
        --seq-length "$seq" --max-position-embeddings "$seq" --micro-batch-size 1 \
        --global-batch-size 1 --train-iters "${ITERS:-4}" --lr 3e-4 --lr-warmup-iters 1 --bf16 \
        --use-distributed-optimizer --recompute-granularity full --mock-data --vocab-size 100278 \
        --log-interval 1 --eval-iters 0 --num-workers 0 ${EXTRA:-} > "$OUT/seq$seq.log" 2>&1
    echo "  exit status $?"
    grep --line-buffered -E "iteration|Error|error" "$OUT/seq$seq.log" | cut -c1-260 | tail -6
done
python3 - "$OUT" ${SEQ_LENGTHS:-32768 65536} <<'PY'
import re, statistics, sys
out, seqs = sys.argv[1], sys.argv[2:]
print("\n| sequence | peak memory allocated (GiB) | step time (s, median after the first) | tokens/s |\n|---|---|---|---|")
for seq in seqs:
    text = open(f"{out}/seq{seq}.log").read()
    ms = [float(x) for x in re.findall(r"elapsed time per iteration \(ms\): ([\d.]+)", text)]
    mem = [float(x) for x in re.findall(r"mem-max-allocated-gib: ([\d.]+)", text)]
    if not ms:
        print(f"| {seq} | - | - | - (see seq{seq}.log) |")
        continue
    step = statistics.median(ms[1:] or ms) / 1000
    print(f"| {seq} | {max(mem) if mem else float('nan'):.1f} | {step:.2f} | {int(seq) / step:,.0f} |")
PY
