"""Every citation of a docs page by section lands on that page.

Code, tests and docs cite the reference pages as ``docs/<page>.md §N``: ``§4``, ``§4.5``, ``§6a``,
ranges (``§1-§4``, ``§4-5``), lists (``§5 and §10``, ``§3, §6 trap 4``) and named items
(``§6 trap 2``, ``§4 steps 2-7``, ``§7 difference 3``, ``§2 #4``, ``§5 bug E``, ``§4 'Packed
documents'``). A citation may wrap onto the next line of a comment or docstring.

For each citation in the files git tracks (plus untracked files it does not ignore), this checks:
the page exists; it has a markdown heading for section N (``## N.``, ``### N.M ...``, ``## 6a.``;
headings inside code fences do not count); and a named item appears in the body of that section
(its heading up to the next heading of the same or a higher level). It also checks that relative
links between the markdown files (``[x](gpu.md#cold-start)``) point at an existing file and heading.
"""
from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# the page, then backticks/quotes, whitespace or comment markers (a wrapped line), then the first §
CITATION = re.compile(r"docs/(?P<page>[A-Za-z0-9_-]+)\.md[`'\"]*[\s#*]*(?=§)")
SECTION = r"§\s?(?P<sec>\d+[a-z]?(?:\.\d+)?)"
FIRST = re.compile(SECTION)
RANGE = re.compile(r"\s?-\s?§?\s?(?P<sec>\d+[a-z]?(?:\.\d+)?)")
NEXT = re.compile(r"(?:\s*,\s*|\s+and\s+)" + SECTION)
NUMS = r"\d+(?:\s*(?:-|,|and)\s*\d+)*"
ITEMS = [
    # (kind, pattern); the group "v" is the item's value
    ("word", re.compile(r"\s+(?P<kind>trap|step|difference)s?\s+(?P<v>" + NUMS + r")\b", re.I)),
    ("hash", re.compile(r"\s+(?P<v>#\d+(?:\s*,\s*#\d+)*)\b")),
    ("bug", re.compile(r"\s+(?:bugs?\s+)?(?P<v>[A-Z](?:\s*-\s*[A-Z])?)(?![\w'])")),
    ("name", re.compile(r"\s+[\"'](?P<v>[^\"'\n]{2,60})[\"']")),
]
HEADING = re.compile(r"^(?P<level>#{1,6})\s+(?P<text>.*?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"\]\((?P<target>[^)\s]+?\.md)(?:#(?P<anchor>[^)\s]+))?\)")


@dataclass
class Citation:
    source: str  # "path:line"
    page: str
    sections: list[str]
    items: list[tuple[str, str]] = field(default_factory=list)  # (kind, value), checked in sections[0]


def _numbers(text: str) -> list[str]:
    """'2-7' -> 2..7, '3 and 7' -> 3, 7, '#6, #7' -> 6, 7."""
    out: list[str] = []
    for part in re.split(r"\s*(?:,|and)\s*", text.replace("#", "")):
        if "-" in part:
            a, b = (int(x) for x in part.split("-"))
            out += [str(n) for n in range(a, b + 1)]
        elif part:
            out.append(part)
    return out


def _expand(a: str, b: str) -> list[str]:
    if a.isdigit() and b.isdigit() and int(a) < int(b):
        return [str(n) for n in range(int(a), int(b) + 1)]
    return [a, b]


def parse_citations(text: str, path: str = "<text>") -> list[Citation]:
    """All citations of docs pages by section in ``text``."""
    found = []
    for m in CITATION.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        pos = m.end()
        sec = FIRST.match(text, pos)
        while sec:
            sections = [sec["sec"]]
            pos = sec.end()
            r = RANGE.match(text, pos)
            if r:
                sections = _expand(sections[0], r["sec"])
                pos = r.end()
            items = []
            for kind, pattern in ITEMS:
                it = pattern.match(text, pos)
                if it:
                    if kind == "word":
                        items = [(it["kind"].lower(), n) for n in _numbers(it["v"])]
                    elif kind == "hash":
                        items = [("#", n) for n in _numbers(it["v"])]
                    elif kind == "bug":
                        a, _, b = it["v"].replace(" ", "").partition("-")
                        items = [("bug", chr(c)) for c in range(ord(a), ord(b or a) + 1)]
                    else:
                        items = [("name", it["v"])]
                    pos = it.end()
                    break
            found.append(Citation(f"{path}:{line}", m["page"], sections, items))
            sec = NEXT.match(text, pos)
    return found


def headings(markdown: str) -> list[tuple[int, int, str]]:
    """(line index, level, text) of the markdown headings outside code fences."""
    out, fenced = [], False
    for i, line in enumerate(markdown.splitlines()):
        if FENCE.match(line):
            fenced = not fenced
            continue
        h = None if fenced else HEADING.match(line)
        if h:
            out.append((i, len(h["level"]), h["text"]))
    return out


def section_body(markdown: str, sec: str) -> str | None:
    """The text of section ``sec`` (heading to the next heading of the same or a higher level)."""
    lines = markdown.splitlines()
    hs = headings(markdown)
    start = re.compile(r"(?:§\s?)?" + re.escape(sec) + r"(?:\.?(?:\s|$)|:)")
    for k, (i, level, text) in enumerate(hs):
        if start.match(text):
            end = next((j for j, lv, _ in hs[k + 1:] if lv <= level), len(lines))
            return "\n".join(lines[i:end])
    return None


ITEM_IN_BODY = {
    "trap": lambda v: rf"\btrap\s+{v}\b",
    "step": lambda v: rf"\bstep\s+{v}\b",
    "difference": lambda v: rf"\bdifference\s+{v}\b",
    "#": lambda v: rf"#{v}\b",
    "bug": lambda v: rf"\bbug\s+{v}\b",
    "name": lambda v: re.escape(v),
}


def check(citations: list[Citation], docs: Path) -> list[str]:
    """One message per citation that does not land."""
    errors = []
    for c in citations:
        page = docs / f"{c.page}.md"
        name = f"docs/{c.page}.md"
        if not page.is_file():
            errors.append(f"{c.source}: cites {name}, which does not exist")
            continue
        text = page.read_text(encoding="utf-8")
        for sec in c.sections:
            if section_body(text, sec) is None:
                errors.append(f"{c.source}: cites {name} §{sec}, which has no heading '## {sec}.'")
        body = section_body(text, c.sections[0])
        if body is None:
            continue
        for kind, value in c.items:
            if not re.search(ITEM_IN_BODY[kind](value), body, re.I):
                errors.append(f"{c.source}: cites {name} §{c.sections[0]} {kind} {value}, "
                              f"which section {c.sections[0]} does not contain")
    return errors


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def check_links(path: Path) -> list[str]:
    """Relative links of a markdown file to .md files: the file exists, the anchor is a heading."""
    errors = []
    text = path.read_text(encoding="utf-8")
    for m in LINK.finditer(text):
        target = m["target"]
        if "://" in target:
            continue
        dest = (path.parent / target).resolve()
        where = f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}"
        if not dest.is_file():
            errors.append(f"{where}: links to {target}, which does not exist")
        elif m["anchor"]:
            anchors = {slug(h) for _, _, h in headings(dest.read_text(encoding="utf-8"))}
            if m["anchor"] not in anchors:
                errors.append(f"{where}: links to {target}#{m['anchor']}, which has no such heading")
    return errors


def repository_files() -> list[Path]:
    """Files git tracks, and untracked ones it does not ignore; without git, a walk skipping .git."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=ROOT, capture_output=True, check=True).stdout
        names = sorted({n for n in out.decode().split("\0") if n})
        return [ROOT / n for n in names if (ROOT / n).is_file()]
    except (OSError, subprocess.CalledProcessError):
        files = []
        for d, dirs, fs in os.walk(ROOT):
            top = Path(d) == ROOT  # build outputs and local data live at the root
            dirs[:] = [x for x in dirs if x not in {".git", "__pycache__"} and not x.endswith(".egg-info")
                       and not (top and x in {".whl", "runs", "data", "build"})]
            files += [Path(d) / f for f in fs if not f.endswith((".pyc", ".so"))]
        return files


def read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def all_citations() -> list[Citation]:
    out = []
    for path in repository_files():
        text = read_text(path)
        if text and "docs/" in text:
            out += parse_citations(text, str(path.relative_to(ROOT)))
    return out


def test_every_citation_lands():
    citations = all_citations()
    assert len(citations) > 100, f"only {len(citations)} citations found: is the scan broken?"
    errors = check(citations, ROOT / "docs")
    assert not errors, "dangling citations of docs pages:\n" + "\n".join(errors)


def test_markdown_links_land():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    errors = [e for p in pages if p.is_file() for e in check_links(p)]
    assert not errors, "broken links between markdown files:\n" + "\n".join(errors)


# the strings below are assembled so that this file does not cite anything itself
_D = "docs/"


def test_parser_reads_every_citation_form():
    def refs(s):
        return [(c.page, c.sections, c.items) for c in parse_citations(s)]

    assert refs(_D + "model.md §4 step 6 and §11.") == [
        ("model", ["4"], [("step", "6")]), ("model", ["11"], [])]
    assert refs(_D + "model.md`` §1-§4 and") == [("model", ["1", "2", "3", "4"], [])]
    assert refs(_D + "model.md §4-5") == [("model", ["4", "5"], [])]
    assert refs(_D + "model.md §4.5, x") == [("model", ["4.5"], [])]
    assert refs(_D + "design.md`` §6a with overrides") == [("design", ["6a"], [])]
    assert refs(_D + "model.md §10's count") == [("model", ["10"], [])]
    assert refs(_D + "model.md §3, §6 trap 4)") == [
        ("model", ["3"], []), ("model", ["6"], [("trap", "4")])]
    assert refs(_D + "model.md §6 traps 2-3") == [("model", ["6"], [("trap", "2"), ("trap", "3")])]
    assert refs(_D + "model.md §4 steps 3 and 7):") == [("model", ["4"], [("step", "3"), ("step", "7")])]
    assert refs(_D + "model.md §7 difference 3") == [("model", ["7"], [("difference", "3")])]
    assert refs(_D + "megatron_core_notes.md §2 #6, #7.") == [
        ("megatron_core_notes", ["2"], [("#", "6"), ("#", "7")])]
    assert refs(_D + "megatron_core_notes.md`` §5 bug E)") == [("megatron_core_notes", ["5"], [("bug", "E")])]
    assert refs(_D + "megatron_core_notes.md §5 E ") == [("megatron_core_notes", ["5"], [("bug", "E")])]
    assert refs(_D + "megatron_core_notes.md §2-§3.") == [("megatron_core_notes", ["2", "3"], [])]
    assert refs(_D + "model.md §11 \"Hopper\", x") == [("model", ["11"], [("name", "Hopper")])]
    assert refs(_D + "model.md §4 'Packed documents'") == [("model", ["4"], [("name", "Packed documents")])]
    assert refs("spec ``" + _D + "model.md``\n    # §6: d 3840") == [("model", ["6"], [])]
    assert refs(_D + "model.md §10 FLOPs") == [("model", ["10"], [])]


def test_check_reports_what_does_not_land(tmp_path):
    (tmp_path / "page.md").write_text(
        "# Page\n\n## 1. One\n\ntrap 1 here.\n\n### 1.2 Sub\n\n## 2. Two\n\nBug A.\n\n"
        "```\n## 3. a comment in a code fence\n```\n", encoding="utf-8")
    ok = parse_citations(_D + "page.md §1 trap 1, " + _D + "page.md §1.2 " + _D + "page.md §2 bug A")
    assert check(ok, tmp_path) == []
    bad = {
        _D + "page.md §3": "no heading",  # only inside a code fence
        _D + "page.md §12": "no heading",  # '## 1.' is not section 12
        _D + "page.md §1.3": "no heading",
        _D + "page.md §1 trap 2": "does not contain",
        _D + "page.md §2 trap 1": "does not contain",  # trap 1 is in section 1, not 2
        _D + "page.md §1-§3": "no heading",
        _D + "other.md §1": "does not exist",
    }
    for text, message in bad.items():
        errors = check(parse_citations(text), tmp_path)
        assert len(errors) == 1 and message in errors[0], (text, errors)
