"""The tree is clean under the project's ruff configuration (pyproject.toml: pyflakes, import order,
pyupgrade, bugbear). ruff is a ``[dev]`` dependency, installed by ``bash tests/run_tests.sh``."""
from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_check_is_clean():
    res = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format",
                          "concise", "."], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert "No module named ruff" not in res.stderr, "ruff is missing: pip install -e .[dev]"
    assert res.returncode == 0, f"ruff check . (from {REPO}):\n{res.stdout[-4000:]}{res.stderr[-2000:]}"
