"""The template stays ruff clean at line length 120 (settings in pyproject.toml)."""

import subprocess
import sys

from conftest import REPO


def test_ruff_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
