"""A user's mistake is one line on stderr starting `error: `, exit status 2, nothing lost.

The user-error types keep their message to one line by construction.
"""

import ast
import glob
import os

import pytest
from conftest import ROOT

# --- one line by construction --------------------------------------------------

# A message as a library may write it: indented lines, blank ones, CR LF and
# the other line breaks a terminal shows as a new line.
MULTI_LINE = "Error parsing split 'x'. \n\n  Unknown split 'x'.\r\nsee\x0bthe\u2028docs  \n"
FOLDED = "Error parsing split 'x'.; Unknown split 'x'.; see; the; docs"

# The errors main.py prints as `error:` lines, each one line by construction.
ONE_LINE_TYPES = {
    "ConfigError": "engine.config",
    "DataError": "input_pipeline.preprocessing",
    "UserError": "engine.run",
}
# The other error types of the project, and how the user meets them: as one of
# the types above (their text folded there) or through main.py's `_fail`.
SHOWN_THROUGH = {
    "DamagedCheckpoints": "UserError (engine.run.run)",
    "ExportError": "UserError (engine.run.run)",
    "ExportFailed": "UserError (engine.run.run; an ExportError)",
    "WeightsMismatch": "ConfigError (engine.initialization._load_file)",
    "TrainingDiverged": "main._fail, exit 3",
    "Terminated": "main._fail, exit 128 + SIGTERM",
}


def _exception_classes():
    """The names of the exception classes defined in main.py, engine/, input_pipeline/, models/."""
    paths = [os.path.join(ROOT, "main.py")]
    for package in ("engine", "input_pipeline", "models"):
        paths += glob.glob(os.path.join(ROOT, package, "**", "*.py"), recursive=True)
    classes = {}
    for path in paths:
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                classes[node.name] = [ast.unparse(base).split(".")[-1] for base in node.bases]
    found, grew = set(), True
    while grew:  # subclasses of Python's exceptions, and of those found, to any depth
        new = {
            name
            for name, bases in classes.items()
            if any(b in found or b.endswith(("Error", "Exception", "Interrupt")) for b in bases)
        }
        grew, found = new != found, new
    return found


def test_every_error_type_is_one_line_or_reaches_the_user_through_one():
    # A new error type must be sorted into one of the two tables above.
    assert _exception_classes() == set(ONE_LINE_TYPES) | set(SHOWN_THROUGH)


@pytest.mark.parametrize("name", sorted(ONE_LINE_TYPES))
def test_a_user_error_folds_a_message_holding_newlines_into_one_line(name):
    import importlib

    error_type = getattr(importlib.import_module(ONE_LINE_TYPES[name]), name)
    assert str(error_type(MULTI_LINE)) == FOLDED
    assert str(error_type("--flag=x is wrong; fix it")) == "--flag=x is wrong; fix it"
    # As its callers catch it: ConfigError and DataError are ValueErrors.
    assert issubclass(error_type, ValueError) == (name != "UserError")


def test_main_fail_prints_one_line_whatever_the_message_holds(capsys):
    import main

    with pytest.raises(SystemExit) as exit_:
        main._fail(MULTI_LINE)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"error: {FOLDED}\n"
