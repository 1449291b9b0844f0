"""English text from the running Python's standard library, with no download (docs/design.md §8).

Sources, read as text and never imported:

- module, class and function docstrings (``ast``; cleaned with ``inspect.cleandoc``);
- runs of consecutive full-line comments (``tokenize``), merged into paragraphs;
- ``pydoc_data/topics.py``: the language-reference topics, a dict of long English strings
  (extracted with ``ast.literal_eval`` of its assignment).

Each text block is filtered: licence/copyright boilerplate, fragments shorter than ``MIN_CHARS``,
mostly-code blocks and exact duplicates are dropped. A source file's surviving blocks, in source
order, form one document; each pydoc topic is one document. Files are visited in sorted order, so
the output depends only on the stdlib's contents.
"""
from __future__ import annotations

import ast
import io
import os
import re
import sysconfig
import tokenize
from collections.abc import Iterator
from dataclasses import dataclass

MIN_CHARS = 80
"""Blocks shorter than this many characters (after cleaning) are dropped."""

SKIP_DIRS = frozenset({
    "test", "tests", "idle_test", "idlelib", "lib2to3", "turtledemo", "ensurepip", "encodings",
    "site-packages", "dist-packages", "lib-dynload", "__pycache__", "__phello__",
})
"""Directory names never descended into: tests, tools with their own test data, generated codecs."""

SKIP_FILES = frozenset({"this.py", "antigravity.py", "__hello__.py"})
"""Files whose text is not English prose (``this.py`` holds the Zen of Python rot13-encoded)."""

_BOILERPLATE = re.compile(
    r"copyright|all rights reserved|licen[cs]e|warrant|spdx-|permission is hereby granted|"
    r"redistribution and use|author:|\$id[:$]|\bemail:|@[a-z0-9-]+\.(com|org|net)",
    re.IGNORECASE,
)
_DIRECTIVE = re.compile(r"^\s*(!|-\*-|coding[:=]|vim?:|type:|noqa|pragma|fmt:|pylint:|XXX\s*$)")
_PROSE_CHARS = re.compile(r"[A-Za-z]")
_WORD = re.compile(r"[A-Za-z]{3,}")


@dataclass(frozen=True)
class Block:
    """One text block of a source file. ``line``: 1-based source line, for ordering."""

    line: int
    text: str


def stdlib_dir() -> str:
    """The standard library directory of the running Python (``sysconfig``'s ``stdlib`` path)."""
    return sysconfig.get_paths()["stdlib"]


def iter_source_files(root: str) -> Iterator[str]:
    """Yield the ``.py`` files under ``root`` in sorted order, skipping ``SKIP_DIRS``,
    ``SKIP_FILES``, hidden and ``config-*`` directories and generated ``_sysconfigdata*`` files."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames
            if d not in SKIP_DIRS and not d.startswith((".", "config-"))
        )
        for name in sorted(filenames):
            if (name.endswith(".py") and name not in SKIP_FILES
                    and not name.startswith("_sysconfigdata")):
                yield os.path.join(dirpath, name)


def _is_code_line(line: str) -> bool:
    """True for a line that looks like code rather than prose (doctest, symbols, few words)."""
    s = line.strip()
    if s.startswith((">>>", "...", "$ ", "%")):
        return True
    nonspace = len(s) - s.count(" ")
    if nonspace == 0:
        return False
    letters = len(_PROSE_CHARS.findall(s))
    return letters / nonspace < 0.7 or len(_WORD.findall(s)) < 2


def is_prose(text: str) -> bool:
    """True when at least half of the non-empty lines of ``text`` look like English prose."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        return False
    code = sum(_is_code_line(ln) for ln in lines)
    return 2 * code <= len(lines)


def keep_block(text: str) -> bool:
    """The block filter: long enough, no licence/copyright boilerplate, mostly prose."""
    return len(text) >= MIN_CHARS and not _BOILERPLATE.search(text) and is_prose(text)


def docstring_blocks(tree: ast.AST) -> list[Block]:
    """Module, class and function docstrings of a parsed module, cleaned (``inspect.cleandoc``)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                line = node.body[0].lineno if node.body else 0
                out.append(Block(line, doc.strip()))
    return out


def _comment_text(comment: str) -> str:
    """``'#  Some text'`` -> ``'Some text'``; ``''`` for separators and tool directives."""
    body = comment.lstrip("#")
    if body.startswith("!") or _DIRECTIVE.match(body):
        return ""
    body = body.strip()
    if body and not re.search(r"[A-Za-z]", body):  # '# ------', '# ====='
        return ""
    return body


def comment_blocks(source: bytes) -> list[Block]:
    """Runs of consecutive full-line comments, each run split at blank comment lines into
    paragraphs whose lines are joined with single spaces. Trailing (inline) comments are ignored."""
    out: list[Block] = []
    para: list[str] = []
    start = prev = -10

    def flush():
        if para:
            out.append(Block(start, " ".join(para)))
            para.clear()

    try:
        tokens = list(tokenize.tokenize(io.BytesIO(source).readline))
    except (tokenize.TokenError, SyntaxError, UnicodeDecodeError):
        return out
    for tok in tokens:
        if tok.type != tokenize.COMMENT or tok.line[: tok.start[1]].strip():
            continue  # not a comment, or a comment after code on the same line
        row = tok.start[0]
        text = _comment_text(tok.string)
        if row != prev + 1 or not text:
            flush()
        if text:
            if not para:
                start = row
            para.append(text)
        prev = row
    flush()
    return out


def file_blocks(path: str) -> list[Block]:
    """Docstring and comment blocks of one source file, in source order (unfiltered).
    A file that does not parse yields no blocks."""
    with open(path, "rb") as f:
        source = f.read()
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    blocks = docstring_blocks(tree) + comment_blocks(source)
    return sorted(blocks, key=lambda b: b.line)


def pydoc_topics(root: str) -> dict[str, str]:
    """The ``topics`` dict of ``pydoc_data/topics.py`` (language-reference sections), read with
    ``ast.literal_eval``; ``{}`` when the file is missing or holds no such assignment."""
    path = os.path.join(root, "pydoc_data", "topics.py")
    if not os.path.isfile(path):
        return {}
    with open(path, "rb") as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        targets = (node.targets if isinstance(node, ast.Assign)
                   else [node.target] if isinstance(node, ast.AnnAssign) and node.value else [])
        if len(targets) == 1 and isinstance(targets[0], ast.Name) and targets[0].id == "topics":
            value = ast.literal_eval(node.value)
            if isinstance(value, dict):
                return {str(k): str(v) for k, v in value.items()}
    return {}


def iter_documents(root: str | None = None, max_chars: int | None = None) -> Iterator[dict]:
    """Yield corpus documents ``{"text": str, "source": str}`` (``source``: path relative to the
    stdlib, plus ``#topic`` for pydoc topics), deterministically: source files in sorted order,
    ``pydoc_data/topics.py`` at its place as one document per topic in sorted key order. Stops after the document that brings the total
    text length to ``max_chars`` characters (all documents when ``None``)."""
    root = root or stdlib_dir()
    seen: set[str] = set()
    total = 0

    def dedup(text: str) -> bool:
        key = " ".join(text.split())
        if key in seen:
            return False
        seen.add(key)
        return True

    def emit(texts: list[str], source: str):
        nonlocal total
        kept = [t for t in texts if dedup(t)]
        if kept:
            doc = "\n\n".join(kept)
            total += len(doc)
            return {"text": doc, "source": source}
        return None

    for path in iter_source_files(root):
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        if rel == "pydoc_data/topics.py":
            units = [([t.strip()], f"{rel}#{k}") for k, t in sorted(pydoc_topics(root).items())
                     if len(t.strip()) >= MIN_CHARS]
        else:
            units = [([b.text for b in file_blocks(path) if keep_block(b.text)], rel)]
        for texts, source in units:
            doc = emit(texts, source)
            if doc:
                yield doc
                if max_chars is not None and total >= max_chars:
                    return
