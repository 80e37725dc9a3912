"""The tree stays ruff-clean (lint and format) and mypy-clean, as configured in pyproject.toml."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_ruff_lint_and_format_are_clean():
    for args in (["check", "--no-fix", "."], ["format", "--check", "."]):
        out = subprocess.run([sys.executable, "-m", "ruff", *args], cwd=REPO, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_is_clean():
    # Packages and per-module options come from [tool.mypy]; the cache (.mypy_cache, git-ignored)
    # makes a run after the first take a few seconds.
    out = subprocess.run([sys.executable, "-m", "mypy"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
