"""Pretrain Olmo Hybrid on megatron-core (``docs/design.md`` §6). Launch with torchrun, e.g.

    torchrun --nproc-per-node 4 pretrain_olmo_hybrid.py --model-preset tiny \
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --seq-length 256 \
        --micro-batch-size 4 --global-batch-size 16 --train-iters 100 --lr 1e-3 \
        --data-path data/embedded/corpus_text_document \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model data/embedded/tokenizer.model

``python pretrain_olmo_hybrid.py --help`` lists every flag. The training code lives in
``megatron_hybrid/training/``.
"""
import sys
import warnings

if __name__ == "__main__":  # the guard matters: dist checkpointing starts a spawn Manager
    # megatron-core warns at import that TE/apex are absent; the local path is the intended one.
    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*not installed.*")
    from megatron_hybrid.training.train import main

    sys.exit(main())
