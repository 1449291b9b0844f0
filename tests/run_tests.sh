#!/usr/bin/env bash
# The README's test command: install what is missing, then run the whole suite (CPU, gloo).
set -euo pipefail
cd "$(dirname "$0")/.."
source examples/ensure_installed.sh
ensure_installed dev
export OMP_NUM_THREADS=1 TORCHDYNAMO_DISABLE=1 HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore
exec "$PY" -m pytest -q -p no:cacheprovider --durations=15 tests "$@"
