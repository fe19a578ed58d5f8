"""The docs keep their promises: a short reading path, a README and notes of bounded size."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def test_the_readme_reading_path_names_existing_files_of_at_most_900_lines():
    section = _read("README.md").split("## How to read the engine", 1)[1].split("\n## ", 1)[0]
    files = re.findall(r"^\d+\. `(engine/\w+\.py)`", section, re.M)
    assert files == [
        "engine/precision.py",
        "engine/loss_scale.py",
        "engine/step.py",
        "engine/loop.py",
    ]
    lines = sum(len(_read(f).splitlines()) for f in files)
    assert lines <= 900, lines
    stated = int(re.search(r"four files, (\d+) lines in all", section).group(1))
    assert stated == lines  # the README says the true count


def test_readme_and_build_notes_stay_within_their_sizes():
    assert len(_read("README.md")) <= 12_000
    assert len(_read("BUILD_NOTES.md")) <= 32_000
    assert not re.search(r"\bsession [0-9]+", _read("BUILD_NOTES.md"), re.I)
