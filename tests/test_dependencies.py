"""Imports point one way: main -> engine -> (models, input_pipeline)."""

import ast
import pathlib
import subprocess
import sys

import pytest
from conftest import ROOT


def _imported_modules(path):
    """Every module `path` imports, at any depth (lazy imports inside functions too)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module


@pytest.mark.parametrize("package", ["models", "input_pipeline"])
def test_models_and_input_pipeline_import_nothing_from_engine(package):
    files = sorted(pathlib.Path(ROOT, package).rglob("*.py"))
    assert files, f"no Python files under {package}/"
    offending = [
        f"{path.relative_to(ROOT)}: {module}"
        for path in files
        for module in _imported_modules(path)
        if module == "engine" or module.startswith("engine.") or module == "main"
    ]
    assert offending == []


def test_the_import_walk_sees_an_import_inside_a_function(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from engine.loop import build_state\n")
    assert list(_imported_modules(path)) == ["engine.loop"]


def test_the_config_and_the_pipelines_paths_load_without_tensorflow():
    # main.py refuses a bad flag before TensorFlow loads: engine.config must not pull it in.
    code = "import sys, engine.config; print('tensorflow' in sys.modules)"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False"
