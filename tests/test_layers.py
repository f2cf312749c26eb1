"""The one import rule (README, "Design"): the layers contract in pyproject.toml, checked by import-linter, and
imports at module top outside the stated exceptions."""

from __future__ import annotations

import ast
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "mobilenet"

# Where a function-level import is the rule's stated exception (README, "Design"):
# - the CLI imports a subcommand's module only when that subcommand runs, so `mobilenet cost` starts without torch;
# - optional extras (onnx, onnxruntime, onnxscript, openvino, executorch and its torchao, litert_torch and
#   ai_edge_litert, timm and its huggingface_hub, sklearn) are imported where used, so the package works without
#   them and says which extra to install;
# - matplotlib's pyplot is imported when a plot is drawn, so importing the library never switches a notebook's
#   matplotlib backend.
OPTIONAL = {
    "onnx",
    "onnxruntime",
    "onnxscript",
    "openvino",
    "executorch",
    "torchao",
    "litert_torch",
    "ai_edge_litert",
    "timm",
    "huggingface_hub",
    "sklearn",
    "matplotlib",
    "resource",
}


def _function_level_imports(path: Path, root: Path = ROOT) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[str] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for inner in ast.walk(node):
            if isinstance(inner, ast.Import):
                names = [alias.name for alias in inner.names]
            elif isinstance(inner, ast.ImportFrom) and inner.level == 0 and inner.module:
                names = [inner.module]
            else:
                continue
            for name in names:
                if name.split(".")[0] not in OPTIONAL:
                    found.append(f"{path.relative_to(root)}:{inner.lineno} imports {name} inside {node.name}()")
    return found


def test_imports_are_at_module_top_outside_the_stated_exceptions():
    offenders = [
        line
        for path in sorted(PACKAGE.rglob("*.py"))
        if "cli" not in path.relative_to(PACKAGE).parts
        for line in _function_level_imports(path)
    ]
    assert not offenders, "\n".join(offenders)


def test_the_checker_sees_a_function_level_import(tmp_path):
    module = tmp_path / "probe.py"
    module.write_text("def f():\n    import torch\n    return torch\n")
    assert _function_level_imports(module, tmp_path) == ["probe.py:2 imports torch inside f()"]


def _lint_imports() -> subprocess.CompletedProcess[str]:
    executable = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert executable, "import-linter is part of the test extra (pip install -e '.[test]')"
    return subprocess.run([executable], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(importlib.util.find_spec("importlinter") is None, reason="import-linter is not installed")
def test_layers_contract_holds():
    result = _lint_imports()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


@pytest.mark.skipif(importlib.util.find_spec("importlinter") is None, reason="import-linter is not installed")
def test_layers_contract_fails_on_an_upward_import(tmp_path):
    """A deliberate upward import (spec, at the bottom, importing train, near the top) breaks the build."""
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "src", tree / "src")
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    spec = tree / "src" / "mobilenet" / "spec.py"
    spec.write_text(spec.read_text() + "\nfrom mobilenet import train as _upward  # noqa: E402\n")
    executable = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    result = subprocess.run(
        [executable],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(tree / "src"), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode != 0
    assert "mobilenet.spec -> mobilenet.train" in result.stdout
