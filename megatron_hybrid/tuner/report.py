"""Text output of the tuner: the ranked table, ``--explain``'s breakdown, launch flags."""
from __future__ import annotations

import shlex
from collections import OrderedDict
from collections.abc import Sequence

from megatron_hybrid.config import PRESETS, OlmoHybridConfig
from megatron_hybrid.training.flops import training_flops_per_token
from megatron_hybrid.tuner.activations import layer_terms, local_shapes
from megatron_hybrid.tuner.memory import GIB
from megatron_hybrid.tuner.plans import CP_MIN_SEQ_LENGTH, Job, Pins, Plan
from megatron_hybrid.tuner.search import Evaluation
from megatron_hybrid.tuner.throughput import Hardware, Throughput

SCRIPT_7B = "examples/train_olmo_hybrid_7b.sh"
#: fields that do not change the model's shape (ids, init, epsilons, max positions)
_NON_SHAPE = {"eos_token_id", "pad_token_id", "bos_token_id", "init_method_std", "norm_epsilon",
              "gdn_norm_epsilon", "max_position_embeddings", "vocab_size", "padded_vocab_size"}


def header(cfg: OlmoHybridConfig, job: Job, hw: Hardware) -> str:
    """Two lines describing the model and the job."""
    types = cfg.layout.layer_types
    n_g = sum(1 for t in types if t == "G")
    from megatron_hybrid.tuner.params import stage_parameters
    n = sum(x for _, x in stage_parameters(cfg, 1, (cfg.num_layers,), 0))
    tokens = job.global_batch_size * job.seq_length
    return (f"Olmo Hybrid: {n / 1e9:.2f} B parameters, {cfg.num_layers} layers ({n_g} GDN + "
            f"{len(types) - n_g} attention), d {cfg.hidden_size}, vocabulary "
            f"{cfg.padded_vocab_size}; {training_flops_per_token(cfg, job.seq_length) / 1e9:.1f} "
            f"GFLOP/token (docs/model.md §10)\n"
            f"Job: {job.num_gpus} GPUs ({job.gpus_per_node} per node) x {hw.memory_gib:g} GiB "
            f"({hw.usable_bytes / GIB:.1f} usable), sequence {job.seq_length}, global batch "
            f"{job.global_batch_size} ({tokens / 1e6:.2f} M tokens), "
            f"{'bf16' if job.bf16 else 'fp32'}; MFU against {hw.peak_tflops:g} TFLOP/s")


def table(evals: Sequence[Evaluation], top: int = 10, show_all: bool = False) -> str:
    """The ranked table (best first), a summary of the plans left out, and the reasons.

    Columns: ``#mb`` micro-batches per iteration and data-parallel rank; ``mem/GPU`` the
    largest predicted per-rank peak. Status: ``ok``; ``no fit > X GiB (stage r)``;
    ``refused [x]`` with reason [x] printed in full below the table.
    """
    rows = list(evals) if show_all else list(evals[:top])
    notes: OrderedDict[str, str] = OrderedDict()

    def note(reason: str) -> str:
        return notes.setdefault(reason, chr(ord("a") + len(notes)) if len(notes) < 26
                                else str(len(notes)))

    sw = max([11] + [len("/".join(map(str, ev.plan.stage_sizes))) for ev in rows])
    lines = [f"{'#':>3}  {'TP':>2} {'PP':>2} {'stages':<{sw}} {'DP':>4} {'CP':>2} {'mbs':>3} "
             f"{'#mb':>4}  {'recompute':<9} {'distopt':<7} {'mem/GPU':>9} {'tokens/s/GPU':>12} "
             f"{'MFU':>6}  status"]
    for i, ev in enumerate(rows, 1):
        p, t = ev.plan, ev.throughput
        stages = "/".join(map(str, p.stage_sizes)) if p.pp > 1 else "-"
        mem = f"{ev.peak / GIB:.1f} GiB" if ev.memory else "-"
        tps = f"{t.tokens_per_s_per_gpu:,.0f}" if t else "-"
        mfu = f"{100 * t.mfu:.1f}%" if t else "-"
        if ev.reason is not None:
            status = f"refused [{note(ev.reason)}]"
        elif not ev.fits:
            status = f"no fit > {ev.usable_bytes / GIB:.1f} GiB (stage {ev.worst_stage})"
        else:
            status = "ok"
        lines.append(f"{i:>3}  {p.tp:>2} {p.pp:>2} {stages:<{sw}} {p.dp:>4} {p.cp:>2} {p.mbs:>3} "
                     f"{p.num_microbatches or '-':>4}  {p.recompute:<9} "
                     f"{'yes' if p.distributed_optimizer else 'no':<7} {mem:>9} {tps:>12} "
                     f"{mfu:>6}  {status}")
    left = list(evals[len(rows):])
    if left:
        fit = [ev for ev in left if ev.fits]
        nofit = [ev for ev in left if ev.reason is None and not ev.fits]
        refused = [ev for ev in left if ev.reason is not None]
        lines.append(f"Not shown ({len(left)} plans; --show-all lists them):")
        if fit:
            lines.append(f"  {len(fit)} more plans that fit")
        if nofit:
            best = min(nofit, key=lambda e: e.peak)
            lines.append(f"  {len(nofit)} do not fit in memory (closest: {best.plan.label()} "
                         f"needs {best.peak / GIB:.1f} GiB)")
        groups = OrderedDict()
        for ev in refused:
            groups.setdefault(ev.reason, []).append(ev)
        for reason, evs in groups.items():
            labels = ", ".join(sorted({f"TP{e.plan.tp} PP{e.plan.pp}" + (
                f" CP{e.plan.cp}" if e.plan.cp > 1 else "") for e in evs}))
            lines.append(f"  {len(evs)} refused [{note(reason)}] ({labels})")
    if notes:
        lines.append("Refused because:")
        lines += [f"  [{key}] {reason}" for reason, key in notes.items()]
    return "\n".join(lines)


def model_flags(cfg: OlmoHybridConfig) -> list[str]:
    """pretrain_olmo_hybrid.py shape flags that rebuild ``cfg`` (without the vocabulary, which
    comes from the tokenizer or ``--vocab-size``)."""
    flags = ["--num-layers", cfg.num_layers, "--hidden-size", cfg.hidden_size,
             "--ffn-hidden-size", cfg.ffn_hidden_size, "--num-attention-heads",
             cfg.num_attention_heads, "--num-query-groups", cfg.num_query_groups,
             "--kv-channels", cfg.kv_channels, "--hybrid-layer-pattern",
             cfg.layout.pattern(with_stages=False), "--linear-num-key-heads",
             cfg.linear_num_key_heads, "--linear-num-value-heads", cfg.linear_num_value_heads,
             "--linear-key-head-dim", cfg.linear_key_head_dim, "--linear-value-head-dim",
             cfg.linear_value_head_dim, "--linear-conv-kernel-dim", cfg.linear_conv_kernel_dim,
             "--position-embedding-type", cfg.position_embedding_type,
             "--make-vocab-size-divisible-by", cfg.make_vocab_size_divisible_by]
    if cfg.position_embedding_type == "rope":
        flags += ["--rotary-base", f"{cfg.rotary_base:g}"]
    flags.append("--untie-embeddings-and-output-weights" if cfg.untie_embeddings_and_output_weights
                 else "--tie-embeddings-and-output-weights")
    return [str(f) for f in flags]


def same_shape(cfg: OlmoHybridConfig, preset: str) -> bool:
    """``cfg`` has the shape of ``preset`` (ids, epsilons and vocabulary aside)."""
    ref = OlmoHybridConfig(**PRESETS[preset]).to_dict()
    mine = cfg.to_dict()
    return all(mine[k] == v for k, v in ref.items() if k not in _NON_SHAPE)


def parallel_flags(cfg: OlmoHybridConfig, plan: Plan, job: Job) -> list[str]:
    """The layout flags of pretrain_olmo_hybrid.py for ``plan``."""
    f = ["--tensor-model-parallel-size", str(plan.tp), "--pipeline-model-parallel-size",
         str(plan.pp)]
    if plan.cp > 1:
        f += ["--context-parallel-size", str(plan.cp)]
    f += ["--micro-batch-size", str(plan.mbs), "--global-batch-size",
          str(job.global_batch_size), "--seq-length", str(job.seq_length)]
    if plan.sequence_parallel:
        f.append("--sequence-parallel")
    if plan.distributed_optimizer:
        f.append("--use-distributed-optimizer")
        if job.overlap_param_gather:
            f.append("--overlap-param-gather")
    if job.overlap_grad_reduce:
        f.append("--overlap-grad-reduce")
    if job.ddp_bucket_size:
        f += ["--ddp-bucket-size", str(job.ddp_bucket_size)]
    if plan.recompute == "full":
        f += ["--recompute-granularity", "full", "--recompute-method", "uniform",
              "--recompute-num-layers", "1"]
    elif plan.recompute == "selective":
        f += ["--recompute-granularity", "selective"]
    if plan.uneven:
        f += ["--hybrid-layer-pattern", plan.pattern(cfg)]
    if job.bf16:
        f.append("--bf16")
    return f


def script_invocation(cfg: OlmoHybridConfig, plan: Plan, job: Job
                      ) -> tuple[dict[str, str], list[str]] | None:
    """(environment, trailing flags) that make ``examples/train_olmo_hybrid_7b.sh`` run
    ``plan``, or None when the script cannot (it always passes --use-distributed-optimizer,
    --overlap-grad-reduce, --overlap-param-gather and --bf16); CP goes in its ``CP`` variable."""
    if not (plan.distributed_optimizer and job.overlap_grad_reduce and job.overlap_param_gather
            and job.bf16 and not job.ddp_bucket_size):
        return None
    env = {"NNODES": str(max(job.num_gpus // job.gpus_per_node, 1)),
           "GPUS_PER_NODE": str(min(job.gpus_per_node, job.num_gpus)), "TP": str(plan.tp),
           "PP": str(plan.pp), "SEQ_LENGTH": str(job.seq_length),
           **({"CP": str(plan.cp)} if plan.cp > 1 else {}),
           "MICRO_BATCH_SIZE": str(plan.mbs), "GLOBAL_BATCH_SIZE": str(job.global_batch_size),
           "RECOMPUTE": plan.recompute}
    trailing: list[str] = []
    if not same_shape(cfg, "olmo_hybrid_7b"):
        trailing += model_flags(cfg)
    if plan.uneven:
        trailing += ["--hybrid-layer-pattern", plan.pattern(cfg)]
    if not job.z_loss:
        trailing += ["--z-loss-weight", "0"]
    return env, trailing


def launch_flags(cfg: OlmoHybridConfig, plan: Plan, job: Job) -> str:
    """Ready-to-paste launch lines: ``examples/train_olmo_hybrid_7b.sh`` with its environment
    variables (and trailing flags where the script has no variable), and the plain flags."""
    lines = []
    inv = script_invocation(cfg, plan, job)
    if inv is not None:
        env, trailing = inv
        cmd = " ".join(f"{k}={v}" for k, v in env.items()) + f" \\\n    bash {SCRIPT_7B}"
        if trailing:
            cmd += " " + " ".join(shlex.quote(x) for x in trailing)
        lines.append(f"# {SCRIPT_7B} on each node (with NODE_RANK, MASTER_ADDR, DATA_PATH, "
                     f"TOKENIZER_MODEL):")
        lines.append(cmd)
    else:
        lines.append(f"# {SCRIPT_7B} always passes --use-distributed-optimizer --overlap-grad-"
                     f"reduce --overlap-param-gather --bf16; launch pretrain_olmo_hybrid.py "
                     f"with the flags below instead")
    lines.append("# layout flags of pretrain_olmo_hybrid.py:")
    lines.append(" ".join(shlex.quote(x) for x in parallel_flags(cfg, plan, job)))
    return "\n".join(lines)


def _gib(x: float) -> str:
    return f"{x / GIB:8.2f}"


_MEMORY_ROWS = (
    ("weights (param buffer)", lambda m: m.static.params),
    ("gradients (fp32 buffer)", lambda m: m.static.grads),
    ("optimizer: fp32 main params", lambda m: m.static.main_params),
    ("optimizer: exp_avg", lambda m: m.static.exp_avg),
    ("optimizer: exp_avg_sq", lambda m: m.static.exp_avg_sq),
    ("  tokens per micro-batch (mbs x S/CP)", None),
    ("activations, all in flight", lambda m: m.activations),
    ("  micro-batches in flight", None),
    ("full recompute: one layer", lambda m: m.recompute_extra),
    ("head + loss (saved)", lambda m: m.head),
    ("head backward transient", lambda m: m.head_transient),
    ("layer backward transient", lambda m: m.layer_transient),
    ("pipeline send/recv buffers", lambda m: m.pipeline_buffers),
    ("sequence-parallel buffer", lambda m: m.sp_buffer),
    ("runtime (cuBLAS, RoPE, batch)", lambda m: m.runtime),
    ("peak forward/backward", lambda m: m.peak_fwd_bwd),
    ("peak optimizer step", lambda m: m.peak_step),
    ("PEAK", lambda m: m.peak),
)


def _explain_header(cfg: OlmoHybridConfig, ev: Evaluation, job: Job, rank: int | None) -> list[str]:
    """Title, micro-batches and status; under CP what each rank holds."""
    p = ev.plan
    title = f"Plan{'' if rank is None else f' #{rank}'}: {p.label()}"
    out = [title, "=" * len(title),
           f"{p.num_microbatches} micro-batches of {p.mbs} x {job.seq_length} tokens per data-"
           f"parallel rank per iteration; status: {ev.status}"]
    if p.cp > 1:
        out.append(f"Context parallel {p.cp} (head-parallel all-to-all): each rank holds "
                   f"{job.seq_length // p.cp} tokens of every sequence outside the mixers; the "
                   f"mixers see all {job.seq_length} for heads/(TP x CP) = "
                   f"{cfg.num_attention_heads // (p.tp * p.cp)} attention / "
                   f"{cfg.linear_num_value_heads // (p.tp * p.cp)} GDN heads; gradients and "
                   f"optimizer shards over DP x CP = {p.dp_cp} ranks")
    return out


def _shown_stages(n: int) -> list[int]:
    """The stages the tables show: all up to 4, else the first two and the last two."""
    return list(range(n)) if n <= 4 else sorted({0, 1, n - 2, n - 1})


def _memory_table(ev: Evaluation, stages: list[int]) -> list[str]:
    """GiB per stage of every allocation (``memory.RankMemory``), then the usable memory."""
    mem, p = ev.memory, ev.plan
    head = "".join(f"{'stage ' + str(r):>10}" for r in stages)
    out = ["", f"Memory per GPU (GiB){'':17}{head}"]
    out.append(f"  {'layers (GDN + attention)':<34}" + "".join(
        f"{str(mem[r].layers.get('G', 0)) + ' + ' + str(mem[r].layers.get('*', 0)):>10}"
        for r in stages))
    for name, fn in _MEMORY_ROWS:
        if fn is None and name.strip().startswith("tokens"):
            out.append(f"  {name:<34}" + "".join(f"{mem[r].tokens:>10,}" for r in stages))
        elif fn is None:
            out.append(f"  {name:<34}" + "".join(f"{mem[r].in_flight:>10}" for r in stages))
        else:
            out.append(f"  {name:<34}" + "".join(f"{fn(mem[r]) / GIB:>10.2f}" for r in stages))
    out.append(f"  usable: {ev.usable_bytes / GIB:.1f} GiB; layers per stage "
               f"{'/'.join(map(str, p.stage_sizes))}")
    return out


def _activation_lines(cfg: OlmoHybridConfig, p: Plan, job: Job, verbose: bool) -> list[str]:
    """Bytes kept per token by each layer kind (and, ``verbose``, each tensor)."""
    s = local_shapes(cfg, p.tp, p.sequence_parallel, job.bf16, p.cp)
    cp = f", CP {p.cp}: per local token, S/CP per sequence" if p.cp > 1 else ""
    out = ["", f"Activations kept per token and layer on one rank (TP {p.tp}"
               f"{', SP' if p.sequence_parallel else ''}{cp}, recompute {p.recompute}):"]
    for kind, name in (("G", "GDN layer"), ("*", "attention layer")):
        if kind not in cfg.layout.layer_types:
            continue
        terms = layer_terms(s, kind, p.recompute, p.mbs)
        out.append(f"  {name}: {sum(b for _, b in terms):,.0f} bytes")
        if verbose and len(terms) > 1:
            out += [f"      {b:>10,.0f}  {n}" for n, b in terms]
    return out


def _stage_time_table(t: Throughput, stages: list[int]) -> list[str]:
    """Milliseconds per micro-batch of each part (``Throughput.stage_parts``) per stage."""
    out = ["", "Time per micro-batch and stage (ms, forward + backward):"]
    out.append(f"  {'':<16}" + "".join(f"{'stage ' + str(r):>10}" for r in stages))
    for n in list(t.stage_parts[0]) + ["total"]:
        vals = [sum(t.stage_parts[r].values()) if n == "total" else t.stage_parts[r][n]
                for r in stages]
        out.append(f"  {n:<16}" + "".join(f"{1e3 * v:>10.2f}" for v in vals))
    return out


def _iteration_lines(t: Throughput, p: Plan, job: Job) -> list[str]:
    """The iteration's time: pipeline, communication, optimizer, overhead, tokens/s and MFU."""
    out = ["", "Iteration:",
           f"  pipeline (1F1B)        {t.pipeline_s:8.3f} s  (bubble {t.bubble_s:.3f} s, "
           f"{100 * t.bubble_s / t.pipeline_s:.1f}%)",
           f"  DP communication       {t.dp_comm_s:8.3f} s  (exposed {t.dp_exposed_s:.3f} s; "
           f"{t.volumes['dp per rank'] / 1e9:.2f} GB per rank"
           + (f", over DP x CP = {p.dp_cp} ranks)" if p.cp > 1 else ")"),
           f"  TP communication       {t.volumes['tp per rank'] / 1e9:8.2f} GB per rank"]
    if p.cp > 1:
        link = "NVLink" if p.tp * p.cp <= job.gpus_per_node else "network"
        reps = "6 (full recompute)" if p.recompute == "full" else "4"
        out.append(f"  CP all-to-all          {t.cp_comm_s:8.3f} s  (inside the pipeline time; "
                   f"{t.volumes['cp per rank'] / 1e9:.2f} GB per rank; {reps} per layer and "
                   f"micro-batch over {link})")
    out += [f"  PP send/recv           {t.volumes['pp p2p per rank'] / 1e9:8.2f} GB per rank",
            f"  optimizer step         {t.optimizer_s:8.3f} s",
            f"  fixed overhead         {t.overhead_s:8.3f} s",
            f"  = iteration            {t.iteration_s:8.3f} s -> "
            f"{t.tokens_per_s_per_gpu:,.0f} tokens/s/GPU, MFU {100 * t.mfu:.1f}%"]
    return out


def explain(cfg: OlmoHybridConfig, ev: Evaluation, job: Job, rank: int | None = None,
            verbose: bool = True) -> str:
    """Breakdown of one plan: memory per stage, activation bytes per layer kind, time, and the
    launch flags when the plan is not refused."""
    out = _explain_header(cfg, ev, job, rank)
    if ev.memory is None:
        return "\n".join(out)
    stages = _shown_stages(len(ev.memory))
    out += _memory_table(ev, stages)
    out += _activation_lines(cfg, ev.plan, job, verbose)
    if ev.throughput is not None:
        out += _stage_time_table(ev.throughput, stages)
        out += _iteration_lines(ev.throughput, ev.plan, job)
    if ev.reason is None:
        out += ["", launch_flags(cfg, ev.plan, job)]
    return "\n".join(out)


def cp_note(job: Job, pins: Pins, cps: Sequence[int] = (1,), fallback: bool = False) -> str:
    """The line saying which context-parallel sizes were searched and why (``search.SearchResult``
    gives ``cps`` and ``fallback``)."""
    if pins.cp:
        return f"CP {pins.cp} (--context-parallel-size pinned)"
    values = ", ".join(map(str, cps))
    rule = "CP x TP must divide the heads, CP the sequence"
    if fallback:
        return (f"CP searched: {values} (no CP 1 plan fits; below {CP_MIN_SEQ_LENGTH} tokens "
                f"CP > 1 is searched only then; {rule})")
    if len(cps) > 1:
        return f"CP searched: {values} (sequence >= {CP_MIN_SEQ_LENGTH} tokens; {rule})"
    if job.seq_length >= CP_MIN_SEQ_LENGTH:
        return (f"CP 1 only: no power of two > 1 divides both {job.num_gpus} GPUs and the "
                f"sequence (pin --context-parallel-size for another CP)")
    return (f"CP 1 only: sequences below {CP_MIN_SEQ_LENGTH} tokens search CP > 1 only when no "
            f"CP 1 plan fits (pin --context-parallel-size to compare)")
