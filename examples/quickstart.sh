#!/usr/bin/env bash
# megatron-hybrid quickstart (the README's first command).
# Installs what is missing (nothing when everything imports), builds the embedded default corpus
# (standard-library English text + a SentencePiece BPE tokenizer, no download), then pretrains the
# tiny Olmo Hybrid with TP=2 x PP=2 as 4 CPU processes (or on the GPUs present): it stops after a
# checkpoint, resumes from it with the same command, and prints the loss curve and where the
# checkpoints and TensorBoard logs are. See examples/quickstart.py for the knobs.
set -euo pipefail
cd "$(dirname "$0")/.."
source examples/ensure_installed.sh
ensure_installed hf
exec "$PY" examples/quickstart.py "$@"
