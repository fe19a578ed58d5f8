"""The shape a newcomer can read, held: module and function sizes, one source of options."""

import ast
import pathlib
import re

import pytest
from conftest import ROOT

PACKAGES = ("engine", "models", "input_pipeline")
MAX_MODULE_LINES = 500  # in engine/
MAX_FUNCTION_LINES = 50  # docstrings not counted


def _sources(*packages):
    return sorted(p for package in packages for p in pathlib.Path(ROOT, package).rglob("*.py"))


def _function_lines(node):
    """Lines of a function's source, its docstring left out."""
    lines = node.end_lineno - node.lineno + 1
    first = node.body[0]
    docstring = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
    if docstring and isinstance(first.value.value, str):
        lines -= first.end_lineno - first.lineno + 1
    return lines


def _long_functions(path, limit):
    tree = ast.parse(path.read_text(), str(path))
    return [
        f"{path}:{node.lineno} {node.name} ({_function_lines(node)} lines)"
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and _function_lines(node) > limit
    ]


def test_no_engine_module_passes_500_lines():
    sizes = {p: len(p.read_text().splitlines()) for p in _sources("engine")}
    assert len(sizes) > 20
    assert [f"{p.relative_to(ROOT)}: {n}" for p, n in sizes.items() if n > MAX_MODULE_LINES] == []


def test_no_function_passes_50_lines_without_its_docstring():
    paths = [*_sources(*PACKAGES), pathlib.Path(ROOT, "main.py")]
    assert [f for p in paths for f in _long_functions(p, MAX_FUNCTION_LINES)] == []


def test_the_function_count_leaves_the_docstring_out(tmp_path):
    path = tmp_path / "m.py"
    body = "".join(f"    x{i} = {i}\n" for i in range(50))
    path.write_text(f'def f():\n    """One.\n\n    Two.\n    """\n{body}')
    assert _long_functions(path, 51) == []  # the def line and 50: the docstring's 4 are not
    assert len(_long_functions(path, 50)) == 1


def _reads_flags(path):
    tree = ast.parse(path.read_text(), str(path))
    return any(
        (isinstance(node, ast.Name) and node.id == "FLAGS")
        or (isinstance(node, ast.Attribute) and node.attr == "FLAGS")
        for node in ast.walk(tree)
    )


def test_nothing_in_the_engine_reads_absl_flags():
    # main.py turns the flags into a Config; everything below it takes that.
    assert [str(p.relative_to(ROOT)) for p in _sources(*PACKAGES) if _reads_flags(p)] == []
    assert _reads_flags(pathlib.Path(ROOT, "main.py"))  # the walk finds FLAGS where it is


@pytest.mark.parametrize("package", [*PACKAGES, "tests"])
def test_no_tracker_numbers_in_code(package):
    pattern = re.compile(r"\(issue \d+\)|\bissue #?\d+\b", re.I)
    found = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in _sources(package)
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line) and p.name != "test_shape.py"
    ]
    assert found == []
