"""Tokenize text into a megatron-core indexed dataset (Megatron-LM's flag names).

    python tools/preprocess_data.py --input docs.jsonl --output-prefix data/my \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model ../shared/data/dolma2_tokenizer.json \\
        --append-eod --workers 2

writes ``data/my_text_document.bin/.idx``. ``--input``: a JSONL file (one document per line), a
``.txt``/``.md`` file (one document) or a directory (recursive: ``.jsonl`` line by line, ``.txt``/
``.md`` one document per file). Each document is stripped, empty ones are skipped, the text is
encoded without special tokens and, with ``--append-eod``, the end-of-document token is appended
unless already last. A bad line stops the run with ``FILE:LINE: reason`` and exit status 1 (or is
counted and skipped with ``--skip-bad-lines``); nothing is left behind on failure.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys


def parse_args(argv=None):
    """Command-line flags (``docs/design.md`` §6)."""
    from megatron_hybrid.data.preprocess import add_arguments

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Run the preprocessing; returns the exit status (0, or 1 with the error on stderr)."""
    args = parse_args(argv)
    from megatron_hybrid.data.preprocess import preprocess, request_stop

    # SIGTERM (e.g. Slurm) stops at the next batch like Ctrl-C: temporary outputs are removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: request_stop())
    try:
        preprocess(args.input, args.output_prefix, args.tokenizer_type, args.tokenizer_model,
                   json_keys=args.json_keys, append_eod=args.append_eod, eod_token=args.eod_token,
                   workers=args.workers, skip_bad_lines=args.skip_bad_lines,
                   log_interval=args.log_interval, progress=not args.no_progress)
    except (ValueError, OSError) as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{os.path.basename(sys.argv[0])}: interrupted; no output written", file=sys.stderr)
        return 130
    return 0
