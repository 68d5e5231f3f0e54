"""The code style the project's ruff configuration (pyproject.toml) asks for: pyflakes,
pycodestyle and import order over bngen/ and tests/, so that every `noqa` means something."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or shutil.which("ruff", path=str(Path(sys.executable).parent))
    if ruff is None:
        pytest.fail("ruff is not installed: pip install -e '.[test]' brings it")
    result = subprocess.run([ruff, "check", "--output-format", "concise", "bngen", "tests"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
