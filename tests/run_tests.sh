#!/usr/bin/env bash
# The README's test command: install what the tests need, then run the whole suite (CPU, gloo).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q -e ".[dev]"
export OMP_NUM_THREADS=1 TORCHDYNAMO_DISABLE=1 HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore
exec "$PY" -m pytest -q -p no:cacheprovider --durations=15 tests "$@"
