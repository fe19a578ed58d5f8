"""main.py killed, stopped or diverging: nothing is lost (subprocesses, the real command)."""

import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
import tfds_sets
from conftest import ROOT, main_in_process, main_logged
from image_trees import make_folder_tree

from engine import train_run
from models import create_model

# Small, fast and eventful: growth_interval=3 makes the float16 scale grow into
# overflow and back off again, and the injected steps force a run of skips.
RUN = [
    "--model=tiny",
    "--image_size=16",
    "--batch_size=16",
    "--train_examples=256",
    "--eval_examples=32",
    "--precision=mixed",
    "--steps_per_loop=7",
    "--checkpoint_every=20",
    "--growth_interval=3",
    "--initial_scale=256",
    "--inject_nonfinite=61:65",
    "--deterministic",
]
# The SIGKILL schedule: a checkpoint every 10 steps, skips injected at 13-16, a
# kill after the second checkpoint (past the skips), then a start that trains to
# 40. Generated data is also killed once before, after the first checkpoint: a
# resumed run killed again. Loops of two steps, each logged, keep the run slow
# enough that the kill lands before it ends (the test checks it did).
KILLED = [f for f in RUN if not f.startswith(("--steps_per_loop", "--checkpoint_every"))]
KILLED = [f for f in KILLED if not f.startswith(("--inject", "--train_examples"))]
KILLED += ["--steps_per_loop=2", "--checkpoint_every=10", "--inject_nonfinite=13:17"]
KILL_AFTER, KILLED_STEPS = {"generated": (10, 20), "folder": (20,), "tfds": (20,)}, 40


def _start(model_dir, *args, nice=0):
    """Starts main.py; its log goes to a file (a full, unread pipe would block it).

    `nice`: the run's niceness, so that on a busy machine the test that watches
    it keeps the cores it needs to act on time.
    """
    log = open(f"{model_dir}.log", "a")  # noqa: SIM115 (closed with the process, in _log)
    # SIGINT at its default, as a terminal gives it: a suite started in the
    # background of a script inherits it ignored, and so would every run.
    niced = ["env", "--default-signal=INT", "nice", "-n", str(nice)] if nice else []
    proc = subprocess.Popen(
        [*niced, sys.executable, os.path.join(ROOT, "main.py"), f"--model_dir={model_dir}", *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    proc.log = log
    return proc


def _log(proc, timeout=300):
    """Waits for `proc`; returns everything it logged (all attempts in its model_dir)."""
    proc.wait(timeout=timeout)
    proc.log.close()
    with open(proc.log.name) as f:
        return f.read()


def _run(model_dir, *args):
    proc = _start(model_dir, *args)
    stderr = _log(proc)
    return proc.returncode, stderr


def _latest_step(model_dir):
    path = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    return int(path.rsplit("-", 1)[1]) if path else 0


def _wait_for_checkpoint(proc, model_dir, at_least):
    deadline = time.time() + 120
    while _latest_step(model_dir) < at_least:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        assert time.time() < deadline
        time.sleep(0.01)


def _final_state(model_dir):
    """Every saved tensor except the iterator's serialized buffers, by name."""
    reader = tf.train.load_checkpoint(os.path.join(model_dir, "checkpoints"))
    names = reader.get_variable_to_shape_map()
    return {n: reader.get_tensor(n) for n in names if not n.startswith("iterator")}


def _source(kind, tmp_path):
    """The flags that read `kind` of data: generated, or images streamed from disk by index."""
    if kind == "generated":
        return [*KILLED, "--train_examples=128"]
    # Batches of 4: an epoch of these few images is 5 to 8 steps, not one step
    # with an eval (and BatchNorm's statistics recomputed) after every step.
    if kind == "folder":  # image files, read and decoded at every step
        root = make_folder_tree(tmp_path / "images", per_class=12, classes=("red", "green"))
        return [*KILLED, f"--dataset=folder:{root}", "--cache=", "--batch_size=4"]
    tfds_sets.prepare(tmp_path / "tfds")  # ArrayRecord records, read through tfds.data_source
    tfds_flags = [f"--dataset=tfds:{tfds_sets.NAME}", f"--data_dir={tmp_path / 'tfds'}"]
    return [*KILLED, *tfds_flags, "--cache=", "--batch_size=4"]


@pytest.mark.parametrize("kind", ["generated", "folder", "tfds"])
def test_sigkilled_run_resumes_to_the_same_weights_scale_and_step(tmp_path, kind):
    flags = [*_source(kind, tmp_path), f"--train_steps={KILLED_STEPS}"]
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    # Killed somewhere after a checkpoint, the last time after the injected skips;
    # the next start finishes. Alone on the cores while the kills are timed; the
    # uninterrupted run goes beside the last start.
    kill_points = []
    for at_least in KILL_AFTER[kind]:
        proc = _start(resumed, *flags)
        _wait_for_checkpoint(proc, resumed, at_least)
        proc.send_signal(signal.SIGKILL)
        _log(proc)
        kill_points.append(_latest_step(resumed))
    assert kill_points[-1] < KILLED_STEPS  # killed before the end, not after it
    uninterrupted = _start(reference, *flags)
    code, stderr = _run(resumed, *flags)
    assert code == 0, stderr[-2000:]
    _log(uninterrupted)
    assert uninterrupted.returncode == 0
    assert f"ckpt-{kill_points[-1]} at step {kill_points[-1]}" in stderr
    expected, actual = _final_state(reference), _final_state(resumed)
    assert int(actual["step/.ATTRIBUTES/VARIABLE_VALUE"]) == KILLED_STEPS
    assert float(actual["loss_scale/_scale/.ATTRIBUTES/VARIABLE_VALUE"]) != 256.0
    assert int(actual["skipped_steps/.ATTRIBUTES/VARIABLE_VALUE"]) >= 4
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(actual[name], value, err_msg=name)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_during_start_up_is_one_line_and_the_run_still_resumes(tmp_path, signum):
    # Sent as soon as the run has written its first file, while it builds the
    # model and its step: before the training loop catches signals. A run that
    # got there first saves and exits 0 (tested below): it is started again. The
    # run is niced: on a loaded machine the watching test is not the one starved.
    for attempt in range(4):
        model_dir = tmp_path / str(attempt)
        proc = _start(model_dir, *RUN, "--train_steps=6", nice=10)
        written = model_dir / "checkpoints" / "config.json"
        deadline = time.time() + 120
        while not written.exists():
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.005)
        proc.send_signal(signum)
        stderr = _log(proc)
        assert "Traceback" not in stderr, stderr[-2000:]
        if proc.returncode != 0:
            break
    assert proc.returncode == 128 + signum, stderr[-2000:]  # it landed during start-up
    assert stderr.strip().splitlines()[-1] == (
        f"error: stopped by {signum.name}; checkpoints already written are kept: "
        "rerun the same command to resume"
    )
    code, stderr = _run(model_dir, *RUN, "--train_steps=6")
    assert code == 0 and "done: 6 steps" in stderr, stderr[-2000:]


def test_sigterm_saves_exits_zero_and_the_next_start_resumes(tmp_path):
    proc = _start(tmp_path, *RUN, "--train_steps=100000", "--checkpoint_every=1000")
    # Wait until training runs (the first checkpoint is far away): a progress line is logged.
    deadline = time.time() + 120
    while "step 1/100000" not in pathlib.Path(proc.log.name).read_text():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stderr = _log(proc, timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert "received SIGTERM: saved" in stderr
    assert "SIGTERM: stopped; rerun the same command to resume" in stderr
    stopped_at = _latest_step(tmp_path)
    assert 0 < stopped_at < 1000  # a checkpoint at the stop, not at a periodic boundary
    code, stderr = _run(tmp_path, *RUN, f"--train_steps={stopped_at + 3}")
    assert code == 0, stderr[-2000:]
    assert f"resuming from {tmp_path}/checkpoints/ckpt-{stopped_at} at step {stopped_at}" in stderr
    assert _latest_step(tmp_path) == stopped_at + 3


def test_forced_divergence_exits_3_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    # In-process: the same exit path as the command, without a new TensorFlow.
    args = [f for f in RUN if f != "--deterministic" and not f.startswith("--inject")]
    status = main_in_process(
        *args,
        "--train_steps=100",
        f"--model_dir={tmp_path}",
        "--inject_nonfinite=26:",
        "--max_consecutive_skips=10",
    )
    assert status == 3
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("error: training diverged: ")
    assert "steps in a row were skipped" in last_line and "--max_consecutive_skips=10" in last_line
    assert last_line.endswith(f"last good checkpoint: {tmp_path}/checkpoints/ckpt-20")
    # Skips start at step 25 and pass 10 in a row during the loop from 34 to 40,
    # so that loop is never saved: ckpt-20 is the last checkpoint and stays loadable.
    assert _latest_step(tmp_path) == 20
    reader = tf.train.load_checkpoint(str(tmp_path / "checkpoints" / "ckpt-20"))
    assert int(reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE")) == 20
    model = create_model("tiny", 5, 16, "mixed_float16")  # as --mode=predict loads it
    tf.train.Checkpoint(model=model).restore(
        str(tmp_path / "checkpoints" / "ckpt-20")
    ).expect_partial().assert_existing_objects_matched()
    assert all(np.isfinite(v.numpy()).all() for v in model.weights)
    assert not list((tmp_path / "checkpoints").glob("ckpt-40*"))


# Without --model_dir each start makes a new timestamped folder under runs/ (in
# the working directory): a stop must name the folder to resume, not "rerun".
QUICK = ["--model=tiny", "--image_size=16", "--batch_size=16", "--train_examples=256"]
QUICK += ["--eval_examples=32", "--steps_per_loop=7", "--checkpoint_every=1000"]
HINT = re.compile(r"rerun with --model_dir=(\S+) to resume")


def _start_in(cwd, *args):
    """Starts main.py without --model_dir, in `cwd`; its log goes to cwd/log."""
    log = open(cwd / "log", "a")  # noqa: SIM115 (closed with the process, in _log)
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "main.py"), *args],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    proc.log = log
    return proc


def _stop_while_training(proc):
    deadline = time.time() + 120
    while "step 1/100000" not in pathlib.Path(proc.log.name).read_text():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    return _log(proc, timeout=120)


def _named_folder(stderr, cwd):
    """The folder a stop message names: absolute, existing, the run's own."""
    (named,) = HINT.findall(stderr)
    assert pathlib.Path(named).is_absolute() and os.path.isdir(named), named
    assert [str(p) for p in (cwd / "runs").iterdir()] == [named]
    return named


def test_sigterm_without_model_dir_names_the_folder_to_rerun_with(tmp_path, caplog):
    proc = _start_in(tmp_path, *QUICK, "--train_steps=100000")
    stderr = _stop_while_training(proc)
    assert proc.returncode == 0, stderr[-2000:]
    named = _named_folder(stderr, tmp_path)
    assert "rerun the same command" not in stderr
    stopped_at = _latest_step(named)
    log = main_logged(caplog, *QUICK, f"--train_steps={stopped_at + 3}", f"--model_dir={named}")
    resumed = f"resuming from {named}/checkpoints/ckpt-{stopped_at} at step {stopped_at}"
    assert any(resumed in m for m in log)
    assert _latest_step(named) == stopped_at + 3


def test_a_stop_during_start_up_without_model_dir_names_the_folder(
    tmp_path, capsys, caplog, monkeypatch
):

    monkeypatch.chdir(tmp_path)  # runs/ is made in the working directory
    with monkeypatch.context() as patch:
        # Surely start-up: the folder is made, the model not yet built.
        stopped = _signal_when_called(train_run.build_state, signal.SIGTERM)
        patch.setattr(train_run, "build_state", stopped)
        assert main_in_process(*QUICK, "--train_steps=6") == 128 + signal.SIGTERM
    stderr = capsys.readouterr().err
    named = _named_folder(stderr, tmp_path)
    assert stderr.strip().splitlines()[-1] == (
        "error: stopped by SIGTERM; checkpoints already written are kept: "
        f"rerun with --model_dir={named} to resume"
    )
    log = main_logged(caplog, *QUICK, "--train_steps=6", f"--model_dir={named}")
    assert any(m.startswith("done: 6 steps") for m in log)
    assert len(list((tmp_path / "runs").iterdir())) == 1  # no new folder


def test_a_stopped_compare_without_model_dir_names_the_folder_to_rerun_with(tmp_path, caplog):
    compare = ["--mode=compare", "--compare=fp32,mixed_bf16"]
    proc = _start_in(tmp_path, *QUICK, *compare, "--train_steps=100000")
    stderr = _stop_while_training(proc)
    assert proc.returncode == 0, stderr[-2000:]
    named = _named_folder(stderr, tmp_path)
    assert "rerun the same command" not in stderr and named.endswith("-compare")
    stopped_at = _latest_step(os.path.join(named, "fp32"))
    steps = f"--train_steps={stopped_at + 2}"
    log = main_logged(caplog, *QUICK, *compare, steps, f"--model_dir={named}")
    assert any(f"resuming from {named}/fp32/checkpoints/ckpt-{stopped_at} " in m for m in log)
    assert _latest_step(os.path.join(named, "mixed_bf16")) == stopped_at + 2


def _signal_when_called(function, signum):
    """`function`, but the process gets `signum` as it starts (the first call only)."""
    calls = []

    def wrapped(*args):
        if not calls:
            calls.append(signum)
            os.kill(os.getpid(), signum)
        return function(*args)

    return wrapped


@pytest.mark.parametrize(
    "during, signum", [("export", signal.SIGTERM), ("eval", signal.SIGINT)], ids=["export", "eval"]
)
def test_a_stop_during_the_final_eval_or_export_exits_128_n_and_a_rerun_finishes_it(
    tmp_path, capsys, caplog, monkeypatch, request, during, signum
):
    from conftest import read_scalars

    from engine import loop
    from engine.actions import export

    # Ctrl-C as in a fresh process, whatever an earlier test left installed.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    run, export_dir = tmp_path / "run", tmp_path / "export"
    plain = [f for f in RUN if f != "--deterministic" and not f.startswith("--inject")]
    args = [*plain, "--train_steps=4", f"--model_dir={run}", f"--export_dir={export_dir}"]
    args.append("--verbosity=0")  # absl's INFO lines reach caplog
    with monkeypatch.context() as patch:
        if during == "export":
            stopped = _signal_when_called(export.export_saved_model, signum)
            patch.setattr(export, "export_saved_model", stopped)
        else:  # the only eval: an epoch is 16 steps
            create = loop.create_eval_loop
            patch.setattr(
                loop, "create_eval_loop", lambda *a: _signal_when_called(create(*a), signum)
            )
        assert main_in_process(*args) == 128 + signum, f"SIGINT handler was {previous}"
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: stopped by {signum.name}; checkpoints already written are kept: "
        "rerun the same command to resume"
    )
    assert _latest_step(run) == 4  # saved before the eval and the export
    assert not (export_dir / "saved_model.pb").exists()
    scalars = read_scalars(run)
    assert [s for s, _ in scalars["final/train_seconds"]] == [4]  # the training's timings
    # An eval that finished wrote its metrics before the export began.
    assert ("final/eval_accuracy" in scalars) == (during == "export")
    # The same command again: nothing to train; the eval, its metrics and the export.
    messages = main_logged(caplog, *args)
    assert "already trained to step 4 of 4: nothing to train" in messages
    assert any(m.startswith("done: 4 steps (0 skipped) trained before, eval") for m in messages)
    assert (export_dir / "saved_model.pb").exists()
    scalars = read_scalars(run)
    evals = 2 if during == "export" else 1  # the export's run evaluated once already
    for tag in ("final/eval_accuracy", "final/skipped_steps", "eval/accuracy"):
        assert [s for s, _ in scalars[tag]] == [4] * evals, tag
    (speed,) = scalars["final/examples_per_sec"]
    assert speed[0] == 4 and speed[1] > 0  # kept: not replaced by the re-run's zero
