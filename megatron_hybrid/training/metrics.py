"""Training metrics: Megatron-format console lines, TensorBoard and (optional) W&B.

The console line keeps Megatron-LM's ``training_log`` fields and format, so log parsers written
for Megatron keep working, and appends throughput in tokens/s/GPU, MFU (docs/model.md §10 FLOPs, the peak
used is printed at start-up) and peak memory::

     [2026-11-29 10:00:00] iteration       10/     100 | consumed samples:          640 |
     elapsed time per iteration (ms): 812.3 | throughput per GPU (TFLOP/s/GPU): 1.2 |
     learning rate: 3.000000E-04 | global batch size:    64 | lm loss: 5.123456E+00 |
     z loss: 2.1E+01 | loss scale: 1.0 | grad norm: 1.234 | ... |

(one line in the log). TensorBoard scalars follow Megatron's names (``lm loss``,
``learning-rate``, ``grad-norm``, ``throughput``, ...), written by the last rank as in Megatron.
"""
from __future__ import annotations

import math
import resource
from datetime import datetime

import torch

from megatron_hybrid.parallel import is_last_rank, print_rank_last


def peak_memory_gib() -> dict[str, float]:
    """{'mem-max-allocated-gib'} on CUDA, else {'peak-rss-gib'} of this process."""
    if torch.cuda.is_available():
        return {"mem-max-allocated-gib": torch.cuda.max_memory_allocated() / 2**30}
    return {"peak-rss-gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


class MetricsLogger:
    """Accumulates per-iteration values and writes them every ``--log-interval`` iterations.

    Args:
        args: the training config (``log_interval``, ``train_iters``, ``global_batch_size``,
            ``seq_length``, ``world_size``, ``tensorboard_dir``, ``wandb_*``).
        flops_per_token: forward+backward FLOPs per token (docs/model.md §10).
        peak_tflops: per-GPU peak for MFU, or None (MFU not reported).
    """

    def __init__(self, args, flops_per_token: float, peak_tflops: float | None):
        self.args = args
        self.flops_per_token = flops_per_token
        self.peak_tflops = peak_tflops
        self.writer = None
        self.wandb = None
        self.history = []  # (iteration, lm loss) of each logged interval, for the summary
        self._reset()
        if is_last_rank() and args.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=args.tensorboard_dir, max_queue=1000)
        if is_last_rank() and args.wandb_project:
            try:
                import wandb
            except ImportError:
                print("WARNING: --wandb-project given but wandb is not installed; W&B logging "
                      "is off (pip install wandb)", flush=True)
            else:
                self.wandb = wandb.init(project=args.wandb_project, name=args.wandb_exp_name,
                                        dir=args.wandb_save_dir, config=vars(args))

    def _reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0
        self.skipped = 0
        self.nan = 0
        self.seconds = 0.0

    def add(self, losses: dict[str, float], seconds: float, skipped: bool = False) -> None:
        """Record one iteration's reduced losses (last rank's values are the ones shown) and its
        wall time in seconds (evaluation and checkpointing are not counted, as in Megatron)."""
        self.count += 1
        self.seconds += seconds
        if any(not math.isfinite(v) for v in losses.values()):
            self.nan += 1
        if skipped:  # as Megatron: a skipped iteration's losses stay out of the averages
            self.skipped += 1
            return
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def log(self, iteration: int, consumed_samples: int, learning_rate: float,
            grad_norm: float | None, loss_scale: float = 1.0) -> str | None:
        """Write the interval's line / scalars (on the last rank) and reset; returns the line."""
        elapsed = self.seconds / max(self.count, 1)
        a = self.args
        tokens_per_s_gpu = a.global_batch_size * a.seq_length / elapsed / a.world_size
        tflops = tokens_per_s_gpu * self.flops_per_token / 1e12
        avg = {k: v / max(self.count - self.skipped, 1) for k, v in self.sums.items()}
        mem = peak_memory_gib()
        line = f" [{datetime.now().strftime('%Y-%m-%d %H:%M:%S')}]"
        line += f" iteration {iteration:8d}/{a.train_iters:8d} |"
        line += f" consumed samples: {consumed_samples:12d} |"
        line += f" elapsed time per iteration (ms): {elapsed * 1000.0:.1f} |"
        line += f" throughput per GPU (TFLOP/s/GPU): {tflops:.3f} |"
        line += f" tokens per second per GPU: {tokens_per_s_gpu:.1f} |"
        if self.peak_tflops:
            line += f" MFU: {100.0 * tflops / self.peak_tflops:.2f}% |"
        line += f" learning rate: {learning_rate:.6E} |"
        line += f" global batch size: {a.global_batch_size:5d} |"
        for k, v in avg.items():
            line += f" {k}: {v:.6E} |"
        line += f" loss scale: {loss_scale:.1f} |"
        if grad_norm is not None:
            line += f" grad norm: {grad_norm:.3f} |"
        for k, v in mem.items():
            line += f" {k}: {v:.2f} |"
        line += f" number of skipped iterations: {self.skipped:3d} |"
        line += f" number of nan iterations: {self.nan:3d} |"
        if "lm loss" in avg:
            self.history.append((iteration, avg["lm loss"]))
        scalars = {"learning-rate": learning_rate, "throughput": tflops,
                   "tokens-per-sec-per-gpu": tokens_per_s_gpu, "iteration-time": elapsed,
                   **avg, **mem}
        if grad_norm is not None:
            scalars["grad-norm"] = grad_norm
        if self.peak_tflops:
            scalars["mfu"] = tflops / self.peak_tflops
        self.write_scalars(scalars, iteration)
        print_rank_last(line)
        self._reset()
        return line

    def write_scalars(self, scalars: dict[str, float], iteration: int) -> None:
        """TensorBoard / W&B scalars at ``iteration`` (last rank only)."""
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, iteration)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=iteration)

    def log_validation(self, iteration: int, losses: dict[str, float], name: str = "validation"):
        """Megatron's validation block: loss value and perplexity per key."""
        text = f" {name} loss at iteration {iteration} |"
        for k, v in losses.items():
            text += f" {k} value: {v:.6E} |"
            if k == "lm loss":
                text += f" {k} PPL: {math.exp(min(20.0, v)):.6E} |"
        bar = "-" * (len(text) + 1)
        print_rank_last(f"{bar}\n{text}\n{bar}")
        self.write_scalars({f"{k} {name}": v for k, v in losses.items()}, iteration)

    def close(self) -> None:
        """Flush and close the writers."""
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
