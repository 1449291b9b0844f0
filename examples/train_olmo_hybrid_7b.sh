#!/usr/bin/env bash
# Pretrain Olmo Hybrid 7B (32 layers, G-G-G-*- x8, d=3840) on several nodes with torchrun.
# Run this script on every node (Slurm: examples/slurm/olmo_hybrid_7b.sbatch does it for you):
#
#   NNODES=8 NODE_RANK=$i MASTER_ADDR=node0 MASTER_PORT=29500 \
#   DATA_PATH="/data/dolma3_text_document" TOKENIZER_MODEL=/models/dolma2/tokenizer.json \
#       bash examples/train_olmo_hybrid_7b.sh [extra pretrain_olmo_hybrid.py flags...]
#
#   DRY_RUN=1 bash examples/train_olmo_hybrid_7b.sh     (or pass --dry-run) prints the resolved
#   command and checks the layout (world size, TP/PP/CP divisibility of heads/FFN/vocab/layers
#   and sequence, batch sizes) for NNODES x GPUS_PER_NODE ranks without launching anything.
#
# Environment (defaults in brackets): GPUS_PER_NODE [8], NNODES [1], NODE_RANK [0],
# MASTER_ADDR [localhost], MASTER_PORT [29500], TP [2] (30 heads and FFN 11008 allow TP 1 or 2),
# PP [1], CP [1] (context parallelism: CP x TP must divide the 30 heads, e.g. CP 2 at TP 1 for
# long sequences; tools/tune_parallelism.py picks it), SEQ_LENGTH [8192], MICRO_BATCH_SIZE [1], GLOBAL_BATCH_SIZE [512] (4M tokens, the Olmo
# recipe), TRAIN_ITERS [1414078], LR [3e-4], MIN_LR [3e-5], WARMUP_ITERS [2000],
# RECOMPUTE [selective|full|none: none], RUN_DIR [runs/olmo_hybrid_7b], SAVE_INTERVAL [1000].
set -euo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=${DRY_RUN:-0}
for arg in "$@"; do [[ "$arg" == "--dry-run" ]] && DRY_RUN=1; done
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29500}
TP=${TP:-2}
PP=${PP:-1}
CP=${CP:-1}
RUN_DIR=${RUN_DIR:-runs/olmo_hybrid_7b}
if [[ "$DRY_RUN" != 1 ]]; then
    : "${DATA_PATH:?set DATA_PATH to a preprocessed prefix or a weighted blend}"
    : "${TOKENIZER_MODEL:?set TOKENIZER_MODEL to the dolma2 tokenizer.json}"
fi
DATA_PATH=${DATA_PATH:-/path/to/data_text_document}
TOKENIZER_MODEL=${TOKENIZER_MODEL:-/path/to/dolma2/tokenizer.json}
if [[ -z "${TOKENIZER_TYPE:-}" ]]; then
    [[ "$TOKENIZER_MODEL" == *.model ]] && TOKENIZER_TYPE=SentencePieceTokenizer || TOKENIZER_TYPE=HuggingFaceTokenizer
fi
export CUDA_DEVICE_MAX_CONNECTIONS=1

DISTRIBUTED_ARGS=(
    --nproc-per-node "$GPUS_PER_NODE" --nnodes "$NNODES" --node-rank "$NODE_RANK"
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
)
MODEL_ARGS=(--model-preset olmo_hybrid_7b --seq-length "${SEQ_LENGTH:-8192}")
PARALLEL_ARGS=(
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
    --context-parallel-size "$CP"
    --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
)
[[ "$TP" -gt 1 ]] && PARALLEL_ARGS+=(--sequence-parallel)
case "${RECOMPUTE:-none}" in
    none) ;;
    full) PARALLEL_ARGS+=(--recompute-granularity full --recompute-method uniform --recompute-num-layers 1) ;;
    selective) PARALLEL_ARGS+=(--recompute-granularity selective) ;;
    *) echo "RECOMPUTE must be none, selective or full" >&2; exit 2 ;;
esac
TRAINING_ARGS=(
    --micro-batch-size "${MICRO_BATCH_SIZE:-1}" --global-batch-size "${GLOBAL_BATCH_SIZE:-512}"
    --train-iters "${TRAIN_ITERS:-1414078}" --bf16
    --lr "${LR:-3e-4}" --min-lr "${MIN_LR:-3e-5}" --lr-decay-style cosine
    --lr-warmup-iters "${WARMUP_ITERS:-2000}" --weight-decay 0.1 --weight-decay-grouping olmo
    --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8 --z-loss-weight 1e-5
)
# shellcheck disable=SC2206  # DATA_PATH may be a space-separated weighted blend
DATA_ARGS=(
    --data-path $DATA_PATH --split "${SPLIT:-99,1,0}"
    --tokenizer-type "$TOKENIZER_TYPE" --tokenizer-model "$TOKENIZER_MODEL"
)
CHECKPOINT_ARGS=(--save "$RUN_DIR/checkpoints" --load "$RUN_DIR/checkpoints"
                 --save-interval "${SAVE_INTERVAL:-1000}")
LOGGING_ARGS=(
    --log-interval "${LOG_INTERVAL:-10}" --eval-interval "${EVAL_INTERVAL:-1000}"
    --eval-iters "${EVAL_ITERS:-10}" --tensorboard-dir "$RUN_DIR/tensorboard"
)
[[ -n "${WANDB_PROJECT:-}" ]] && LOGGING_ARGS+=(--wandb-project "$WANDB_PROJECT")

FLAGS=("${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${TRAINING_ARGS[@]}" "${DATA_ARGS[@]}"
       "${CHECKPOINT_ARGS[@]}" "${LOGGING_ARGS[@]}")
EXTRA=()
for arg in "$@"; do [[ "$arg" != "--dry-run" ]] && EXTRA+=("$arg"); done
if [[ "$DRY_RUN" == 1 ]]; then
    echo "resolved command (node $NODE_RANK of $NNODES):"
    printf ' %q' python3 -m torch.distributed.run "${DISTRIBUTED_ARGS[@]}" pretrain_olmo_hybrid.py \
        "${FLAGS[@]}" "${EXTRA[@]}"
    echo
    VOCAB=()
    if [[ -e "$TOKENIZER_MODEL" ]]; then :
    elif [[ "$TOKENIZER_MODEL" == /path/to/* ]]; then
        echo "(TOKENIZER_MODEL not set: checking with dolma2's 100,278 ids)"
        VOCAB=(--vocab-size 100278)
    else
        echo "error: TOKENIZER_MODEL=$TOKENIZER_MODEL does not exist" >&2; exit 2
    fi
    if [[ "$DATA_PATH" != /path/to/* ]]; then
        for item in $DATA_PATH; do
            [[ "$item" =~ ^[0-9.]+$ ]] && continue
            [[ -f "$item.bin" && -f "$item.idx" ]] || { echo "error: DATA_PATH: $item.bin/.idx not found" >&2; exit 2; }
        done
    fi
    WORLD_SIZE=$((GPUS_PER_NODE * NNODES)) exec python3 pretrain_olmo_hybrid.py "${FLAGS[@]}" \
        "${VOCAB[@]}" "${EXTRA[@]}" --dry-run
fi
exec python3 -m torch.distributed.run "${DISTRIBUTED_ARGS[@]}" pretrain_olmo_hybrid.py \
    "${FLAGS[@]}" "${EXTRA[@]}"
