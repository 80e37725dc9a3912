"""The tree stays ruff-clean (lint and format), as configured in pyproject.toml."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_ruff_lint_and_format_are_clean():
    for args in (["check", "--no-fix", "."], ["format", "--check", "."]):
        out = subprocess.run([sys.executable, "-m", "ruff", *args], cwd=REPO, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
