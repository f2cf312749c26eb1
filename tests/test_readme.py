"""The README's Python block runs as written (in a fresh working directory, as a new user would)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_a_python_block():
    assert python_blocks(), "the README's Python example is gone"


def test_readme_python_block_runs_as_written(tmp_path):
    for block in python_blocks():
        result = subprocess.run(
            [sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stderr[-3000:]
        # The figures the block's comments promise.
        assert "568740352 4209088" in result.stdout
        assert "{'stage1': 16, 'stage2': 24, 'stage3': 32, 'stage4': 96, 'stage5': 320}" in result.stdout
