"""`--mode=compare` from the command line: one run per configuration, a table, quiet logs."""

import shutil
import signal

import pytest
from conftest import main_in_process, read_texts, run_main

from engine import loop, train
from engine.config import Config
from engine.modes import compare

# Its module fixture runs once: under pytest-xdist, its tests share one worker.
pytestmark = pytest.mark.xdist_group("compare")

CONFIGURATIONS = ("fp32", "mixed-xla", "mixed_bf16")
# An epoch is 8 steps: with fewer, the only eval is the final one.
TINY = ["--model=tiny", "--image_size=16", "--batch_size=8", "--steps_per_loop=2"]
TINY += ["--train_examples=64", "--eval_examples=32"]
# float16 first, made to diverge at step 5 (nan gradients for steps 1-7, 3 skips allowed).
DIVERGING_COMPARE = ["--mode=compare", "--compare=mixed,fp32", *TINY, "--train_steps=12"]
DIVERGING_COMPARE += ["--inject_nonfinite=1:8", "--max_consecutive_skips=3"]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("compare")
    proc = run_main(
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
    assert table[0].startswith("| configuration | steps | train time (s) |")
    rows = table[2:]  # after the header and the |---| line
    assert [r.split(" | ")[0].strip("| ") for r in rows] == list(CONFIGURATIONS)
    for row in rows:
        cells = row.strip("| ").split(" | ")
        assert cells[1] == "4"  # every step trained by this call, so timed
        assert float(cells[2]) > 0 and float(cells[4]) > 0
        assert 0.0 <= float(cells[-1]) <= 1.0
    (written,) = read_texts(logdir)["compare/table"]
    assert [line for line in written[1].splitlines() if line.startswith("|")] == table
    assert compare.STEPS_NOTE in written[1] and compare.STEPS_NOTE in proc.stdout


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
        for a in first.args[2:]  # after python and main.py
    ]
    again = run_main(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    before = [line for line in first.stdout.splitlines() if line.startswith("|")][2:]
    after = [line for line in again.stdout.splitlines() if line.startswith("|")][2:]
    assert len(after) == len(CONFIGURATIONS)
    for old, new in zip(before, after, strict=True):
        old_cells, new_cells = old.split(" | "), new.split(" | ")
        # Nothing trained now: timings are not measured, not zero...
        assert new_cells[1] == "4 (trained before)", new
        assert new_cells[2:5] == ["—", "—", "—"], new
        # ...and what the checkpoint holds is reported as before.
        assert new_cells[5:] == old_cells[5:], (old, new)


def _result(steps, trained, stopped_by=""):
    return train.RunResult(
        model_dir="",
        steps=steps,
        skipped_steps=0,
        loss_scale=1.0,
        train_loss=0.5,
        eval_loss=0.5,
        eval_accuracy=0.5,
        train_seconds=3.0 if trained else 0.1,
        first_step_seconds=1.0 if trained else 0.0,
        examples_per_sec=100.0 if trained > 1 else 0.0,
        stopped_by=stopped_by,
        trained_steps=trained,
    )


def test_the_table_says_which_steps_its_timings_cover():
    cases = {
        "full": (_result(400, 400), "400", "3.0"),
        "resumed": (_result(400, 300), "101-400", "3.0"),
        "finished before": (_result(400, 0), "400 (trained before)", "—"),
        "stopped": (_result(100, 100, "SIGTERM"), "100 (stopped by SIGTERM)", "3.0"),
        "stopped at start-up": (_result(0, 0, "SIGTERM"), "0 (stopped by SIGTERM)", "—"),
    }
    rows = compare.table_rows([(name, r) for name, (r, _, _) in cases.items()])
    for row, (steps, seconds) in zip(rows, [c[1:] for c in cases.values()], strict=True):
        assert (row[1], row[2]) == (steps, seconds), row
    # One trained step is timed apart as the first step: no rate, not a rate of 0.
    (row,) = compare.table_rows([("one step", _result(1, 1))])
    assert row[4] == "—"


def test_only_the_float16_run_takes_the_loss_scale_flags(tmp_path, monkeypatch):
    from engine.run_paths import to_flagfile

    given = {}

    def fake_train(config, model_dir):
        given[config.precision] = config
        return _result(4, 4)

    monkeypatch.setattr(train, "train_and_evaluate", fake_train)
    config = Config(
        mode="compare", compare="fp32,mixed,mixed_bf16", model="tiny", initial_scale=1024.0
    )
    compare.compare(config, str(tmp_path))
    assert given["mixed"].initial_scale == 1024.0
    # The others keep the defaults: their flags.txt replays as a training run,
    # which refuses loss-scale flags without a loss scale.
    for precision in ("fp32", "mixed_bf16"):
        assert "--initial_scale=1024.0" not in to_flagfile(given[precision])
        given[precision].check_precision_flags()


def test_a_stopped_configuration_stops_the_comparison(tmp_path, monkeypatch):
    trained = []

    def fake_train(config, model_dir):
        trained.append(config.precision)
        return _result(50, 50, "SIGTERM")

    monkeypatch.setattr(train, "train_and_evaluate", fake_train)
    config = Config(mode="compare", compare="fp32,mixed_bf16", model="tiny")
    results = compare.compare(config, str(tmp_path))
    # One SIGTERM stops the whole comparison, not just the configuration it hit.
    assert trained == ["fp32"] and [name for name, _ in results] == ["fp32"]


def test_a_configuration_stopped_before_its_first_eval_shows_no_accuracy():
    stopped = _result(3, 3, "SIGTERM")
    stopped.eval_accuracy = float("nan")  # as `train_and_evaluate` leaves it: no eval ran
    (row,) = compare.table_rows([("fp32", stopped)])
    assert row[-1] == "—"
    assert "from its last eval (— if none ran)" in compare.STEPS_NOTE


def test_a_diverging_configuration_is_a_row_and_the_rest_still_run(tmp_path, monkeypatch, capsys):
    from engine.actions import divergence

    trained = []

    def fake_train(config, model_dir):
        trained.append(config.precision)
        if config.precision == "mixed":
            raise divergence.TrainingDiverged(
                "training diverged: ...", step=5, reason="non-finite loss", skipped_steps=2
            )  # no loss scale given: nan
        return _result(4, 4)

    monkeypatch.setattr(train, "train_and_evaluate", fake_train)
    config = Config(mode="compare", compare="mixed,fp32", model="tiny")
    with pytest.raises(divergence.TrainingDiverged) as info:
        compare.compare(config, str(tmp_path))
    assert trained == ["mixed", "fp32"]
    assert str(info.value) == (
        "training diverged in 1 of 2 configurations: mixed (step 5: non-finite loss); "
        "see the table above"
    )
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")][2:]
    assert rows[0] == "| mixed | diverged at step 5 (non-finite loss) | — | — | — | 2 | — | — |"
    assert rows[1].startswith("| fp32 | 4 | 3.0 |")
    (written,) = read_texts(tmp_path)["compare/table"]
    assert "diverged at step 5" in written[1]


def test_compare_goes_on_after_a_divergence_and_exits_3(tmp_path):
    proc = run_main(*DIVERGING_COMPARE, f"--model_dir={tmp_path}", "--verbosity=-1")
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert (tmp_path / "fp32" / "flags.txt").exists()  # the second configuration ran
    rows = [line for line in proc.stdout.splitlines() if line.startswith("|")][2:]
    assert [r.split(" | ")[1] for r in rows] == [
        "diverged at step 5 (5 steps skipped in a row)"
    ] * 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: training diverged in 2 of 2 configurations: mixed (step 5: 5 steps skipped "
        "in a row), fp32 (step 5: 5 steps skipped in a row); see the table above"
    )
    assert "Traceback" not in proc.stderr


def _rows(out):
    return [line for line in out.splitlines() if line.startswith("|")][2:]


def test_a_stop_during_a_final_eval_prints_the_table_so_far_then_exits_128_n(
    tmp_path, monkeypatch, capsys
):
    create = loop.create_eval_loop
    made = []

    def eval_loop_for(*args):
        made.append(create(*args))
        if len(made) == 1:  # fp32's
            return made[0]

        def interrupted(dataset):
            raise KeyboardInterrupt  # Ctrl-C outside the training loop

        return interrupted

    args = ["--mode=compare", "--compare=fp32,mixed_bf16", *TINY, "--train_steps=2"]
    args.append(f"--model_dir={tmp_path}")
    with monkeypatch.context() as patch:
        patch.setattr(loop, "create_eval_loop", eval_loop_for)
        assert main_in_process(*args) == 128 + signal.SIGINT
    out, err = capsys.readouterr()
    assert err.strip().splitlines()[-1] == (
        "error: stopped by SIGINT; checkpoints already written are kept: "
        "rerun the same command to resume"
    )
    rows = _rows(out)
    assert rows[0].startswith("| fp32 | 2 | ")
    assert rows[1] == "| mixed_bf16 | unfinished (stopped by SIGINT) | — | — | — | — | — | — |"
    (written,) = read_texts(tmp_path)["compare/table"]
    assert _rows(written[1]) == rows
    # As the hint says: the rerun trains nothing, evaluates mixed_bf16 and reports both.
    assert main_in_process(*args) == 0
    rows = _rows(capsys.readouterr().out)
    assert [r.split(" | ")[:2] for r in rows] == [
        ["| fp32", "2 (trained before)"],
        ["| mixed_bf16", "2 (trained before)"],
    ]


@pytest.mark.parametrize("where", ["in the loop", "outside it"])
def test_a_stop_after_a_divergence_ends_the_comparison_as_stopped_not_diverged(
    tmp_path, monkeypatch, capsys, caplog, where
):
    from engine.actions import divergence, preemption

    def fake_train(config, model_dir):
        if config.precision == "mixed":
            raise divergence.TrainingDiverged(
                "training diverged: ...", step=5, reason="non-finite loss", skipped_steps=2
            )
        if where == "outside it":  # start-up, the final eval or the export
            raise preemption.Terminated
        return _result(3, 3, "SIGTERM")  # the loop saved and returned

    monkeypatch.setattr(train, "train_and_evaluate", fake_train)
    args = ["--mode=compare", "--compare=mixed,fp32,mixed_bf16", f"--model_dir={tmp_path}"]
    with caplog.at_level("WARNING"):
        # Not 3 ("do not retry"): mixed_bf16 never ran, the same command trains it.
        assert main_in_process(*args, "--model=tiny") == 128 + signal.SIGTERM
    out, err = capsys.readouterr()
    assert err.strip().splitlines()[-1] == (
        "error: stopped by SIGTERM; checkpoints already written are kept: "
        "rerun the same command to resume"
    )
    rows = _rows(out)
    assert rows[0] == "| mixed | diverged at step 5 (non-finite loss) | — | — | — | 2 | — | — |"
    stopped = (
        "3 (stopped by SIGTERM)" if where == "in the loop" else "unfinished (stopped by SIGTERM)"
    )
    assert [r.split(" | ")[:2] for r in rows[1:]] == [["| fp32", stopped]]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert (
        "training diverged in 1 of 2 configurations: mixed (step 5: non-finite loss); "
        "the comparison was stopped before the rest ran"
    ) in warnings


def test_a_stop_in_the_loop_that_diverges_stops_the_comparison(tmp_path, monkeypatch, capsys):
    import os

    from engine.actions import divergence

    check = divergence.check

    def ctrl_c_with_the_first_divergence(*args):
        diverged = check(*args)
        if diverged and not ctrl_c_with_the_first_divergence.sent:
            ctrl_c_with_the_first_divergence.sent = True
            os.kill(os.getpid(), signal.SIGINT)  # caught by the loop: a stop request
        return diverged

    ctrl_c_with_the_first_divergence.sent = False
    monkeypatch.setattr(divergence, "check", ctrl_c_with_the_first_divergence)
    status = main_in_process(*DIVERGING_COMPARE, f"--model_dir={tmp_path}")
    # Interrupted, not diverged (3): fp32 never ran, and the same command trains it.
    assert status == 128 + signal.SIGINT
    assert not (tmp_path / "fp32").exists()
    out, err = capsys.readouterr()
    assert out.count("comparison of ") == 1
    assert _rows(out) == [
        "| mixed | diverged at step 5 (5 steps skipped in a row) | — | — | — | 5 | 1024 | — |"
    ]
    assert err.strip().splitlines()[-1] == (
        "error: stopped by SIGINT; checkpoints already written are kept: "
        "rerun the same command to resume"
    )


def test_a_failed_export_prints_the_table_so_far_then_one_line_and_the_rerun_does_as_it_says(
    tmp_path, monkeypatch, capsys
):
    import errno

    import tensorflow as tf

    save = tf.saved_model.save

    def full_disk_for_fp32(module, path, **kwargs):
        if "/fp32" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(module, path, **kwargs)

    args = ["--mode=compare", "--compare=fp32,mixed_bf16", *TINY, "--train_steps=2"]
    args += [f"--model_dir={tmp_path}/runs", f"--export_dir={tmp_path}/exp"]
    with monkeypatch.context() as patch:
        patch.setattr(tf.saved_model, "save", full_disk_for_fp32)
        assert main_in_process(*args) == 2
    out, err = capsys.readouterr()
    assert err.strip().splitlines()[-1] == (
        f"error: fp32: the SavedModel could not be written to {tmp_path}/exp/fp32: "
        "[Errno 28] No space left on device; the last step's checkpoint is saved: fix the "
        "folder, then rerun the same command to export it and train the rest"
    )
    rows = _rows(out)
    assert rows == ["| fp32 | export failed | — | — | — | — | — | — |"]
    (written,) = read_texts(tmp_path / "runs")["compare/table"]
    assert _rows(written[1]) == rows
    assert not (tmp_path / "runs" / "mixed_bf16").exists()
    # As the hint says: fp32 trains nothing more and is exported, mixed_bf16 is trained.
    assert main_in_process(*args) == 0
    rows = _rows(capsys.readouterr().out)
    assert [r.split(" | ")[:2] for r in rows] == [
        ["| fp32", "2 (trained before)"],
        ["| mixed_bf16", "2"],
    ]
    for name in ("fp32", "mixed_bf16"):
        assert (tmp_path / "exp" / name / "saved_model.pb").exists(), name


def test_a_failed_export_of_the_last_configuration_names_no_rest_to_train(
    tmp_path, monkeypatch, capsys
):
    from engine import run
    from engine.actions import export

    def fake_train(config, model_dir):
        if config.precision == "mixed_bf16":
            raise export.ExportError(f"the SavedModel could not be written to {config.export_dir}")
        return _result(4, 4)

    monkeypatch.setattr(train, "train_and_evaluate", fake_train)
    config = Config(
        mode="compare",
        compare="fp32,mixed_bf16",
        model="tiny",
        model_dir=str(tmp_path),
        export_dir="/exp",
    )
    with pytest.raises(run.UserError) as info:
        run.run(config)
    assert str(info.value) == (
        "mixed_bf16: the SavedModel could not be written to /exp/mixed_bf16; the last step's "
        "checkpoint is saved: fix the folder, then rerun the same command to export it"
    )
    rows = _rows(capsys.readouterr().out)
    assert rows[0].startswith("| fp32 | 4 | 3.0 |")
    assert rows[1] == "| mixed_bf16 | export failed | — | — | — | — | — | — |"
