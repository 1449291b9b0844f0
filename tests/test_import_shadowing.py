"""No folder or module at the repository root shadows an installed package (docs/design.md §1).

On 2026-12-07 a fresh install failed 85 tests and the HF export: transformers >= 5.25 imports Hugging
Face's PyPI package ``kernels``, and the repository's then top-level ``kernels/`` folder was found first
wherever the root was on ``sys.path`` (scripts at the root, ``python -m`` at the root, pytest's rootdir).
These tests start fresh interpreters the way users do: with the root as the working directory and
first on ``sys.path``, and from another directory.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run by `python -c` in the repository root: '' (the working directory) is sys.path[0] there.
_PROBE = r"""
import importlib.util, json, os, sys
root = os.path.realpath(os.getcwd())
assert os.path.realpath(sys.path[0] or ".") == root, sys.path[:2]

def origin(name, path):
    saved = sys.path[:]
    sys.path[:] = path
    try:
        spec = importlib.util.find_spec(name)
    finally:
        sys.path[:] = saved
    if spec is None:
        return None
    where = spec.origin if spec.origin not in (None, "namespace") else list(spec.submodule_search_locations)[0]
    return os.path.realpath(where)

elsewhere = [p for p in sys.path if os.path.realpath(p or ".") != root]
found = {}
for entry in sorted(os.listdir(root)):
    full = os.path.join(root, entry)
    if os.path.isdir(full) and os.path.isfile(os.path.join(full, "__init__.py")):
        name = entry  # a regular package: found before any installed one of that name
    elif entry.endswith(".py") and os.path.isfile(full):
        name = entry[:-3]
    else:
        continue  # a folder without __init__.py yields to any installed module of its name
    if not name.isidentifier():
        continue
    found[name] = {"root": origin(name, sys.path), "installed": origin(name, elsewhere)}

from transformers import OlmoHybridForCausalLM  # imports HF's `kernels` when it is installed
import megatron_hybrid.kernels, megatron_hybrid.layers
import megatron_hybrid.hf.exporter, megatron_hybrid.hf.importer
mods = {m: os.path.realpath(sys.modules[m].__file__) for m in
        ("megatron_hybrid", "megatron_hybrid.kernels", "megatron_hybrid.layers")}
if "kernels" in sys.modules:
    mods["kernels"] = os.path.realpath(sys.modules["kernels"].__file__)
print(json.dumps({"root": root, "found": found, "modules": mods}))
"""


@pytest.fixture(scope="module")
def probe():
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("PYTHONPATH", None)
    res = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_no_root_name_shadows_an_installed_module(probe):
    clashes = {name: where["installed"] for name, where in probe["found"].items()
               if name != "megatron_hybrid" and where["installed"] is not None}
    assert not clashes, (f"repository-root names that hide installed modules when the root is on "
                         f"sys.path (rename or move them): {clashes}")


def test_megatron_hybrid_is_the_installed_checkout(probe):
    """The editable install of the README: the package found with or without the root on sys.path
    is this checkout's, so tests and tools run the installed package."""
    where = probe["found"]["megatron_hybrid"]
    assert where["installed"] is not None, "megatron_hybrid is not installed (pip install -e .[dev])"
    assert where["installed"] == where["root"], where


def test_imports_from_the_root_resolve_to_their_packages(probe):
    root = probe["root"] + os.sep
    mods = probe["modules"]
    for name in ("megatron_hybrid", "megatron_hybrid.kernels", "megatron_hybrid.layers"):
        assert mods[name].startswith(root), (name, mods[name])
    assert mods["megatron_hybrid.kernels"].startswith(os.path.join(root, "megatron_hybrid", "kernels"))
    if "kernels" in mods:  # Hugging Face's package, never a folder of this repository
        assert not mods["kernels"].startswith(root), mods["kernels"]


def test_no_tool_or_example_edits_sys_path():
    offenders = []
    for folder in ("tools", "examples"):
        for dirpath, _, files in os.walk(os.path.join(REPO, folder)):
            for f in files:
                if f.endswith((".py", ".sh")):
                    path = os.path.join(dirpath, f)
                    with open(path, encoding="utf-8") as fh:
                        for n, line in enumerate(fh, 1):
                            if "sys.path.insert" in line or "sys.path.append" in line:
                                offenders.append(f"{os.path.relpath(path, REPO)}:{n}")
    assert not offenders, f"tools must import the installed package, not edit sys.path: {offenders}"
