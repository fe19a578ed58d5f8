"""Shared test setup: quiet TensorFlow, and small helpers for the engine's tests."""

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Processes the tests kill cannot delete their temporary files (autograph's
# generated modules, a few dozen per process): the processes this session
# starts write them into one folder, removed at the end. This process keeps
# the usual one, so pytest's own tmp_path folders stay where users look.
tempfile.tempdir = tempfile.gettempdir()
CHILD_TMPDIR = tempfile.mkdtemp(prefix="engine-tests-")
os.environ["TMPDIR"] = CHILD_TMPDIR
# Remembered image checks (input_pipeline.preprocessing) go there too, not to ~/.cache.
os.environ["XDG_CACHE_HOME"] = os.path.join(CHILD_TMPDIR, "cache")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True)
def _op_determinism_off_after_each_test():
    """`--deterministic` turns TF's op determinism on for the whole process: off again after
    each test, or Keras would run a later test's `jit_compile=True` without XLA (it does
    not compile under determinism) and say so only in a warning."""
    yield
    if "tensorflow" in sys.modules:
        from tensorflow.python.framework import config as tf_config

        if tf_config.is_op_determinism_enabled():
            tf_config.disable_op_determinism()


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(CHILD_TMPDIR, ignore_errors=True)


def _tensor_summaries(logdir, keep):
    """{tag: [(step, proto), ...]} of the summaries under `logdir` whose first proto `keep`s."""
    # TensorBoard's Python loader (--load_fast=false), which honours SessionLog.START.
    from tensorboard.backend.event_processing import plugin_event_accumulator

    acc = plugin_event_accumulator.EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["tensors"]:
        events = acc.Tensors(tag)
        if events and keep(events[0].tensor_proto):
            out[tag] = [(e.step, e.tensor_proto) for e in events]
    return out


def read_scalars(logdir):
    """{tag: [(step, value), ...]} from the TF2 summary event files under `logdir`."""
    # Scalars only: text (DT_STRING = 7), histograms and images have a shape.
    found = _tensor_summaries(logdir, lambda p: p.dtype != 7 and not p.tensor_shape.dim)
    return {
        tag: [(step, float(tf_make_ndarray(p))) for step, p in events]
        for tag, events in found.items()
    }


def read_texts(logdir):
    """{tag: [(step, text), ...]} of the text summaries under `logdir`."""
    # Text is a scalar string; images are strings too, but a vector of them.
    found = _tensor_summaries(logdir, lambda p: p.dtype == 7 and not p.tensor_shape.dim)
    found.pop("custom_scalars__config__", None)  # the dashboard's layout: a proto, not text
    return {
        tag: [(step, tf_make_ndarray(p).item().decode()) for step, p in events]
        for tag, events in found.items()
    }


def run_main(*args, timeout=300, cwd=ROOT, **kwargs):
    """Runs `python main.py ARGS` in a fresh process (in `cwd`); returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "main.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        **kwargs,
    )


@contextlib.contextmanager
def main_flags(*args):
    """main.py's flags parsed from `args` inside, as they were outside; yields `main`."""
    import main

    # Parsing sets absl's logger to --verbosity's level (WARNING by default): put
    # it back, or later tests that read INFO records through caplog see none.
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    main.FLAGS.unparse_flags()
    main.FLAGS(["main.py", *args])
    try:
        yield main
    finally:
        main.FLAGS.unparse_flags()
        absl_logger.setLevel(level)


def main_in_process(*args):
    """main.py's exit status, run in this process (the same exit path, no new TensorFlow)."""
    with main_flags(*args) as main:
        try:
            main.main(["main.py"])
        except SystemExit as e:
            return e.code
    return 0


def main_logged(caplog, *args):
    """main.py run in this process (no new TensorFlow), expected to succeed: the messages
    it logged, INFO and up, in order."""
    caplog.clear()
    with caplog.at_level("INFO", logger="absl"):
        assert main_in_process(*args, "--verbosity=0") == 0
    return [r.getMessage() for r in caplog.records]


def main_captured(*args):
    """main.py run in this process: a CompletedProcess with its exit status and the lines
    it printed to stderr (its `error:` line; absl's log keeps its own stream)."""
    import io

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        status = main_in_process(*args)
    return subprocess.CompletedProcess(["main.py", *args], status, "", stderr.getvalue())


def tf_make_ndarray(proto):
    import tensorflow as tf

    return tf.make_ndarray(proto)


def tiny_config(**overrides):
    """A config that trains the tiny model for a few steps on small generated data."""
    from engine.config import Config

    base = dict(
        model="tiny",
        image_size=16,
        batch_size=16,
        train_steps=4,
        steps_per_loop=2,
        train_examples=128,
        eval_examples=64,
        eval_batch_size=32,
        warmup_steps=0,
        precision="fp32",
    )
    base.update(overrides)
    return Config(**base)


_MIRRORED_RESULTS = {}


# The tests that read the mirrored checks: under pytest-xdist (`-n 2 --dist
# loadgroup`, as .ci/run runs the suite) they share one worker, so the checks'
# process starts once.
MIRRORED = pytest.mark.xdist_group("mirrored")


def mirrored_check(*args):
    """What `tests/mirrored_checks.py` found for check `args` (e.g. "skip_agreement", "1").

    Two logical CPU devices must be set up before TensorFlow starts, so the
    checks run in a process of their own: all of them in one, started by the
    first call of the session.
    """
    import json

    if not _MIRRORED_RESULTS:
        proc = subprocess.run(
            [sys.executable, os.path.join(ROOT, "tests", "mirrored_checks.py")],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=ROOT,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        _MIRRORED_RESULTS.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    result = _MIRRORED_RESULTS[" ".join(args)]
    assert "error" not in result, result.get("error")
    return result
