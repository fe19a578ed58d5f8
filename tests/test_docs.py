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


def test_the_layout_table_names_every_engine_module():
    section = _read("docs/reference.md").split("## Layout", 1)[1]
    modules = sorted(
        os.path.relpath(os.path.join(d, f), os.path.join(ROOT, "engine"))
        for d, _, names in os.walk(os.path.join(ROOT, "engine"))
        for f in names
        if f.endswith(".py") and f != "__init__.py"
    )
    assert len(modules) > 30
    missing = [m for m in modules if os.path.splitext(os.path.basename(m))[0] not in section]
    assert missing == []


def _slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_between_the_docs_reaches_a_file_and_a_heading():
    docs = ["README.md", "BUILD_NOTES.md", *(f"docs/{f}" for f in os.listdir(f"{ROOT}/docs"))]
    checked = 0
    for doc in docs:
        for target, anchor in re.findall(r"\]\(([\w./]+\.md)?#?([\w-]*)\)", _read(doc)):
            path = os.path.normpath(os.path.join(os.path.dirname(doc), target)) if target else doc
            assert os.path.exists(os.path.join(ROOT, path)), (doc, target)
            if anchor:
                headings = re.findall(r"^#+ (.*)$", _read(path), re.M)
                assert anchor in {_slug(h) for h in headings}, (doc, target, anchor)
                checked += 1
    assert checked > 10
    assert _slug("Transfer with `--init_from`") == "transfer-with---init_from"


def _flags_in(text):
    return {name for name in re.findall(r"`--(\w+)`", text)}


def test_the_reference_lists_the_flags_a_resume_must_match_and_the_benchmark_refuses():
    from engine import config

    reference = _read("docs/reference.md")
    resume = re.search(r"A one-line error \(exit 2\) if different:(.*?)\.\n", reference, re.S)
    assert _flags_in(resume.group(1)) == set(config.RESUME_FIELDS)
    refused = re.search(r"Refused in one line:(.*?)\. Flags about", reference, re.S)
    # "(use `--compare`)" names where precision and XLA are chosen instead.
    assert _flags_in(refused.group(1)) - {"compare"} == set(config.BENCHMARK_REFUSED_FLAGS)
