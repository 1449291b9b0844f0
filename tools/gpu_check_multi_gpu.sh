#!/usr/bin/env bash
# Multi-GPU acceptance run over NCCL on every GPU of this machine (nvidia-smi -L; MAX_GPUS caps
# it): layout correctness, a checkpoint across layouts, and scaling. One command, about 5-6 minutes
# on a warm machine with 2, 4 or 8 GPUs; logs under $OUT; prints two markdown tables last.
#   source .whl/preamble.sh || exit; bash tools/gpu_kernel_cache.sh restore; OUT=$OUT bash tools/gpu_check_multi_gpu.sh
#   CPU_SMOKE=1 OUT=/tmp/mgpu bash tools/gpu_check_multi_gpu.sh   # the same logic on CPU (gloo)
#   DRY_RUN=1 NUM_GPUS=8 bash tools/gpu_check_multi_gpu.sh        # the waves and commands only
# Exit status: 0 when every loss comparison passes, 1 when one fails, 2 for bad settings (all
# settings are checked first, before anything runs or $OUT is touched; the error names the
# setting and what it allows).
#
# CPU_SMOKE=1: the same logic on the CPU, gloo processes standing for GPUs (4 at most, one run at
# a time), PyTorch kernels: the layouts ref dp2 tp2_sp pp2 cp2 tp2pp2_sp (LAYOUTS picks others),
# 3 iterations at sequence 256 (ITERS, CORR_SEQ_LENGTH), the checkpoint saved at 2 by tp2pp2_sp
# and resumed at TP1 for iteration 3, and the scaling step for the tiny preset on 1 process;
# about 2.5 minutes on 2 cores.
# DRY_RUN=1: prints the waves and each command, runs nothing, writes nothing into $OUT (the stub
# logs go to a throwaway directory), prints no table; exit 0 (2 for bad settings).
#
# 1. Correctness. Each layout trains ITERS [20] iterations of the tiny preset with the GDN head
#    dims of the 1B/7B (96/192, whose fla kernels are verified on the H200) on the embedded corpus:
#    fp32 (CORR_DTYPE=bf16), sequence 1024, micro-batch 2, global batch 8, distributed optimizer,
#    --log-interval 1, fla kernels (CORR_KERNELS=torch: the PyTorch ones, nothing to compile).
#    All layouts start from the same weights: a one-iteration lr=0 CPU run saves them and every run
#    loads them with --finetune (the trainer seeds each pipeline stage differently, as Megatron
#    does, so a PP run would otherwise start from other weights). LAYOUTS [ref dp2 tp2_sp pp2 cp2
#    tp2_nosp tp2pp2_sp tp2pp2_nosp; tp2pp2dp2_sp can be added]: TP2 with and without sequence
#    parallelism, PP2, DP2, CP2, TP2 x PP2 with and without SP. tools/compare_runs.py compares
#    each run's lm loss with ref's at every iteration: pass when |loss - ref| <= RTOL x |ref|
#    (RTOL 1e-3 fp32, 1e-2 bf16: layouts differ only in reduction order; fla's Triton dots run
#    in TF32 by default). A layout needing more GPUs than present is listed "skipped: needs N GPUs". Layouts
#    that fit side by side run at once on disjoint GPUs (first-fit waves: 8 GPUs 3, 4 GPUs 5,
#    2 GPUs 6).
# 2. Checkpoint. The CKPT_SOURCE run [tp2pp2_sp; tp2_sp below 4 GPUs] saves at SAVE_AT [10]; its
#    checkpoint (fully_reshardable: it loads at another TP / PP directly, no
#    tools/reshard_checkpoint.py needed) resumes at TP1 x PP1 on one GPU and trains to ITERS; its
#    losses are compared with the source run's and with ref's over SAVE_AT+1..ITERS.
# 3. Scaling (SCALING=0 skips it). For each GPU count in SCALING_GPUS [1 2 4 8, up to the
#    machine's], tools/tune_parallelism.py picks its top plan and measures it (--measure:
#    SCALING_ITERS [8] iterations on --mock-data, median tokens/s/GPU after the first third, peak
#    memory of the last rank) for SCALING_MODELS [1b 7b8l]: olmo_hybrid_1b at sequence 4096,
#    global batch 8 per GPU, and the 7B widths at 8 layers, sequence 8192, 4 per GPU; bf16,
#    vocabulary 100278. Runs that fit side by side share the machine on disjoint GPUs (marked * in
#    the table; SCALING_SERIAL=1: one at a time). 8 GPUs: 4 rounds, 4 GPUs: 4, 2 GPUs: 3.
#
# Time: a wave or round takes about 30-50 s on a warm machine (start-up, fla's Hopper self-check,
# the iterations). A cold one compiles fla's autotune candidates per head count and dtype (the
# trainer's parallel warm-up, --fla-warmup-workers, spreads that over up to 8 processes per run;
# the first correctness wave on 8 GPUs holds both head counts, the first scaling round both
# models): BUDGET_S [480] s after the start no wave starts any more (the rest is listed as
# skipped; the budget leaves room for the preamble within the device's 10 minutes), a run stops
# after CORR_RUN_TIMEOUT [300] / SCALING_RUN_TIMEOUT [240] s, and when the Triton cache grew, it
# is saved to $OUT/kernel_cache (SAVE_KERNEL_CACHE [auto], 1, 0; copy the parts into .whl/ and
# `gpu_kernel_cache.sh restore` them on the next machine), so the same command run again is warm.
#
# Other settings: DATA_DIR [data/embedded] (built when missing), CORR_MODEL (flags), RTOL, ATOL
# [0], CKPT_SOURCE, GPU_MEMORY_GB [nvidia-smi's / 1024], NUM_GPUS (pretend a count; with
# DRY_RUN), MAX_GPUS, MIN_START_S [40], INIT_THREADS [4], CACHE_SAVE_DEADLINE_S [560], WORK_DIR
# [$TMPDIR or /tmp]: checkpoints go to a new directory there, not into $OUT (whose files travel
# back), removed at the end unless KEEP_WORK=1. On Hopper with Triton
# < 3.7.1 it opts in to the fla gradient self-check (MEGATRON_HYBRID_FLA_HOPPER_SELFCHECK=1), as
# gpu_check_training.sh does.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
exec 3>&1   # the terminal, for DRY_RUN's command lines (run logs go to files)
OUT=${OUT:-runs/gpu_check_multi_gpu}
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore} PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
export MEGATRON_HYBRID_FLA_HOPPER_SELFCHECK=${MEGATRON_HYBRID_FLA_HOPPER_SELFCHECK:-1}

log() { echo "[$(date +%T)] $*"; }
die() { echo "gpu_check_multi_gpu.sh: error: $*" >&2; exit 2; }
elapsed() { echo $(( $(date +%s) - START )); }

# Every setting is checked here, before anything runs or touches $OUT (a bad one: exit 2).
want_flag() {  # NAME...: 0 or 1
    local name
    for name in "$@"; do
        [[ "${!name}" == 0 || "${!name}" == 1 ]] || die "$name must be 0 or 1, got '${!name}'"
    done
}
want_int() {  # NAME MIN: a whole number >= MIN (written back in decimal: 08 -> 8)
    local name=$1 min=$2 v=${!1}
    [[ "$v" =~ ^[0-9]{1,9}$ ]] && (( 10#$v >= min )) \
        || die "$name must be a whole number >= $min, got '$v'"
    printf -v "$name" '%d' "$((10#$v))"
}
want_number() {  # NAME WHAT: a decimal number (1e-3, 0.5, 2) that passes the awk test WHAT
    local name=$1 test=$2 v=${!1}
    [[ "$v" =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$ ]] \
        && awk -v x="$v" "BEGIN { exit !(x $test) }" \
        || die "$name must be a number $test, got '$v'"
}

CPU_SMOKE=${CPU_SMOKE:-0}; DRY_RUN=${DRY_RUN:-0}; SCALING=${SCALING:-1}
SCALING_SERIAL=${SCALING_SERIAL:-0}; KEEP_WORK=${KEEP_WORK:-0}
want_flag CPU_SMOKE DRY_RUN SCALING SCALING_SERIAL KEEP_WORK
[[ -z "${NUM_GPUS:-}" ]] || want_int NUM_GPUS 1
[[ -z "${MAX_GPUS:-}" ]] || want_int MAX_GPUS 1

# ---------------------------------------------------------------------------------------------
# Devices. CPU_SMOKE=1: gloo processes on the CPU stand for GPUs (4 at most, one job at a time).
if [[ "$CPU_SMOKE" == 1 ]]; then
    export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    export TORCHDYNAMO_DISABLE=${TORCHDYNAMO_DISABLE:-1}
    DEVICES=(cpu cpu cpu cpu)
    UNIT="processes"; UNIT1="process"
    WHERE="CPU smoke: up to 4 gloo processes"
else
    if [[ -n "${NUM_GPUS:-}" ]]; then
        mapfile -t DEVICES < <(seq 0 $((NUM_GPUS - 1)))
    elif [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
        IFS=, read -ra DEVICES <<< "$CUDA_VISIBLE_DEVICES"
    else
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
        if [[ "${n:-0}" -eq 0 ]]; then
            n=$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
        fi
        [[ "$n" -gt 0 ]] || die "no GPU found (nvidia-smi -L, torch.cuda.device_count()); CPU_SMOKE=1 runs the CPU smoke test, DRY_RUN=1 NUM_GPUS=N shows the plan"
        mapfile -t DEVICES < <(seq 0 $((n - 1)))
    fi
    UNIT="GPUs"; UNIT1="GPU"
    WHERE="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
fi
if [[ -n "${MAX_GPUS:-}" ]] && (( MAX_GPUS < ${#DEVICES[@]} )); then
    DEVICES=("${DEVICES[@]:0:$MAX_GPUS}")
fi
NDEV=${#DEVICES[@]}

# ---------------------------------------------------------------------------------------------
# Settings
BUDGET_S=${BUDGET_S:-480}
if [[ "$CPU_SMOKE" == 1 ]]; then
    ITERS=${ITERS:-3}; SAVE_AT=${SAVE_AT:-2}; CORR_SEQ_LENGTH=${CORR_SEQ_LENGTH:-256}
    DEFAULT_LAYOUTS="ref dp2 tp2_sp pp2 cp2 tp2pp2_sp"; NUM_WORKERS=0
    SCALING_MODELS=${SCALING_MODELS:-tiny}; SCALING_GPUS=${SCALING_GPUS:-1}
    SCALING_ITERS=${SCALING_ITERS:-3}; SAVE_KERNEL_CACHE=${SAVE_KERNEL_CACHE:-0}
else
    ITERS=${ITERS:-20}; SAVE_AT=${SAVE_AT:-10}; CORR_SEQ_LENGTH=${CORR_SEQ_LENGTH:-1024}
    DEFAULT_LAYOUTS="ref dp2 tp2_sp pp2 cp2 tp2_nosp tp2pp2_sp tp2pp2_nosp"; NUM_WORKERS=1
    SCALING_MODELS=${SCALING_MODELS:-1b 7b8l}
    SCALING_GPUS=${SCALING_GPUS:-$(printf '%s\n' 1 2 4 8 "$NDEV" | sort -nu | awk -v m="$NDEV" '$1 <= m' | xargs)}
    SCALING_ITERS=${SCALING_ITERS:-8}; SAVE_KERNEL_CACHE=${SAVE_KERNEL_CACHE:-auto}
fi
want_int ITERS 2; want_int SAVE_AT 1; want_int CORR_SEQ_LENGTH 1; SEQ=$CORR_SEQ_LENGTH
(( SAVE_AT < ITERS )) || die "SAVE_AT must be in [1, ITERS=$ITERS), got $SAVE_AT"
CORR_RUN_TIMEOUT=${CORR_RUN_TIMEOUT:-300}
SCALING_RUN_TIMEOUT=${SCALING_RUN_TIMEOUT:-240}
MIN_START_S=${MIN_START_S:-40}   # a wave starts only with this much of the budget left
INIT_THREADS=${INIT_THREADS:-4}; CACHE_SAVE_DEADLINE_S=${CACHE_SAVE_DEADLINE_S:-560}
want_int BUDGET_S 1; want_int CORR_RUN_TIMEOUT 1; want_int SCALING_RUN_TIMEOUT 1
want_int MIN_START_S 0; want_int INIT_THREADS 1; want_int CACHE_SAVE_DEADLINE_S 0
want_int SCALING_ITERS 3
case "$SAVE_KERNEL_CACHE" in auto|0|1) ;; *) die "SAVE_KERNEL_CACHE must be auto, 0 or 1, got '$SAVE_KERNEL_CACHE'" ;; esac
LAYOUTS=${LAYOUTS:-$DEFAULT_LAYOUTS}
CORR_DTYPE=${CORR_DTYPE:-fp32}
CORR_KERNELS=${CORR_KERNELS:-auto}   # auto: the trainer's choice (fla on GPUs, PyTorch on CPU)
case "$CORR_KERNELS" in
    auto) KERNELS_DESC=$([[ "$CPU_SMOKE" == 1 ]] && echo "PyTorch kernels" || echo "fla kernels") ;;
    fla|torch) KERNELS_DESC="$CORR_KERNELS kernels (forced)" ;;
    *) die "CORR_KERNELS must be auto, fla or torch, got '$CORR_KERNELS'" ;;
esac
case "$CORR_DTYPE" in
    fp32) DTYPE_FLAGS=(); RTOL=${RTOL:-1e-3} ;;
    bf16) DTYPE_FLAGS=(--bf16); RTOL=${RTOL:-1e-2} ;;
    *) die "CORR_DTYPE must be fp32 or bf16, got '$CORR_DTYPE'" ;;
esac
ATOL=${ATOL:-0}
want_number RTOL ">= 0"; want_number ATOL ">= 0"
# shellcheck disable=SC2206  # CORR_MODEL is a flag list on purpose
CORR_MODEL=(${CORR_MODEL:---model-preset tiny --linear-key-head-dim 96 --linear-value-head-dim 192})

GPU_MEMORY_GB=${GPU_MEMORY_GB:-$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1 | awk '{printf "%.1f", $1 / 1024}')}
GPU_MEMORY_GB=${GPU_MEMORY_GB:-141}
want_number GPU_MEMORY_GB "> 0"
model_flags() {  # MODEL -> "flags|seq|global batch per GPU|vocab"
    case $1 in
        1b)   echo "--model-preset olmo_hybrid_1b|4096|8|100278" ;;
        7b8l) echo "--model-preset olmo_hybrid_7b --num-layers 8|8192|4|100278" ;;
        tiny) echo "--model-preset tiny|256|2|8192" ;;
        *) return 1 ;;
    esac
}
if [[ "$SCALING" == 1 ]]; then
    [[ -n "${SCALING_MODELS// /}" ]] || die "SCALING_MODELS is empty: name 1b, 7b8l or tiny (SCALING=0 skips the scaling)"
    for m in $SCALING_MODELS; do
        model_flags "$m" > /dev/null || die "SCALING_MODELS: unknown model '$m' (allowed: 1b, 7b8l, tiny)"
    done
    [[ -n "${SCALING_GPUS// /}" ]] || die "SCALING_GPUS is empty: name GPU counts, e.g. '1 2 4' (SCALING=0 skips the scaling)"
    gpus=""
    for n in $SCALING_GPUS; do
        [[ "$n" =~ ^[0-9]{1,4}$ ]] && (( 10#$n >= 1 )) \
            || die "SCALING_GPUS must be whole numbers >= 1 (e.g. '1 2 4 8'), got '$n'"
        gpus+="${gpus:+ }$((10#$n))"
    done
    SCALING_GPUS=$gpus
fi

# Layouts: name -> processes, description, flags (all runs: the distributed optimizer).
declare -A NP DESC FLAGS DEP RAN
layout() { NP[$1]=$2; DESC[$1]=$3; FLAGS[$1]=$4; }
layout ref           1 "TP1 PP1"                ""
layout tp2_sp        2 "TP2 + SP"               "--tensor-model-parallel-size 2 --sequence-parallel"
layout tp2_nosp      2 "TP2, no SP"             "--tensor-model-parallel-size 2"
layout pp2           2 "PP2"                    "--pipeline-model-parallel-size 2"
layout dp2           2 "DP2, distributed opt."  ""
layout cp2           2 "CP2"                    "--context-parallel-size 2"
layout tp2pp2_sp     4 "TP2 x PP2 + SP"         "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --sequence-parallel"
layout tp2pp2_nosp   4 "TP2 x PP2, no SP"       "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2"
layout tp2pp2dp2_sp  8 "TP2 x PP2 x DP2 + SP"   "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --sequence-parallel"
KNOWN_LAYOUTS="ref dp2 tp2_sp tp2_nosp pp2 cp2 tp2pp2_sp tp2pp2_nosp tp2pp2dp2_sp"
for name in $LAYOUTS; do
    [[ -n "${NP[$name]:-}" ]] || die "LAYOUTS: unknown layout '$name' (allowed: $KNOWN_LAYOUTS)"
done
[[ " $LAYOUTS " == *" ref "* ]] || LAYOUTS="ref $LAYOUTS"   # the reference is always run
if [[ -z "${CKPT_SOURCE:-}" ]]; then
    if (( NDEV >= 4 )) && [[ " $LAYOUTS " == *" tp2pp2_sp "* ]]; then CKPT_SOURCE=tp2pp2_sp; else CKPT_SOURCE=tp2_sp; fi
fi
[[ -n "${NP[$CKPT_SOURCE]:-}" ]] || die "CKPT_SOURCE: unknown layout '$CKPT_SOURCE' (allowed: $KNOWN_LAYOUTS)"
RESUME=resume_tp1
layout $RESUME 1 "TP1 PP1 from the ${DESC[$CKPT_SOURCE]} checkpoint at $SAVE_AT" ""
DEP[$RESUME]=$CKPT_SOURCE
label() { echo "$1: ${DESC[$1]}, ${NP[$1]} $([[ ${NP[$1]} -gt 1 ]] && echo "$UNIT" || echo "$UNIT1")"; }

# ---------------------------------------------------------------------------------------------
# Output and work directories. DRY_RUN=1 leaves $OUT alone: its stub logs go to a throwaway
# directory, removed at the end. Checkpoints and dataset caches (hundreds of MB) stay out of
# $OUT, whose files travel back.
WORK=$(mktemp -d "${WORK_DIR:-${TMPDIR:-/tmp}}/gpu_check_multi_gpu.XXXXXX") \
    || die "cannot create a work directory under ${WORK_DIR:-${TMPDIR:-/tmp}} (WORK_DIR)"
if [[ "$DRY_RUN" == 1 ]]; then
    log "dry run: the waves and commands only; nothing is run and nothing written to $OUT"
    OUT=$WORK/out; mkdir -p "$OUT"
else
    { mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd); } || { rm -rf "$WORK"; die "cannot create OUT=$OUT"; }
fi
log "$NDEV ${UNIT} (${WHERE:-unknown GPU}); logs in $OUT$([[ "$DRY_RUN" == 1 ]] && echo " (throwaway)")"
C=$OUT/correctness; S=$OUT/scaling
rm -rf "$C" "$S"
mkdir -p "$C/logs" "$S" "$WORK/cache" || { rm -rf "$WORK"; die "cannot create $C and $S"; }
: > "$C/rows.md"; : > "$S/jobs.tsv"

TRITON_CACHE=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
cache_mb() { du -sm "$TRITON_CACHE" 2>/dev/null | cut -f1 || echo 0; }
if [[ "$DRY_RUN" != 1 ]]; then
    CACHE_MB_START=$(cache_mb); CACHE_MB_START=${CACHE_MB_START:-0}
    log "Triton kernel cache at start: ${CACHE_MB_START} MB ($TRITON_CACHE)"
fi

# Every run goes through run_timed: `timeout` leads a process group (the run, torchrun; torchrun
# forwards SIGTERM to its workers) and its id is noted, so that an interrupted check ends exactly
# the runs it started.
PIDFILE=$OUT/.run_pids; : > "$PIDFILE"
run_timed() {  # SECONDS CMD...
    local tmo=$1; shift
    if [[ "$DRY_RUN" == 1 ]]; then echo "  (dry run) CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-} $*" >&3; return 0; fi
    timeout -k 45 "$tmo" "$@" &
    local pid=$!
    echo "$pid" >> "$PIDFILE"
    wait "$pid"
}
FINISHED=0
cleanup() {
    [[ $FINISHED == 1 ]] && return
    local p
    while read -r p; do
        [[ -n "$p" ]] && kill -0 "$p" 2>/dev/null && { kill -TERM -- "-$p" 2>/dev/null || kill -TERM "$p" 2>/dev/null; }
    done < "$PIDFILE"
    [[ "$KEEP_WORK" == 1 && "$DRY_RUN" != 1 ]] || rm -rf "${WORK:-/nonexistent}"
}
trap cleanup EXIT
trap 'log "interrupted: stopping the runs"; exit 130' INT TERM

# ---------------------------------------------------------------------------------------------
# Data: the embedded corpus (standard-library text + SentencePiece tokenizer), reused if built.
DATA_DIR=${DATA_DIR:-data/embedded}
DATA=$DATA_DIR/corpus_text_document
TOK=$DATA_DIR/tokenizer.model
if [[ "$DRY_RUN" != 1 ]]; then
    python3 tools/build_embedded_corpus.py --output-dir "$DATA_DIR" 2>&1 | sed -n 1p \
        || die "building the embedded corpus in $DATA_DIR failed"
    [[ -f "$DATA.bin" && -f "$TOK" ]] || die "no corpus in $DATA_DIR (expected corpus_text_document.bin and tokenizer.model)"
fi

COMMON=(pretrain_olmo_hybrid.py "${CORR_MODEL[@]}"
        --seq-length "$SEQ" --micro-batch-size 2 --global-batch-size 8 --train-iters "$ITERS"
        --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters 2 --clip-grad 1.0
        --use-distributed-optimizer --no-skip-step --seed 1234
        --data-path "$DATA" --split 98,2,0 --tokenizer-type SentencePieceTokenizer
        --tokenizer-model "$TOK" --log-interval 1 --eval-iters 0 --eval-interval 100000
        --num-workers "$NUM_WORKERS")
INIT=$WORK/init_weights; SRC_CKPT=$WORK/ckpt_$CKPT_SOURCE; RESUME_CKPT=$WORK/ckpt_at_$SAVE_AT

torchrun_logged() {  # LOG TIMEOUT NPROC FLAGS...: one torchrun, the command line first in the log
    local logf=$1 tmo=$2 np=$3; shift 3
    {
        echo "# CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-} python3 -m torch.distributed.run --standalone --nproc-per-node $np $*"
        run_timed "$tmo" python3 -m torch.distributed.run --standalone --nproc-per-node "$np" "$@"
        local rc=$?
        echo "# exit status $rc$([[ $rc == 124 ]] && echo " (timed out after $tmo s)")"
        return $rc
    } > "$logf" 2>&1
}

last_loss() {  # LOG -> "lm loss FIRST (it 1) -> LAST (it N)", or why there is none
    python3 - "$1" <<'PY'
import sys
from megatron_hybrid.training.compare_runs import parse_log
p = parse_log(sys.argv[1])
its = sorted(p.values)
if its:
    print(f"lm loss {p.values[its[0]]:.4f} (it {its[0]}) -> {p.values[its[-1]]:.4f} (it {its[-1]})")
else:
    print("no iteration lines" + (" (timed out)" if p.timed_out else "")
          + (f"; {p.first_error[:200]}" if p.first_error else ""))
PY
}

corr_job() {  # NAME: one correctness run (in the background, CUDA_VISIBLE_DEVICES already set)
    local name=$1 tmo=$2 logf=$C/logs/$1.log
    local -a flags
    [[ "$CORR_KERNELS" == auto ]] || export MEGATRON_HYBRID_KERNELS=$CORR_KERNELS  # (a subshell)
    # shellcheck disable=SC2206  # the layout flags are a word list
    flags=(${FLAGS[$name]})
    if [[ "$name" == "$RESUME" ]]; then
        local it_dir; it_dir=$(printf 'iter_%07d' "$SAVE_AT")
        if [[ ! -d "$SRC_CKPT/$it_dir" && "$DRY_RUN" != 1 ]]; then
            echo "gpu_check_multi_gpu.sh: error: not run: no checkpoint $SRC_CKPT/$it_dir (did the $CKPT_SOURCE run fail? see its log)" > "$logf"
            return 1
        fi
        rm -rf "$RESUME_CKPT" && mkdir -p "$RESUME_CKPT"
        [[ "$DRY_RUN" == 1 ]] || cp -r "$SRC_CKPT/$it_dir" "$RESUME_CKPT/"
        echo "$SAVE_AT" > "$RESUME_CKPT/latest_checkpointed_iteration.txt"
        flags+=(--load "$RESUME_CKPT")
    else
        flags+=(--load "$INIT" --finetune)
        [[ "$name" == "$CKPT_SOURCE" ]] && flags+=(--save "$SRC_CKPT" --save-interval "$SAVE_AT")
    fi
    torchrun_logged "$logf" "$tmo" "${NP[$name]}" "${COMMON[@]}" \
        "${DTYPE_FLAGS[@]+"${DTYPE_FLAGS[@]}"}" "${flags[@]}" --data-cache-path "$WORK/cache/$name"
}

# run_waves KIND JOB...: first-fit waves of jobs on disjoint devices (one job per wave on the CPU
# or with SERIAL=1); a job waits for DEP[job]. KIND: corr or scale (job "MODEL:N").
run_waves() {
    local kind=$1; shift
    local -a pending=("$@")
    local wave_no=0
    while ((${#pending[@]})); do
        local left=$(( BUDGET_S - $(elapsed) ))
        if (( left < MIN_START_S )); then
            for j in "${pending[@]}"; do skipped "$kind" "$j" "skipped: time budget (BUDGET_S=$BUDGET_S)"; done
            return
        fi
        local free=$NDEV dev=0
        local -a wave=() rest=() pids=() names=()
        for j in "${pending[@]}"; do
            local np dep=${DEP[$j]:-}
            np=$(job_np "$kind" "$j")
            if [[ -n "$dep" && " ${pending[*]} " == *" $dep "* ]] || (( np > free )) \
                || { [[ "$CPU_SMOKE" == 1 || "${SERIAL:-0}" == 1 ]] && ((${#wave[@]})); }; then
                rest+=("$j")
            else
                wave+=("$j"); free=$((free - np))
            fi
        done
        ((${#wave[@]})) || { for j in "${pending[@]}"; do skipped "$kind" "$j" "skipped: not schedulable"; done; return; }
        wave_no=$((wave_no + 1))
        local tmo=$(( left < ${TIMEOUT_CAP} ? left : TIMEOUT_CAP ))
        local desc="" devs
        local -a slices=()
        for j in "${wave[@]}"; do  # disjoint device slices, in order
            local np; np=$(job_np "$kind" "$j")
            devs=$(IFS=,; echo "${DEVICES[*]:$dev:$np}")
            [[ "$CPU_SMOKE" == 1 ]] && devs=""
            slices+=("$devs"); desc+=" $j[${devs:-cpu x$np}]"
            dev=$((dev + np))
        done
        log "$kind wave $wave_no (timeout ${tmo} s):$desc"
        for i in "${!wave[@]}"; do
            local j=${wave[$i]}
            ( export CUDA_VISIBLE_DEVICES=${slices[$i]}; t_job=$(date +%s); "${kind}_job" "$j" "$tmo"; rc=$?
              echo $(( $(date +%s) - t_job )) > "$OUT/.seconds_$j"; exit $rc ) &
            pids+=($!); names+=("$j"); RAN[$j]=1
            [[ "$DRY_RUN" == 1 ]] && wait "$!"   # one after the other: the commands in order
        done
        for i in "${!pids[@]}"; do
            [[ "$DRY_RUN" == 1 ]] && continue     # (waited for above)
            wait "${pids[$i]}"; local rc=$?
            report "$kind" "${names[$i]}" "$rc" "$(cat "$OUT/.seconds_${names[$i]}" 2>/dev/null || echo '?')" "${#wave[@]}"
            rm -f "$OUT/.seconds_${names[$i]}"
        done
        pending=("${rest[@]+"${rest[@]}"}")
    done
}

job_np() { if [[ $1 == corr ]]; then echo "${NP[$2]}"; else echo "${2#*:}"; fi; }

skipped() {  # KIND JOB REASON
    if [[ $1 == corr ]]; then
        echo "| $(label "$2") | ref | - | - | - | - | $3 |" >> "$C/rows.md"
        log "  $2: $3"
    else
        printf '%s\t%s\t%s\t%s\t%s\n' "${2%%:*}" "${2#*:}" "$3" "-" 0 >> "$S/jobs.tsv"
        log "  scaling ${2%%:*} on ${2#*:} GPU(s): $3"
    fi
}

report() {  # KIND JOB RC SECONDS JOBS_IN_THE_WAVE
    [[ "$DRY_RUN" == 1 ]] && return 0   # nothing ran
    if [[ $1 == corr ]]; then
        log "  $2: exit $3 after $4 s; $(last_loss "$C/logs/$2.log")"
    else
        local m=${2%%:*} n=${2#*:}
        printf '%s\t%s\t%s\t%s\t%s\n' "$m" "$n" "exit $3" "$4" "$5" >> "$S/jobs.tsv"
        log "  scaling $m on $n GPU(s): exit $3 after $4 s; $(grep -m1 -oE "measuring [^:]*" "$S/${m}_${n}gpu.log" 2>/dev/null)"
    fi
}

# ---------------------------------------------------------------------------------------------
# 1 + 2: correctness and the checkpoint
log "correctness: ${CORR_DTYPE}, ${KERNELS_DESC}, ${ITERS} iterations, sequence ${SEQ}, global batch 8, layouts: $LAYOUTS; checkpoint source: $CKPT_SOURCE"
log "initial weights: one lr=0 iteration on the CPU, saved to $INIT"
( export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=$INIT_THREADS
  torchrun_logged "$C/logs/init_weights.log" 300 1 "${COMMON[@]}" --train-iters 1 --lr 0 \
      --min-lr 0 --lr-warmup-iters 0 --micro-batch-size 1 --global-batch-size 1 \
      --use-cpu-initialization --save "$INIT" --no-save-optim --data-cache-path "$WORK/cache/init" )
[[ "$DRY_RUN" == 1 || -f "$INIT/latest_checkpointed_iteration.txt" ]] \
    || { tail -5 "$C/logs/init_weights.log" >&2; die "the initial-weights run failed (see $C/logs/init_weights.log)"; }

# Order for first-fit waves: the checkpoint source first, then ref, then LAYOUTS' order; the
# resume last (it waits for its source). 8 GPUs: 3 waves, 4 GPUs: 5, 2 GPUs: 6.
declare -a CORR_JOBS=()
for name in $CKPT_SOURCE ref $LAYOUTS; do
    [[ " $LAYOUTS " == *" $name "* && " ${CORR_JOBS[*]-} " != *" $name "* ]] || continue
    if (( NP[$name] > NDEV )); then
        grep -q "^| $name:" "$C/rows.md" || skipped corr "$name" "skipped: needs ${NP[$name]} ${UNIT}"
    else CORR_JOBS+=("$name"); fi
done
if [[ " ${CORR_JOBS[*]} " == *" $CKPT_SOURCE "* ]]; then
    CORR_JOBS+=("$RESUME")
else
    echo "| $(label $RESUME) | $CKPT_SOURCE | - | - | - | - | skipped: its source layout $CKPT_SOURCE does not run here |" >> "$C/rows.md"
fi
TIMEOUT_CAP=$CORR_RUN_TIMEOUT
run_waves corr "${CORR_JOBS[@]}"

compare_rows() {  # REFERENCE ITERATIONS SPEC...: table rows of tools/compare_runs.py, with a FAIL
                  # row for a run or reference that left no log; returns 1 when one fails
    local ref=$1 its=$2 spec rc=0; shift 2
    local ref_log=$C/logs/$ref.log
    local -a present=()
    for spec in "$@"; do
        if [[ ! -f "$ref_log" ]]; then
            echo "| ${spec%%=*} | $ref | $its | - | - | - | FAIL: not compared: the $ref run left no log |"; rc=1
        elif [[ ! -f "${spec#*=}" ]]; then
            echo "| ${spec%%=*} | $ref | $its | - | - | - | FAIL: the run left no log (${spec#*=}) |"; rc=1
        else
            present+=("$spec")
        fi
    done
    if ((${#present[@]})); then
        python3 tools/compare_runs.py --no-header --reference "$ref=$ref_log" --iterations "$its" \
            --rtol "$RTOL" --atol "$ATOL" "${present[@]}" || rc=1
    fi
    return $rc
}
CORR_OK=1
if [[ "$DRY_RUN" != 1 ]]; then
    log "comparing losses (tools/compare_runs.py, tolerance ${RTOL} relative)"
    declare -a SPECS=()
    for j in "${CORR_JOBS[@]}"; do
        [[ $j == ref || $j == "$RESUME" || -z "${RAN[$j]:-}" ]] || SPECS+=("$(label "$j")=$C/logs/$j.log")
    done
    ROWS_BEFORE=$(cat "$C/rows.md")
    REF_SUMMARY=$(last_loss "$C/logs/ref.log")
    [[ "$REF_SUMMARY" == "lm loss"* ]] || CORR_OK=0
    {
        echo "| $(label ref) | - | 1-$ITERS | - | - | - | reference: ${REF_SUMMARY//|//} |"
        if ((${#SPECS[@]})); then
            compare_rows ref "1-$ITERS" "${SPECS[@]}" || CORR_OK=0
        fi
        if [[ -n "${RAN[$RESUME]:-}" ]]; then
            for against in "$CKPT_SOURCE" ref; do
                compare_rows "$against" "$((SAVE_AT + 1))-$ITERS" "$(label $RESUME)=$C/logs/$RESUME.log" \
                    || CORR_OK=0
            done
        fi
        echo "$ROWS_BEFORE"
    } > "$C/rows.tmp" && grep -v '^$' "$C/rows.tmp" > "$C/rows.md"; rm -f "$C/rows.tmp"
fi

# ---------------------------------------------------------------------------------------------
# 3: scaling through tools/tune_parallelism.py --measure
# (GPU_MEMORY_GB and model_flags: see the settings at the top, where they are checked)
scale_job() {  # MODEL:N TIMEOUT
    local m=${1%%:*} n=${1#*:} tmo=$2 spec flags seq per vocab
    spec=$(model_flags "$m"); IFS='|' read -r flags seq per vocab <<< "$spec"
    # shellcheck disable=SC2086  # flags is a word list
    run_timed "$tmo" python3 tools/tune_parallelism.py $flags --vocab-size "$vocab" \
        --num-gpus "$n" --gpu-memory-gb "$GPU_MEMORY_GB" --seq-length "$seq" \
        --global-batch-size $((per * n)) --top 5 --measure --measure-top-k 1 \
        --measure-iters "$SCALING_ITERS" --measure-dir "$S/${m}_${n}gpu" \
        --measure-output "$S/${m}_${n}gpu.jsonl" --measure-timeout 100000 \
        > "$S/${m}_${n}gpu.log" 2>&1
}
if [[ "$SCALING" == 1 ]]; then
    declare -a SCALE_JOBS=()
    for n in $SCALING_GPUS; do
        for m in $SCALING_MODELS; do
            if (( n > NDEV )); then skipped scale "$m:$n" "skipped: needs $n ${UNIT}"; else SCALE_JOBS+=("$m:$n"); fi
        done
    done
    log "scaling: models $SCALING_MODELS on $SCALING_GPUS GPU(s), bf16, mock data, ${SCALING_ITERS} iterations each, ${GPU_MEMORY_GB} GiB per GPU"
    TIMEOUT_CAP=$SCALING_RUN_TIMEOUT
    SERIAL=$SCALING_SERIAL run_waves scale "${SCALE_JOBS[@]+"${SCALE_JOBS[@]}"}"
fi

if [[ "$DRY_RUN" == 1 ]]; then
    log "dry run done: nothing was run, nothing written to the output folder"
    exit 0   # the EXIT trap removes the throwaway directory
fi

# ---------------------------------------------------------------------------------------------
# Kernel cache for the next machine (before the tables, which come last)
CACHE_MB_END=$(cache_mb); CACHE_MB_END=${CACHE_MB_END:-0}
if [[ "$SAVE_KERNEL_CACHE" == 1 || ( "$SAVE_KERNEL_CACHE" == auto && $CACHE_MB_END -gt $(( CACHE_MB_START + CACHE_MB_START / 20 + 1 )) ) ]]; then
    left=$(( CACHE_SAVE_DEADLINE_S - $(elapsed) ))
    if (( left > 10 )); then
        log "kernel cache grew ${CACHE_MB_START} -> ${CACHE_MB_END} MB: saving it to $OUT/kernel_cache"
        rm -rf "$OUT/kernel_cache" "$OUT/kernel_cache.partial"
        if timeout $(( left < 60 ? left : 60 )) bash tools/gpu_kernel_cache.sh save "$OUT/kernel_cache.partial"; then
            mv "$OUT/kernel_cache.partial" "$OUT/kernel_cache"
        else
            rm -rf "$OUT/kernel_cache.partial"; log "  kernel cache save failed or timed out"
        fi
    else
        log "kernel cache grew ${CACHE_MB_START} -> ${CACHE_MB_END} MB; not saved (no time left)"
    fi
fi

# ---------------------------------------------------------------------------------------------
# Tables
FINISHED=1; rm -f "$PIDFILE"
[[ "$KEEP_WORK" == 1 ]] && log "checkpoints kept in $WORK" || rm -rf "$WORK"
log "done after $(elapsed) s"
echo
echo "### Correctness over $([[ $CPU_SMOKE == 1 ]] && echo "gloo (CPU smoke)" || echo NCCL): ${CORR_DTYPE}, ${KERNELS_DESC}, lm loss per iteration vs the 1-${UNIT1} run; pass: |diff| <= ${RTOL} x |loss|$([[ $ATOL != 0 ]] && echo " + $ATOL")"
echo
echo "| run | reference | iterations | max abs diff (iteration) | max rel diff | tolerance | result |"
echo "|---|---|---|---|---|---|---|"
cat "$C/rows.md"
if [[ "$SCALING" == 1 ]]; then
    echo
    python3 - "$S" "$SCALING_ITERS" "$SCALING_SERIAL" <<'PY'
import json, os, sys
out, iters, serial = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
names = {"1b": "olmo_hybrid_1b, seq 4096, vocab 100278",
         "7b8l": "7B widths x 8 layers, seq 8192, vocab 100278", "tiny": "tiny, seq 256"}
jobs = []
for line in open(os.path.join(out, "jobs.tsv")):
    m, n, status, secs, peers = line.rstrip("\n").split("\t")
    jobs.append((m, int(n), status, secs, int(peers)))
def record(m, n):
    path = os.path.join(out, f"{m}_{n}gpu.jsonl")
    if not os.path.exists(path):
        return None
    recs = [json.loads(l) for l in open(path) if l.strip()]
    return recs[-1] if recs else None
def err(p, m):
    return "-" if p is None or not m else f"{100 * (p - m) / m:+.1f}%"
print("### Scaling: the top plan of tools/tune_parallelism.py per GPU count, bf16, mock data "
      f"({iters} iterations; measured: median tokens/s/GPU after the first third, peak "
      "memory allocated of the last rank)")
print()
print("| model | GPUs | plan | tokens/s/GPU predicted | measured | error | vs 1 GPU "
      "| peak GiB predicted | measured | error |")
print("|---|---|---|---|---|---|---|---|---|---|")
base = {}
shared = False
for m, n, status, secs, peers in sorted(jobs, key=lambda j: (j[0], j[1])):
    r = record(m, n)
    if r is None or r.get("measured_tokens_per_s") is None:
        why = status if status.startswith("skipped") else (
            f"no measurement ({status}{', ' + secs + ' s' if secs != '-' else ''}; see "
            f"scaling/{m}_{n}gpu.log)")
        plan = r["plan"] if r else "-"
        print(f"| {names.get(m, m)} | {n} | {plan} | - | {why} | - | - | - | - | - |")
        continue
    pt, mt = r["tokens_per_s_per_gpu"], r["measured_tokens_per_s"]
    pm, mm = r["last_stage_peak_gib"], r["measured_mem_gib"]
    if n == 1:
        base[m] = mt
    eff = f"{mt / base[m]:.2f}x" if m in base and n > 1 else ("1.00x" if n == 1 else "-")
    rss = " (CPU RSS)" if r.get("measured_mem_kind") == "peak-rss-gib" else ""
    star = "*" if peers > 1 else ""
    shared = shared or peers > 1
    print(f"| {names.get(m, m)} | {n} | {r['plan']} | {pt:,.0f} | {mt:,.0f}{star} | {err(pt, mt)} | "
          f"{eff} | {pm:.1f} | {'-' if mm is None else f'{mm:.1f}'}{rss} | {err(pm, mm)} |")
if shared:
    print()
    print("\\* measured while other runs of its round used the other GPUs of the machine "
          "(SCALING_SERIAL=1: one run at a time).")
PY
fi
[[ $CORR_OK == 1 ]] || exit 1
