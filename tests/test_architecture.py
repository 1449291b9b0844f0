"""The package map of ``docs/architecture.md`` holds: imports point one way only, and units stay small.

The import graph is read with Python's ``ast`` from every module of ``megatron_hybrid`` (imports
inside functions included, relative imports resolved): a module may import modules of its own unit
and units on a lower level of ``docs/architecture.md`` §2 only. The levels below are that page's
table; the test also parses the page, so the two cannot drift apart.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "megatron_hybrid"
PAGE = ROOT / "docs" / "architecture.md"
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80
#: a function with at least this many ``add_argument`` calls is an argument table
ARGUMENT_TABLE_CALLS = 10
#: verbatim snapshots of code before a change, kept as test references (not maintained code)
SNAPSHOTS = ("tests/config/arguments_before_typed_config.py",)
#: units that must not import megatron-core (``docs/architecture.md`` §1): module prefixes
NO_MEGATRON_CORE = ("megatron_hybrid.init", "megatron_hybrid.kernels", "megatron_hybrid.config.model",
                    "megatron_hybrid.config.layout", "megatron_hybrid.config.gdn_projection")


def documented_levels() -> dict[str, int]:
    """{unit: level} from the fenced level table of ``docs/architecture.md`` §2."""
    text = PAGE.read_text()
    section = text[text.index("## 2. Import direction"):]
    block = section[section.index("```") + 3:]
    block = block[:block.index("```")]
    levels = {}
    for line in block.strip().splitlines():
        m = re.match(r"\s*(\d+)\s+(.*)$", line)
        assert m, f"{PAGE}: level line {line!r} is not 'N  unit unit ...'"
        level = int(m.group(1))
        for unit in m.group(2).split():
            if re.fullmatch(r"[a-z_]+", unit):
                levels[f"megatron_hybrid.{unit}"] = level
    return levels


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``, relative ones resolved."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((node.lineno, target))
            # ``from package import module`` imports the module too
            out += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
    return out


def unit_of(module: str, levels: dict[str, int]) -> str | None:
    """The documented unit a module belongs to (longest matching prefix), or None."""
    best = None
    for unit in levels:
        if module == unit or module.startswith(unit + "."):
            if best is None or len(unit) > len(best):
                best = unit
    return best


def package_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_unit_of_the_package_is_documented():
    levels = documented_levels()
    units = {module_name(p).split(".")[1] for p in package_files() if module_name(p) != "megatron_hybrid"}
    missing = sorted(u for u in units if f"megatron_hybrid.{u}" not in levels)
    assert not missing, f"{PAGE} §2 has no level for: {missing}"


def test_imports_point_down_the_documented_levels():
    levels = documented_levels()
    wrong = []
    for path in package_files():
        source = module_name(path)
        src_unit = unit_of(source, levels)
        for line, target in imports_of(path):
            if target.split(".")[0] in ("tests", "tools", "examples", "pretrain_olmo_hybrid"):
                wrong.append(f"{path.relative_to(ROOT)}:{line}: imports {target} (outside the package)")
                continue
            dst_unit = unit_of(target, levels)
            if src_unit is None or dst_unit is None or dst_unit == src_unit:
                continue
            if levels[dst_unit] >= levels[src_unit]:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {src_unit} (level {levels[src_unit]}) "
                             f"imports {target} ({dst_unit}, level {levels[dst_unit]})")
    assert not wrong, "imports against docs/architecture.md §2:\n" + "\n".join(sorted(set(wrong)))


def test_kernels_and_model_config_do_not_import_megatron_core():
    wrong = []
    for path in package_files():
        name = module_name(path)
        if not name.startswith(NO_MEGATRON_CORE):
            continue
        wrong += [f"{path.relative_to(ROOT)}:{line}: imports {t}" for line, t in imports_of(path)
                  if t == "megatron" or t.startswith("megatron.")]
    assert not wrong, "\n".join(wrong)


def _argument_table(node: ast.AST) -> bool:
    calls = [n for n in ast.walk(node) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and n.func.attr == "add_argument"]
    return len(calls) >= ARGUMENT_TABLE_CALLS


@pytest.mark.parametrize("folder", ["megatron_hybrid", "tools", "examples", "tests"])
def test_files_and_functions_stay_small(folder):
    too_long = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        if "__pycache__" in path.parts or str(path.relative_to(ROOT)) in SNAPSHOTS:
            continue
        text = path.read_text()
        lines = text.count("\n")
        if lines > MAX_FILE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {lines} lines (at most {MAX_FILE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES and not _argument_table(node):
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.name}() has {n} "
                                    f"lines (at most {MAX_FUNCTION_LINES} outside argument tables)")
    assert not too_long, "\n".join(too_long)


def test_the_checker_sees_a_wrong_edge(tmp_path):
    """The import reader resolves relative and in-function imports (so a wrong edge cannot hide)."""
    pkg = tmp_path / "megatron_hybrid" / "kernels"
    pkg.mkdir(parents=True)
    (pkg / "x.py").write_text("def f():\n    from ..training import train\n    from . import y\n")
    found = [t for _, t in imports_of(pkg / "x.py", tmp_path)]
    assert "megatron_hybrid.training" in found and "megatron_hybrid.training.train" in found
    assert "megatron_hybrid.kernels.y" in found
    levels = documented_levels()
    assert levels[unit_of("megatron_hybrid.training.train", levels)] > levels["megatron_hybrid.kernels"]



def test_kernels_and_config_load_without_megatron_core():
    """Importing the kernels, the model config and the projection layout pulls in no megatron-core,
    also indirectly (a fresh interpreter's ``sys.modules``)."""
    import subprocess
    import sys

    code = ("import sys, megatron_hybrid.kernels, megatron_hybrid.kernels.gdn_mixer, "
            "megatron_hybrid.config, megatron_hybrid.config.gdn_projection, megatron_hybrid.init; "
            "print(sorted(m for m in sys.modules if m == 'megatron' or m.startswith('megatron.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]", out
