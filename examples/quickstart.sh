#!/usr/bin/env bash
# megatron-hybrid quickstart (the README's first command).
# Installs what is missing (nothing when everything imports), then runs the parity demo: a tiny
# Olmo Hybrid in HF format is converted to a Megatron checkpoint and run at TP=2 x PP=2 (4 CPU
# processes over gloo, or the GPUs present); its logits are compared with HF transformers.
# (The end-to-end pretraining run joins here when the training job lands.)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "[quickstart] installing torch 2.13.0 (CPU build; install your CUDA torch first on GPU machines)"
    "$PY" -m pip install -q "torch==2.13.0"
fi
if ! "$PY" -c "import megatron.core, transformers, safetensors, sentencepiece, tokenizers, yaml, einops, psutil, megatron_hybrid" 2>/dev/null; then
    echo "[quickstart] installing megatron-hybrid and its dependencies"
    "$PY" -m pip install -q -e ".[hf]"
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TORCHDYNAMO_DISABLE=${TORCHDYNAMO_DISABLE:-1} HF_HUB_OFFLINE=1
exec "$PY" examples/parity_demo.py "$@"
