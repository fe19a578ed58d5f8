"""Divergence guard and signal handling: counted in the graph, decided on the host."""

import os
import signal

import numpy as np
import pytest
import tensorflow as tf

from engine import loop, train
from engine.actions import divergence, preemption, profiling
from engine.extras.inject import inject_nonfinite
from engine.validation import parse_inject_nonfinite as parse


class _FakeState:
    def __init__(self):
        self.step = tf.Variable(0, dtype=tf.int64)
        self.skipped_steps = tf.Variable(0, dtype=tf.int64)
        self.consecutive_skips = tf.Variable(0, dtype=tf.int64)


def _scripted_loop(finite_script, loss_script):
    """An inner loop whose step reports finite[i] and loss[i] at global step i."""
    state, stats = _FakeState(), loop.LoopStats()
    finite_table = tf.constant(finite_script)
    loss_table = tf.constant(loss_script, tf.float32)

    def step(images, labels):
        del images, labels
        i = state.step
        return {
            "loss": tf.gather(loss_table, i),
            "correct": tf.constant(0),
            "finite": tf.gather(finite_table, i),
            "grad_norm": tf.constant(1.0),
        }

    train_loop = loop.create_train_loop(
        tf.distribute.get_strategy(), step, state, stats, jit_compile=False
    )
    iterator = iter(tf.data.Dataset.from_tensors((0.0, 0)).repeat())
    return state, stats, lambda n: train_loop(iterator, tf.constant(n))


def test_longest_skip_run_inside_a_loop_is_seen_even_if_the_loop_ends_finite():
    finite = [True, False, False, False, True, True, False, True]
    state, stats, run = _scripted_loop(finite, [1.0] * 8)
    run(8)
    values = stats.read_and_reset()
    assert values["max_consecutive_skips"] == 3
    assert int(state.consecutive_skips) == 0  # reset by the finite last step
    assert int(state.skipped_steps) == 4


def test_skip_run_continues_across_loops():
    state, stats, run = _scripted_loop([True, False, False, False, False], [1.0] * 5)
    run(3)
    assert stats.read_and_reset()["max_consecutive_skips"] == 2
    run(2)
    assert stats.read_and_reset()["max_consecutive_skips"] == 4
    assert int(state.consecutive_skips) == 4


def test_nonfinite_losses_are_counted():
    _, stats, run = _scripted_loop([True, False, False, True], [1.0, np.nan, np.inf, 2.0])
    run(4)
    assert stats.read_and_reset()["nonfinite_losses"] == 2


def _values(nonfinite_losses=0, max_consecutive_skips=0):
    return {"nonfinite_losses": nonfinite_losses, "max_consecutive_skips": max_consecutive_skips}


def test_nonfinite_loss_stops_fp32_and_bf16_but_not_float16():
    reason, message = divergence.check(_values(nonfinite_losses=1), 40, False, 25)
    assert reason == "non-finite loss"
    assert message.startswith("training diverged: the loss was not finite in 1 step(s) before")
    assert divergence.check(_values(nonfinite_losses=1), 40, True, 25) is None


def test_more_skips_in_a_row_than_the_limit_stop_the_run():
    assert divergence.check(_values(max_consecutive_skips=25), 40, True, 25) is None
    reason, message = divergence.check(_values(max_consecutive_skips=26), 40, True, 25)
    assert reason == "26 steps skipped in a row"
    assert message.startswith("training diverged: 26 steps in a row were skipped")
    assert "--max_consecutive_skips=25" in message
    assert divergence.check(_values(max_consecutive_skips=999), 40, True, 0) is None


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_first_signal_sets_the_stop_request_and_handlers_are_restored(signum):
    before = signal.getsignal(signum)
    with preemption.stop_on_signals() as stop:
        assert not stop
        os.kill(os.getpid(), signum)
        assert stop.signal_name == signal.Signals(signum).name
    assert signal.getsignal(signum) == before


@pytest.mark.parametrize(
    "spec, poisoned_at",
    [("2", [2]), ("1:3", [1, 2]), ("2:", [2, 3]), ("1:3@b", [1, 2]), ("1,3", [1, 3])],
)
def test_inject_nonfinite_poisons_the_named_steps_and_variables(spec, poisoned_at):
    variables = [tf.Variable([1.0, 2.0], name="a"), tf.Variable(3.0, name="b")]
    grads = [tf.constant([0.5, 0.5]), tf.constant(0.5)]
    only_b = "@" in spec
    for step in range(4):
        out = inject_nonfinite(grads, variables, tf.constant(step, tf.int64), parse(spec))
        nan = [bool(np.isnan(g.numpy()).all()) for g in out]
        hit = step in poisoned_at
        assert nan == ([False, hit] if only_b else [hit, hit]), (step, nan)


def test_inject_nonfinite_rejects_an_unknown_variable():
    with pytest.raises(ValueError, match="no trainable variable's path contains 'nope'"):
        inject_nonfinite([tf.constant(1.0)], [tf.Variable(1.0, name="a")], 1, parse("1@nope"))


def test_a_stop_writes_the_skips_recorded_since_the_last_summary(tmp_path, monkeypatch):
    from conftest import read_scalars, tiny_config

    def after_loop(self, step):
        if step == 3:  # a SIGTERM arrives after the third step
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(profiling.StepProfiler, "after_loop", after_loop)
    config = tiny_config(train_steps=50, steps_per_loop=1, summary_every=40, inject_nonfinite="2")
    result = train.train_and_evaluate(config, str(tmp_path))
    assert result.stopped_by == "SIGTERM" and result.steps == 3
    scalars = read_scalars(tmp_path)
    assert scalars["train/nonfinite_events"] == [(2, 1.0)]  # at its true step
    assert scalars["train/skipped_steps"][-1] == (3, 1.0)


def test_every_skipped_step_is_itemised_before_the_divergence_error(tmp_path):
    from conftest import read_scalars, tiny_config

    # Skips from step 1: the guard sees 5 in a row after the loop ending at step 5,
    # past the last summary (step 3). Those two steps are written before it stops.
    config = tiny_config(
        train_steps=12, steps_per_loop=2, inject_nonfinite="1:8", max_consecutive_skips=3
    )
    with pytest.raises(divergence.TrainingDiverged, match="5 steps in a row") as info:
        train.train_and_evaluate(config, str(tmp_path))
    scalars = read_scalars(tmp_path)
    assert [step for step, _ in scalars["train/nonfinite_events"]] == [1, 2, 3, 4, 5]
    assert scalars["train/skipped_steps"][-1] == (5, 5.0)
    # What --mode=compare's row shows.
    assert (info.value.step, info.value.reason) == (5, "5 steps skipped in a row")
    assert info.value.skipped_steps == 5


def test_a_stop_in_the_loop_that_diverges_ends_a_training_run_as_diverged_saving_nothing(
    tmp_path, monkeypatch
):
    from conftest import tiny_config

    def after_loop(self, step):
        if step == 4:  # a SIGTERM arrives in the loop the guard stops the run after
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(profiling.StepProfiler, "after_loop", after_loop)
    config = tiny_config(
        train_steps=12, inject_nonfinite="1:8", max_consecutive_skips=3, checkpoint_every=2
    )
    with pytest.raises(
        divergence.TrainingDiverged, match=r"last good checkpoint: .*ckpt-2$"
    ) as info:
        train.train_and_evaluate(config, str(tmp_path))
    # Exit 3 (it diverged); the stop is carried for --mode=compare, and saved nothing.
    assert (info.value.step, info.value.stopped_by) == (4, "SIGTERM")
    assert tf.train.latest_checkpoint(tmp_path / "checkpoints").endswith("ckpt-2")
