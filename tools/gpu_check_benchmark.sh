#!/usr/bin/env bash
# GPU run of tools/benchmark.py: the 7B widths at 8 layers, S 8192, bf16, micro-batch 1; ours vs
# HF transformers (fla) vs megatron-core's GatedDeltaNet stack; per-layer-kind breakdown and the
# 32-layer extrapolation. The single command of a GPU session (fits the device's 10 minutes):
#   source .whl/preamble.sh || exit; bash tools/gpu_kernel_cache.sh restore; OUT=$OUT bash tools/gpu_check_benchmark.sh
# Budget: the benchmark skips phases that would start after MAX_MINUTES [6.0]; at HARD_LIMIT_S
# [420] s `timeout` sends SIGTERM (the benchmark then writes what it measured; SIGKILL 30 s
# later). Then the Triton / fla kernel cache is saved into $OUT (gpu_kernel_cache.sh; copy
# $OUT/gpu_kernel_cache.part-* into .whl/ for the next session: a cold H200 can spend the whole
# budget compiling fla's autotune candidates, a warm one starts in seconds).
# Results: $OUT/performance.md (copy to docs/performance.md), $OUT/benchmark.json,
# $OUT/benchmark.log (with TRITON_PRINT_AUTOTUNING=1: every autotuned kernel, key and time).
# Extra flags go to tools/benchmark.py (e.g. --engines ours,hf --iters 10).
# On Hopper with Triton < 3.7.1 it opts in to the fla gradient self-check, as gpu_check_training.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check_benchmark}
MAX_MINUTES=${MAX_MINUTES:-6.0}
HARD_LIMIT_S=${HARD_LIMIT_S:-420}
mkdir -p "$OUT"
export MEGATRON_HYBRID_FLA_HOPPER_SELFCHECK=${MEGATRON_HYBRID_FLA_HOPPER_SELFCHECK:-1}
export TRITON_PRINT_AUTOTUNING=${TRITON_PRINT_AUTOTUNING:-1}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
start=$(date +%s)
{
  echo "[$(date +%T)] $(nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv,noheader 2>&1)"
  echo "[$(date +%T)] kernel caches: $(du -sh ~/.triton/cache 2>/dev/null | cut -f1) triton, $(ls -d ~/.cache/fla* 2>/dev/null | wc -l) fla dirs"
} | tee "$OUT/benchmark.log"
timeout -k 30 "$HARD_LIMIT_S" python3 tools/benchmark.py --max-minutes "$MAX_MINUTES" --profile \
    --output-json "$OUT/benchmark.json" --output-md "$OUT/performance.md" "$@" 2>&1 \
    | tee -a "$OUT/benchmark.log" \
    | grep --line-buffered -vE "^(Triton autotuning for function|with key as|finished after|best config selected)"
rc=${PIPESTATUS[0]}
echo "[$(date +%T)] benchmark exit code $rc after $(( $(date +%s) - start )) s (124: hard limit)"
python3 - "$OUT/benchmark.log" <<'PY' | tee -a "$OUT/benchmark.log"
import collections, re, sys
text = open(sys.argv[1], errors="replace").read()
hits = re.findall(r"Triton autotuning for function (\S+?),\s*with key as (.*?),\s*finished after "
                  r"([\d.]+)s", text, re.S)
per = collections.defaultdict(lambda: [0, 0.0])
for name, _, sec in hits:
    per[name][0] += 1
    per[name][1] += float(sec)
print(f"autotune sessions in this run: {len(hits)}, {sum(v[1] for v in per.values()):.1f} s "
      f"(TRITON_PRINT_AUTOTUNING; keys served from the disk cache are not listed)")
for name, (n, sec) in sorted(per.items(), key=lambda kv: -kv[1][1])[:15]:
    print(f"  {name:48s} {n:3d} keys {sec:7.1f} s")
PY
bash tools/gpu_kernel_cache.sh save "$OUT" || echo "kernel cache not saved"
if [[ -s "$OUT/performance.md" ]]; then
    echo "----- $OUT/performance.md (engine table) -----"
    sed -n '/^| |/,/^$/p' "$OUT/performance.md"
fi
exit "$rc"
