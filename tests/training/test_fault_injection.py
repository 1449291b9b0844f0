"""Fault injection on the real entry point (``python pretrain_olmo_hybrid.py`` subprocesses, one
CPU rank; cheap error cases run ``main()`` in a forked process). Each case asserts the exit
status, the message naming the file / flag / tensor, and that nothing was lost.

Faults are injected with ``MEGATRON_HYBRID_INJECT_FAULT`` (``training/fault_injection.py``).
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

from tests.dist import run_distributed
from tests.training.pretrain_kit import flags as _flags
from tests.training.pretrain_kit import with_data_path

pytestmark = [pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1", "PYTHONUNBUFFERED": "1",
       "PYTHONWARNINGS": "ignore"}
ENV.pop("MEGATRON_HYBRID_INJECT_FAULT", None)
LOSS = re.compile(r"iteration\s+(\d+)/.*?lm loss: ([-+\dEe.naN]+) \|")


def _argv(data, ckpt, iters=6, extra=()):
    return _flags(data, ckpt, iters=iters, extra=["--save-interval", "2", *extra])


def _launch(argv, fault=None, timeout=300):
    """Run the trainer in its own process group; output goes to files, not pipes: a SIGKILLed
    trainer leaves its checkpoint-writer helper process behind, which would hold a pipe open
    (torchrun kills the whole group; here the group is killed after the trainer exits)."""
    import tempfile

    env = dict(ENV, **({"MEGATRON_HYBRID_INJECT_FAULT": fault} if fault else {}))
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "pretrain_olmo_hybrid.py", *argv], cwd=ROOT,
                                env=env, stdout=out, stderr=err, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())


def _losses(text):
    return {int(m.group(1)): float(m.group(2)) for m in LOSS.finditer(text)}


def _tracker(ckpt):
    return int(open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read())


def _snapshot(ckpt):
    """(tracker, {relative path: size}) of a checkpoint directory."""
    files = {}
    for root, _, names in os.walk(ckpt):
        for n in names:
            p = os.path.join(root, n)
            files[os.path.relpath(p, ckpt)] = os.path.getsize(p)
    return _tracker(ckpt), files


@pytest.fixture(scope="module")
def reference(embedded_small, tmp_path_factory):
    """An uninterrupted 6-iteration run saving every 2 iterations: (checkpoint dir, losses)."""
    ckpt = str(tmp_path_factory.mktemp("fault_ref") / "ckpt")
    r = _launch(_argv(embedded_small, ckpt))
    assert r.returncode == 0, r.stderr[-3000:]
    return ckpt, _losses(r.stdout)


def test_kill_during_save_keeps_the_previous_checkpoint(embedded_small, reference, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    r = _launch(_argv(embedded_small, ckpt), fault="kill-during-save@4")
    assert r.returncode == -signal.SIGKILL
    assert _tracker(ckpt) == 2  # the tracker still names the last complete save
    partial = os.path.join(ckpt, "iter_0000004")
    assert os.path.isdir(partial) and not os.path.isfile(os.path.join(partial, "run_config.yaml"))
    r = _launch(_argv(embedded_small, ckpt))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"ignoring {partial}: an interrupted save" in r.stdout
    assert "loaded checkpoint from" in r.stdout and "at iteration 2" in r.stdout
    resumed, ref = _losses(r.stdout), reference[1]
    assert sorted(resumed) == [3, 4, 5, 6]
    assert all(resumed[i] == ref[i] for i in resumed), (resumed, ref)
    assert _tracker(ckpt) == 6 and os.path.isfile(os.path.join(partial, "run_config.yaml"))


def test_sigterm_saves_at_the_next_iteration_and_exits_zero(embedded_small, tmp_path):
    # reference: the same 500-iteration schedule, uninterrupted up to iteration 6
    ref = _launch(_flags(embedded_small, str(tmp_path / "ref"), iters=500,
                         extra=["--exit-interval", "6"]))
    assert ref.returncode == 0, ref.stderr[-3000:]
    ckpt = str(tmp_path / "ckpt")
    argv = _flags(embedded_small, ckpt, iters=500)
    proc = subprocess.Popen([sys.executable, "pretrain_olmo_hybrid.py", *argv], cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = []
    for line in proc.stdout:
        out.append(line)
        if re.search(r"iteration\s+2/", line):
            proc.send_signal(signal.SIGTERM)
            break
    rest, err = proc.communicate(timeout=300)
    text = "".join(out) + rest
    assert proc.returncode == 0, err[-3000:]
    stopped = int(re.search(r"stopping at iteration (\d+) \(SIGTERM/SIGUSR1\)", text).group(1))
    assert f"saved checkpoint at iteration {stopped}" in text and _tracker(ckpt) == stopped
    assert "received SIGTERM" in err
    assert stopped < 6
    # the saved state continues the run exactly (same losses as the uninterrupted reference)
    r = _launch(_flags(embedded_small, ckpt, iters=500, extra=["--exit-interval", "6"]))
    assert r.returncode == 0, r.stderr[-3000:]
    resumed, expected = _losses(r.stdout), _losses(ref.stdout)
    assert sorted(resumed) == list(range(stopped + 1, 7))
    assert all(resumed[i] == expected[i] for i in resumed), (resumed, expected)


def test_exit_duration_saves_and_exits_zero(embedded_small, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    r = _launch(_flags(embedded_small, ckpt, iters=500,
                       extra=["--exit-duration-in-mins", "0.0001"]))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stopping at iteration 1 (--exit-duration-in-mins)" in r.stdout
    assert _tracker(ckpt) == 1


def test_injected_nan_step_is_skipped_without_changing_weights(embedded_small, tmp_path):
    from megatron_hybrid.checkpoint.reader import DistCheckpointReader

    ckpt = str(tmp_path / "ckpt")
    r = _launch(_flags(embedded_small, ckpt, iters=4, extra=["--save-interval", "1"]),
                fault="nan-loss@3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "iteration 3: update skipped: non-finite loss nan" in r.stdout
    assert "number of skipped iterations:   1" in r.stdout
    before, after = DistCheckpointReader(ckpt, 2), DistCheckpointReader(ckpt, 3)
    keys = before.model_keys()
    a, b = before.read(keys), after.read(keys)
    assert all(a[k].equal(b[k]) for k in keys)  # weights untouched by the skipped step
    from torch.distributed.checkpoint import FileSystemReader

    opt_keys = [k for k in FileSystemReader(before.path).read_metadata().state_dict_metadata
                if k.startswith("optimizer.state.exp_avg")]
    assert opt_keys
    import torch
    from torch.distributed.checkpoint import load

    def read(path):
        meta = FileSystemReader(path).read_metadata().state_dict_metadata
        sd = {k: torch.empty(meta[k].size, dtype=meta[k].properties.dtype) for k in opt_keys}
        load(sd, storage_reader=FileSystemReader(path), no_dist=True)
        return sd

    x, y = read(before.path), read(after.path)
    assert all(x[k].equal(y[k]) for k in opt_keys)  # Adam moments untouched
    assert _losses(r.stdout)[4] == _losses(r.stdout)[4]  # iteration 4 trained (finite)


def test_consecutive_skipped_steps_stop_with_a_clear_error(embedded_small, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    r = _launch(_flags(embedded_small, ckpt, iters=8,
                       extra=["--save-interval", "1", "--max-consecutive-skipped-steps", "3"]),
                fault="nan-loss@2+")
    assert r.returncode == 2
    assert "3 consecutive steps skipped" in r.stderr and "--max-consecutive-skipped-steps 3" \
        in r.stderr
    assert _tracker(ckpt) == 3  # the last completed iteration's save is intact


# --- start-up errors: main() in a forked process ------------------------------------------------
def _main_worker(rank, argv):
    import tempfile

    from megatron_hybrid.training.train import main

    with tempfile.TemporaryFile("w+") as err:  # a real file: faulthandler needs its fileno
        with contextlib.redirect_stderr(err):
            status = main(argv)
        err.seek(0)
        return status, err.read()


def _run_main(argv):
    return run_distributed(_main_worker, 1, argv, timeout=300)[0]


def _copy_data(data, tmp_path):
    prefix = str(tmp_path / "corpus_text_document")
    for ext in (".bin", ".idx"):
        shutil.copy(data.data_prefix + ext, prefix + ext)
    return prefix


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["truncated_bin", "wrong_magic", "truncated_idx"])
def test_corrupt_data_files_are_named(embedded_small, tmp_path, case):
    prefix = _copy_data(embedded_small, tmp_path)
    path = prefix + (".bin" if case == "truncated_bin" else ".idx")
    data = open(path, "rb").read()
    if case == "wrong_magic":
        data = b"XXXXXXXXX" + data[9:]
    else:
        data = data[:-16]
    open(path, "wb").write(data)
    status, err = _run_main(with_data_path(_flags(embedded_small, str(tmp_path / "ckpt"), iters=4),
                                           prefix))
    assert status == 2 and path in err, err
    assert not os.path.exists(tmp_path / "ckpt" / "latest_checkpointed_iteration.txt")


@pytest.mark.distributed
def test_data_tokenized_with_a_larger_vocabulary_is_refused(embedded_small, tmp_path):
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "big_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    g = np.random.default_rng(0)
    for _ in range(40):  # ids up to 100,277: a dolma2-tokenized corpus, model vocab 1024
        builder.add_document(np.asarray(g.integers(0, 100278, 200), dtype=np.int32), [200])
    builder.finalize(prefix + ".idx")
    status, err = _run_main(with_data_path(_flags(embedded_small, None, iters=4), prefix))
    assert status == 2 and "is outside the vocabulary of --tokenizer-model" in err, err
    assert prefix in err


@pytest.mark.distributed
def test_missing_checkpoint_shard_is_named_and_nothing_changes(embedded_small, reference,
                                                               tmp_path):
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(reference[0], ckpt)
    shard = os.path.join(ckpt, "iter_0000006", "__0_0.distcp")
    os.remove(shard)
    before = _snapshot(ckpt)
    status, err = _run_main(_flags(embedded_small, ckpt, iters=8))
    assert status == 2 and f"{shard} is missing" in err, err
    assert _snapshot(ckpt) == before


@pytest.mark.distributed
def test_mismatched_config_on_resume_lists_each_field(embedded_small, reference, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(reference[0], ckpt)
    before = _snapshot(ckpt)
    argv = _flags(embedded_small, ckpt, iters=8)
    shape = list(argv)
    shape[shape.index("--hidden-size") + 1] = "128"
    status, err = _run_main(shape)
    assert status == 2 and "--hidden-size: checkpoint 64, this run 128" in err, err
    # another tokenizer file with the same vocabulary size: refused by content
    from megatron_hybrid.data.embedded import build_embedded_default

    other = build_embedded_default(str(tmp_path / "other"), vocab_size=1024, max_chars=120_000)
    tok = list(argv)
    tok[tok.index("--tokenizer-model") + 1] = other.tokenizer_model
    status, err = _run_main(tok)
    assert status == 2 and "another tokenizer" in err and "sha256: checkpoint" in err, err
    # other data order (sequence length): refused, then accepted with --override-data-check
    seq = list(argv)
    seq[seq.index("--seq-length") + 1] = "16"
    status, err = _run_main(seq)
    assert status == 2 and "seq_length: checkpoint 32, this run 16" in err, err
    assert "--override-data-check" in err
    assert _snapshot(ckpt) == before  # every refusal left the checkpoint as it was
    status, err = _run_main(seq + ["--override-data-check", "--override-opt-param-scheduler"])
    assert status == 0, err
    assert _tracker(ckpt) == 8


def test_unreadable_preprocessing_input_is_named(tmp_path, embedded_small):
    src = tmp_path / "inputs"
    src.mkdir()
    (src / "a.txt").write_text("hello world. " * 20)
    os.symlink(str(tmp_path / "missing.txt"), str(src / "b.txt"))  # dangling: unreadable
    out = str(tmp_path / "out")
    r = subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", str(src),
                        "--output-prefix", out, "--tokenizer-type", "SentencePieceTokenizer",
                        "--tokenizer-model", embedded_small.tokenizer_model], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "b.txt" in r.stderr, r.stderr[-2000:]
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir())
