# Sourced by examples/quickstart.sh and tests/run_tests.sh: install what is missing, nothing else.
# $1: pip extras ("hf" or "dev"). Installs torch 2.13.0 (CPU build) only when no torch imports, and
# this checkout (editable) only when megatron_hybrid's packages do not resolve to this checkout.
ensure_installed() {
    local extras=$1 root
    root=$(pwd -P)
    PY=${PYTHON:-python3}
    if ! "$PY" -c "import torch" 2>/dev/null; then
        echo "[install] torch 2.13.0 (CPU build; install your CUDA torch first on GPU machines)"
        "$PY" -m pip install -q "torch==2.13.0"
    fi
    if ! ROOT="$root" EXTRAS="$extras" "$PY" - <<'PY' 2>/dev/null
import importlib, os
import megatron.core, safetensors, sentencepiece, tokenizers, yaml, einops, psutil, transformers
if os.environ["EXTRAS"] == "dev":  # the test command's own tools
    for name in ("pytest", "ruff"):
        importlib.import_module(name)
import megatron_hybrid, megatron_hybrid.layers, megatron_hybrid.kernels
root = os.environ["ROOT"] + os.sep
mods = (megatron_hybrid, megatron_hybrid.layers, megatron_hybrid.kernels)
assert all(os.path.realpath(m.__file__).startswith(root) for m in mods)
PY
    then
        echo "[install] megatron-hybrid (editable, this checkout) with extras [$extras]"
        "$PY" -m pip install -q -e ".[$extras]"
    fi
}
