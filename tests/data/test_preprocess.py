"""preprocess / tools/preprocess_data.py: the Olmo preprocessing rule, read back with
megatron-core's IndexedDataset; inputs, workers, bad lines, atomic outputs, the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_hybrid.data.preprocess import BadInputError, preprocess

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HF = "HuggingFaceTokenizer"
SP = "SentencePieceTokenizer"
DOCS = [
    "  The quick brown fox jumps over the lazy dog.\n",
    "   ",  # empty after stripping: skipped
    "Unicode text works too: café, naïve, Zürich, and 東京.\n\nA second paragraph.",
    "Ends with its own end of text<|endoftext|>",  # eod already last: not appended again
    "",
    "\tNumbers like 12345 and 2024 appear in text.  ",
]


def write_jsonl(path, texts, key="text"):
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({key: t, "id": 7}) + "\n")
    return str(path)


def hf_ref(path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


def read_docs(prefix):
    """Every stored document as a numpy array, checking one sequence per document."""
    ds = IndexedDataset(prefix)
    assert list(ds.document_indices) == list(range(len(ds) + 1))
    return ds, [ds[i] for i in range(len(ds))]


def run(tmp_path, input_path, tokenizer, kind=HF, name="out", **kw):
    kw.setdefault("progress", False)
    kw.setdefault("quiet", True)
    return preprocess(str(input_path), str(tmp_path / name), kind, tokenizer, **kw)


def test_round_trip_append_eod(tiny_hf_tokenizer, tmp_path):
    ref = hf_ref(tiny_hf_tokenizer)
    eod = ref.token_to_id("<|endoftext|>")
    res = run(tmp_path, write_jsonl(tmp_path / "in.jsonl", DOCS), tiny_hf_tokenizer,
              append_eod=True)
    kept = [d.strip() for d in DOCS if d.strip()]
    ds, seqs = read_docs(res.prefixes["text"])
    assert ds.index.dtype == np.uint16 and res.dtype == "uint16"
    assert len(seqs) == len(kept) == res.documents["text"] and res.skipped["text"] == 2
    for seq, text in zip(seqs, kept, strict=True):
        assert seq[-1] == eod and int((seq == eod).sum()) == 1
        expected = ref.encode(text, add_special_tokens=False).ids
        assert seq.tolist() == (expected if expected[-1] == eod else expected + [eod])
        body = seq[:-1] if not text.endswith("<|endoftext|>") else seq
        assert ref.decode(body.tolist(), skip_special_tokens=False) == text
    assert res.tokens["text"] == sum(len(s) for s in seqs)


def test_without_eod(tiny_hf_tokenizer, tmp_path):
    ref = hf_ref(tiny_hf_tokenizer)
    texts = [d for d in DOCS if "<|endoftext|>" not in d]
    res = run(tmp_path, write_jsonl(tmp_path / "in.jsonl", texts), tiny_hf_tokenizer)
    _, seqs = read_docs(res.prefixes["text"])
    kept = [d.strip() for d in texts if d.strip()]
    assert [s.tolist() for s in seqs] == [ref.encode(t, add_special_tokens=False).ids for t in kept]
    assert all(0 not in s for s in seqs)  # eod id 0 never stored


def test_sentencepiece_round_trip(tiny_sp_model, tmp_path):
    import sentencepiece as spm

    ref = spm.SentencePieceProcessor(model_file=tiny_sp_model)
    texts = ["The quick brown fox jumps over the lazy dog.", "A tokenizer turns text into ids."]
    res = run(tmp_path, write_jsonl(tmp_path / "in.jsonl", texts), tiny_sp_model, kind=SP,
              append_eod=True)
    _, seqs = read_docs(res.prefixes["text"])
    assert [s.tolist() for s in seqs] == [ref.encode(t) + [2] for t in texts]
    assert [ref.decode(s[:-1].tolist()) for s in seqs] == texts


def test_directory_txt_md(tiny_hf_tokenizer, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / ".hidden").mkdir()
    write_jsonl(src / "sub" / "b.jsonl", ["from jsonl one", "from jsonl two"])
    (src / "a.txt").write_text("  Plain text file.\nIts second line.\n")
    (src / "c.md").write_text("# Markdown\n\nA paragraph.")
    (src / "empty.txt").write_text(" \n")
    (src / "ignored.json").write_text('{"text": "not read"}')
    (src / "ignored.py").write_text("print('not read')")
    (src / ".hidden" / "x.txt").write_text("not read")
    ref = hf_ref(tiny_hf_tokenizer)
    res = run(tmp_path, src, tiny_hf_tokenizer)
    _, seqs = read_docs(res.prefixes["text"])
    expected = ["Plain text file.\nIts second line.", "# Markdown\n\nA paragraph.",
                "from jsonl one", "from jsonl two"]  # a.txt, c.md, empty.txt, sub/b.jsonl
    assert [ref.decode(s.tolist()) for s in seqs] == expected
    assert res.skipped["text"] == 1
    single = run(tmp_path, src / "c.md", tiny_hf_tokenizer, name="single")
    _, seqs = read_docs(single.prefixes["text"])
    assert [ref.decode(s.tolist()) for s in seqs] == [expected[1]]


def test_workers_identical(tiny_hf_tokenizer, tmp_path):
    texts = [f"Document {i}: " + "word " * (i % 17) + ("" if i % 23 else " ") for i in range(300)]
    path = write_jsonl(tmp_path / "in.jsonl", texts)
    one = run(tmp_path, path, tiny_hf_tokenizer, name="w1", append_eod=True, workers=1)
    two = run(tmp_path, path, tiny_hf_tokenizer, name="w2", append_eod=True, workers=2)
    for ext in (".bin", ".idx"):
        with open(one.prefixes["text"] + ext, "rb") as a, open(two.prefixes["text"] + ext, "rb") as b:
            assert a.read() == b.read()
    assert one.documents == two.documents == {"text": 300}


def test_several_json_keys(tiny_hf_tokenizer, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"body {i}", "title": f"title {i}" if i else ""})
                              for i in range(3)) + "\n")
    ref = hf_ref(tiny_hf_tokenizer)
    res = run(tmp_path, path, tiny_hf_tokenizer, json_keys=["text", "title"])
    assert res.skipped == {"text": 0, "title": 1}
    for key, texts in (("text", ["body 0", "body 1", "body 2"]), ("title", ["title 1", "title 2"])):
        assert res.prefixes[key] == str(tmp_path / f"out_{key}_document")
        _, seqs = read_docs(res.prefixes[key])
        assert [ref.decode(s.tolist()) for s in seqs] == texts


BAD = {
    "invalid_json": (b'{"text": "fine"}\n{"text": "broken\n', 2, "invalid JSON"),
    "missing_key": (b'{"text": "fine"}\n{"text": "fine"}\n{"body": "no text"}\n', 3,
                    "missing key 'text'"),
    "non_string": (b'{"text": 42}\n', 1, "key 'text' holds int"),
    "non_utf8": (b'{"text": "fine"}\n{"text": "caf\xe9"}\n', 2, "not valid UTF-8"),
    "surrogate": (b'{"text": "\\ud800 lone"}\n', 1, "invalid Unicode"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_line_stops_and_leaves_nothing(tiny_hf_tokenizer, tmp_path, case):
    data, line, reason = BAD[case]
    src = tmp_path / "in.jsonl"
    src.write_bytes(data)
    out = tmp_path / "out"
    with pytest.raises(BadInputError) as err:
        preprocess(str(src), str(out / "ds"), HF, tiny_hf_tokenizer, workers=2 if line == 2 else 1,
                   progress=False, quiet=True)
    assert str(err.value).startswith(f"{src}:{line}: {reason}")
    assert os.listdir(out) == []  # no .bin/.idx, no temporary files


def test_bad_utf8_in_text_file_reports_line(tiny_hf_tokenizer, tmp_path):
    src = tmp_path / "doc.txt"
    src.write_bytes(b"line one\nline two\nline \xff three\n")
    with pytest.raises(BadInputError, match=r"doc\.txt:3: not valid UTF-8 \(byte 0xff at column 6\)"):
        run(tmp_path, src, tiny_hf_tokenizer)


def test_skip_bad_lines_counts(tiny_hf_tokenizer, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(BAD[c][0] for c in sorted(BAD)))  # 4 good lines, 5 bad lines
    res = run(tmp_path, src, tiny_hf_tokenizer, skip_bad_lines=True)
    assert res.bad_lines == 5 and len(res.bad_locations) == 5
    assert res.bad_locations[0].startswith(f"{src}:2: invalid JSON")
    assert res.documents["text"] == 4 and "5 bad lines" in res.summary()


def test_dolma2_int32(dolma2_tokenizer, tmp_path):
    from tokenizers import Tokenizer

    ref = Tokenizer.from_file(dolma2_tokenizer)
    texts = ["Olmo Hybrid mixes Gated DeltaNet and attention.", "  Second document, é.  "]
    res = run(tmp_path, write_jsonl(tmp_path / "in.jsonl", texts), dolma2_tokenizer,
              append_eod=True)
    ds, seqs = read_docs(res.prefixes["text"])
    assert ds.index.dtype == np.int32 and res.dtype == "int32"
    for seq, text in zip(seqs, texts, strict=True):
        assert seq[-1] == 100257 and int((seq == 100257).sum()) == 1
        assert ref.decode(seq[:-1].tolist()) == text.strip()


def test_cli_exit_status(tiny_hf_tokenizer, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"text": "fine"}\n{"text": "broken\n')
    cmd = [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", str(src),
           "--output-prefix", str(tmp_path / "out" / "ds"), "--tokenizer-type", HF,
           "--tokenizer-model", tiny_hf_tokenizer, "--append-eod", "--workers", "2"]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert f"{src}:2: invalid JSON" in proc.stderr
    assert os.listdir(tmp_path / "out") == []
    # the same tool in-process, skipping the bad line: exit status 0 and a summary
    import runpy

    tool = runpy.run_path(os.path.join(REPO, "tools", "preprocess_data.py"))
    assert tool["main"](cmd[2:] + ["--skip-bad-lines", "--no-progress"]) == 0
    _, seqs = read_docs(str(tmp_path / "out" / "ds_text_document"))
    assert len(seqs) == 1


def test_no_documents_is_an_error_and_writes_nothing(tiny_hf_tokenizer, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"text": "broken\n{"body": "x"}\n{"text": "   "}\n')
    out = tmp_path / "out"
    with pytest.raises(BadInputError, match="no documents for --json-keys text"):
        preprocess(str(src), str(out / "ds"), HF, tiny_hf_tokenizer, skip_bad_lines=True,
                   progress=False, quiet=True)
    assert os.listdir(out) == []


def test_sigterm_removes_temporary_outputs(tiny_hf_tokenizer, tmp_path):
    import signal
    import subprocess
    import time

    src = tmp_path / "in.jsonl"
    with open(src, "w") as f:
        for i in range(400_000):
            f.write(f'{{"text": "document {i} with a few words in it"}}\n')
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", str(src),
           "--output-prefix", str(out / "ds"), "--tokenizer-type", HF, "--tokenizer-model",
           tiny_hf_tokenizer, "--append-eod", "--workers", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (out.exists() and os.listdir(out)):
        time.sleep(0.05)  # wait until the temporary .bin exists: mid-run
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted; no output written" in err
    assert os.listdir(out) == []
