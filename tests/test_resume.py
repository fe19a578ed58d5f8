"""main.py killed, stopped or diverging: nothing is lost (subprocesses, the real command)."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import tensorflow as tf
from conftest import ROOT

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
    "--inject_nonfinite=150:154",
    "--deterministic",
]


def _start(model_dir, *args):
    return subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "main.py"), f"--model_dir={model_dir}", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _run(model_dir, *args):
    proc = _start(model_dir, *args)
    _, stderr = proc.communicate(timeout=300)
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


def test_sigkilled_run_resumes_to_the_same_weights_scale_and_step(tmp_path):
    total = ["--train_steps=400"]
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    code, _ = _run(reference, *RUN, *total)
    assert code == 0
    # Killed twice, each time somewhere after a checkpoint (mostly mid-loop):
    # once early, once after the injected skips; the third start finishes.
    kill_points = []
    for at_least in (40, 180):
        proc = _start(resumed, *RUN, *total)
        _wait_for_checkpoint(proc, resumed, at_least)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        kill_points.append(_latest_step(resumed))
    code, stderr = _run(resumed, *RUN, *total)
    assert code == 0, stderr[-2000:]
    assert f"ckpt-{kill_points[-1]} at step {kill_points[-1]}" in stderr
    expected, actual = _final_state(reference), _final_state(resumed)
    assert int(actual["step/.ATTRIBUTES/VARIABLE_VALUE"]) == 400
    assert float(actual["loss_scale/_scale/.ATTRIBUTES/VARIABLE_VALUE"]) != 256.0
    assert int(actual["skipped_steps/.ATTRIBUTES/VARIABLE_VALUE"]) >= 4
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(actual[name], value, err_msg=name)


def test_sigterm_saves_exits_zero_and_the_next_start_resumes(tmp_path):
    proc = _start(tmp_path, *RUN, "--train_steps=100000", "--checkpoint_every=1000")
    # Wait until training runs (the first checkpoint is far away): the events file has data.
    deadline = time.time() + 120
    while not any(f.stat().st_size > 200 for f in tmp_path.glob("events.out.tfevents.*")):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert "received SIGTERM: saved" in stderr and "Rerun with the same --model_dir" in stderr
    stopped_at = _latest_step(tmp_path)
    assert 0 < stopped_at < 1000  # a checkpoint at the stop, not at a periodic boundary
    code, stderr = _run(tmp_path, *RUN, f"--train_steps={stopped_at + 3}")
    assert code == 0, stderr[-2000:]
    assert f"resuming from {tmp_path}/checkpoints/ckpt-{stopped_at} at step {stopped_at}" in stderr
    assert _latest_step(tmp_path) == stopped_at + 3


def test_forced_divergence_exits_nonzero_and_keeps_the_last_good_checkpoint(tmp_path):
    args = [*RUN, "--train_steps=100", "--inject_nonfinite=25:", "--max_consecutive_skips=10"]
    code, stderr = _run(tmp_path, *args)
    assert code == 3, stderr[-2000:]
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: training diverged: ")
    assert "steps in a row were skipped" in last_line and "--max_consecutive_skips=10" in last_line
    assert last_line.endswith(f"last good checkpoint: {tmp_path}/checkpoints/ckpt-20")
    # Skips start at step 25; the run of 11 is complete at step 36, inside the loop 34-40.
    assert _latest_step(tmp_path) == 20
    reader = tf.train.load_checkpoint(str(tmp_path / "checkpoints" / "ckpt-20"))
    assert int(reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE")) == 20
    assert not list((tmp_path / "checkpoints").glob("ckpt-40*"))
