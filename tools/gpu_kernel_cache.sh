#!/usr/bin/env bash
# Carry Triton's compiled kernels and fla's autotune results between fresh GPU machines.
# A cold H200 compiles every fla autotune candidate on the first iteration (measured: 323
# configs, about 1.3 s each, more than 7 minutes before the first backward); the caches live
# under ~/.triton and ~/.cache and vanish with the machine.
#   bash tools/gpu_kernel_cache.sh restore   # unpack .whl/gpu_kernel_cache.part-* into ~ (if any)
#   bash tools/gpu_kernel_cache.sh save OUT  # pack ~/.triton/cache (+ ~/.cache/fla*) into OUT/
# The archive is split into 15 MiB parts (the device tool returns files of at most 16 MiB);
# copy OUT/gpu_kernel_cache.part-* into .whl/ (ignored by git, carried to the GPU machine).
set -euo pipefail
PREFIX=gpu_kernel_cache.part-
case "${1:-}" in
  restore)
    cd "$(dirname "$0")/.."
    if ls .whl/${PREFIX}* >/dev/null 2>&1; then
      cat .whl/${PREFIX}* | tar -xz -C "$HOME" \
        && echo "kernel cache restored ($(cat .whl/${PREFIX}* | wc -c) bytes)"
    else
      echo "no .whl/${PREFIX}*: cold kernel cache"
    fi ;;
  save)
    out=${2:?usage: gpu_kernel_cache.sh save OUT_DIR}
    mkdir -p "$out" && out=$(cd "$out" && pwd)
    cd "$HOME"
    paths=$(ls -d .triton/cache .cache/fla* 2>/dev/null || true)
    [ -n "$paths" ] || { echo "nothing to save"; exit 0; }
    tar -cz $paths | split -b 15m -d - "$out/$PREFIX"
    echo "kernel cache saved: $(ls "$out"/${PREFIX}* | wc -l) parts, $(cat "$out"/${PREFIX}* | wc -c) bytes ($paths)" ;;
  *) echo "usage: $0 restore | save OUT_DIR" >&2; exit 2 ;;
esac
