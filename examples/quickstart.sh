#!/usr/bin/env bash
# megatron-hybrid quickstart (the README's first command).
# Installs what is missing (nothing when everything imports), then runs the parity demo: a tiny
# Olmo Hybrid in HF format is converted to a Megatron checkpoint and run at TP=2 x PP=2 (4 CPU
# processes over gloo, or the GPUs present); its logits are compared with HF transformers.
# (The end-to-end pretraining run joins here when the training job lands.)
set -euo pipefail
cd "$(dirname "$0")/.."
source examples/ensure_installed.sh
ensure_installed hf
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TORCHDYNAMO_DISABLE=${TORCHDYNAMO_DISABLE:-1} HF_HUB_OFFLINE=1
exec "$PY" examples/parity_demo.py "$@"
