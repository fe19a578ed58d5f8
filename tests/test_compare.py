"""`--mode=compare` from the command line: one run per configuration, a table, quiet logs."""

import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, read_texts

CONFIGURATIONS = ("fp32", "mixed-xla", "mixed_bf16")


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("compare")
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "main.py"),
            "--mode=compare",
            "--compare=fp32,mixed+xla,mixed_bf16",
            "--model=tiny",
            "--image_size=16",
            "--train_steps=4",
            "--steps_per_loop=2",
            "--train_examples=64",
            "--eval_examples=32",
            "--verbosity=-1",
            f"--model_dir={logdir}",
            f"--export_dir={logdir}/export",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return logdir, proc


def test_compare_trains_one_run_per_configuration_under_the_logdir(compared):
    logdir, _ = compared
    for name in CONFIGURATIONS:
        assert list((logdir / name).glob("events.out.tfevents.*")), name
        assert "--mode=train" in (logdir / name / "flags.txt").read_text()
        # Each configuration's SavedModel in its own folder, none overwritten.
        assert (logdir / "export" / name / "saved_model.pb").exists(), name


def test_compare_prints_and_writes_the_table(compared):
    logdir, proc = compared
    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert table[0].startswith("| configuration | train time (s) |")
    rows = table[2:]  # after the header and the |---| line
    assert [r.split(" | ")[0].strip("| ") for r in rows] == list(CONFIGURATIONS)
    for row in rows:
        accuracy = float(row.rstrip(" |").rsplit("| ", 1)[1])
        assert 0.0 <= accuracy <= 1.0
    (written,) = read_texts(logdir)["compare/table"]
    assert written[1].splitlines() == table


def test_verbosity_minus_one_hides_progress_lines_but_not_warnings(compared):
    _, proc = compared
    assert "step 4/4" not in proc.stderr and "done:" not in proc.stderr
    # mixed + XLA on a CPU warns that float16 is slow here: warnings still show.
    assert "float16 on a CPU is slower than fp32" in proc.stderr


def test_compare_rerun_in_a_finished_folder_does_not_report_zero_timings(compared, tmp_path):
    logdir, first = compared
    copy = tmp_path / "compare"
    shutil.copytree(logdir, copy)  # the other tests read the original
    args = [
        a.replace(str(logdir), str(copy)) if a.startswith(("--model_dir", "--export_dir")) else a
        for a in first.args
    ]
    again = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    before = [line for line in first.stdout.splitlines() if line.startswith("|")][2:]
    after = [line for line in again.stdout.splitlines() if line.startswith("|")][2:]
    assert len(after) == len(CONFIGURATIONS)
    for old, new in zip(before, after, strict=True):
        old_cells, new_cells = old.split(" | "), new.split(" | ")
        # Nothing trained now: timings are not measured, not zero...
        assert new_cells[1:4] == ["—", "—", "—"], new
        # ...and what the checkpoint holds is reported as before.
        assert new_cells[4:] == old_cells[4:], (old, new)
    assert "already trained by an earlier run" in again.stdout
