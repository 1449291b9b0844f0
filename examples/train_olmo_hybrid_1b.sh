#!/usr/bin/env bash
# Pretrain the olmo_hybrid_1b preset (16 layers, G-G-G-*- x4, d=2048) on one node with torchrun.
#
#   DATA_PATH=/data/dolma_text_document TOKENIZER_MODEL=/models/dolma2/tokenizer.json \
#       bash examples/train_olmo_hybrid_1b.sh [extra pretrain_olmo_hybrid.py flags...]
#
# Environment (defaults in brackets): GPUS_PER_NODE [all visible GPUs], TP [1], PP [1],
# SEQ_LENGTH [4096], MICRO_BATCH_SIZE [4], GLOBAL_BATCH_SIZE [512], TRAIN_ITERS [100000],
# LR [4e-4], CHECKPOINT_DIR [runs/olmo_hybrid_1b/checkpoints], TENSORBOARD_DIR [next to it],
# TOKENIZER_TYPE [from the file: .model -> SentencePieceTokenizer, else HuggingFaceTokenizer],
# DATA_PATH may hold a blend ("0.7 /p/a_text_document 0.3 /p/b_text_document").
# Flags given on the command line come last and override the ones below.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DATA_PATH:?set DATA_PATH to a preprocessed prefix (tools/preprocess_data.py output)}"
: "${TOKENIZER_MODEL:?set TOKENIZER_MODEL to a tokenizer.json or SentencePiece .model}"
GPUS_PER_NODE=${GPUS_PER_NODE:-$(python3 -c "import torch; print(max(1, torch.cuda.device_count()))")}
RUN_DIR=${RUN_DIR:-runs/olmo_hybrid_1b}
CHECKPOINT_DIR=${CHECKPOINT_DIR:-$RUN_DIR/checkpoints}
TENSORBOARD_DIR=${TENSORBOARD_DIR:-$RUN_DIR/tensorboard}
if [[ -z "${TOKENIZER_TYPE:-}" ]]; then
    [[ "$TOKENIZER_MODEL" == *.model ]] && TOKENIZER_TYPE=SentencePieceTokenizer || TOKENIZER_TYPE=HuggingFaceTokenizer
fi
export CUDA_DEVICE_MAX_CONNECTIONS=1

MODEL_ARGS=(--model-preset olmo_hybrid_1b --seq-length "${SEQ_LENGTH:-4096}")
PARALLEL_ARGS=(
    --tensor-model-parallel-size "${TP:-1}" --pipeline-model-parallel-size "${PP:-1}"
    --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
)
[[ "${TP:-1}" -gt 1 ]] && PARALLEL_ARGS+=(--sequence-parallel)
TRAINING_ARGS=(
    --micro-batch-size "${MICRO_BATCH_SIZE:-4}" --global-batch-size "${GLOBAL_BATCH_SIZE:-512}"
    --train-iters "${TRAIN_ITERS:-100000}" --bf16
    --lr "${LR:-4e-4}" --min-lr "${MIN_LR:-4e-5}" --lr-decay-style cosine
    --lr-warmup-iters "${WARMUP_ITERS:-2000}" --weight-decay 0.1 --clip-grad 1.0
    --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8 --z-loss-weight 1e-5
)
# shellcheck disable=SC2206  # DATA_PATH is a space-separated blend on purpose
DATA_ARGS=(--data-path $DATA_PATH --split "${SPLIT:-99,1,0}"
           --tokenizer-type "$TOKENIZER_TYPE" --tokenizer-model "$TOKENIZER_MODEL")
CHECKPOINT_ARGS=(--save "$CHECKPOINT_DIR" --load "$CHECKPOINT_DIR"
                 --save-interval "${SAVE_INTERVAL:-1000}")
LOGGING_ARGS=(--log-interval "${LOG_INTERVAL:-10}" --eval-interval "${EVAL_INTERVAL:-1000}"
              --eval-iters "${EVAL_ITERS:-10}" --tensorboard-dir "$TENSORBOARD_DIR")

exec python3 -m torch.distributed.run --standalone --nproc-per-node "$GPUS_PER_NODE" \
    pretrain_olmo_hybrid.py "${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${TRAINING_ARGS[@]}" \
    "${DATA_ARGS[@]}" "${CHECKPOINT_ARGS[@]}" "${LOGGING_ARGS[@]}" "$@"
