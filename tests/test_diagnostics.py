"""The graph-side records behind the TensorBoard diagnostics, and the injection hook."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from engine.config import Config, ConfigError
from engine.extras import create_train_step, diagnostics
from engine.extras.inject import inject_nonfinite
from engine.loss_scale import NoOpLossScale
from engine.precision import get_policy
from engine.validation import parse_compare, parse_inject_nonfinite
from models import create_model


def test_float16_range_fractions_use_float16s_own_rounding():
    # 2**-25 rounds to zero in float16, 2**-24 (the smallest subnormal) survives;
    # at a scale of 2**16, 1.0 becomes 65536 > 65504 and overflows; nan counts as overflow.
    grads = [tf.constant([0.0, 2.0**-25, 2.0**-24, 1.0]), tf.constant([[float("nan"), 1e-3]])]
    out = diagnostics.float16_range_fractions(grads, tf.constant(2.0**16))
    assert float(out["underflow_fraction"]) == pytest.approx(1 / 6)
    assert float(out["overflow_fraction"]) == pytest.approx(2 / 6)


def _record(monitor, records):
    @tf.function
    def run(step, finite, flags):
        monitor.record(step, {"finite": finite, "finite_per_variable": flags})

    for step, flags in records:
        flags = tf.constant(flags)
        run(tf.constant(step, tf.int64), tf.reduce_all(flags), flags)


def test_step_monitor_names_the_nonfinite_variables_of_nonfinite_steps_only():
    monitor = diagnostics.StepMonitor(["a/kernel", "b/kernel", "b/bias"], capacity=4)
    _record(
        monitor,
        [(1, [True, True, True]), (2, [True, False, True]), (3, [True] * 3), (4, [False] * 3)],
    )
    readout = monitor.read_and_reset()
    assert readout.events == [(2, ["b/kernel"]), (4, ["a/kernel", "b/kernel", "b/bias"])]
    assert readout.dropped == 0 and readout.scalars == {}
    assert monitor.read_and_reset().events == []  # reset


def test_step_monitor_keeps_the_last_capacity_events_and_counts_the_rest():
    monitor = diagnostics.StepMonitor(["w"], capacity=2)
    _record(monitor, [(s, [False]) for s in (3, 4, 5, 6, 7)])
    readout = monitor.read_and_reset()
    assert [s for s, _ in readout.events] == [6, 7]
    assert readout.dropped == 3


def test_injection_poisons_only_matching_variables_at_the_given_steps():
    variables = [tf.Variable([1.0], name="conv_kernel"), tf.Variable([1.0], name="dense_bias")]
    variables[0].path, variables[1].path = "conv/kernel", "dense/bias"  # Keras 3 names
    grads = [tf.ones([1]), tf.ones([1])]
    for step, expect_nan in ((2, False), (3, True), (5, True)):
        spec = parse_inject_nonfinite("3,5@conv")
        out = inject_nonfinite(grads, variables, tf.constant(step, tf.int64), spec)
        assert bool(np.isnan(out[0].numpy()).all()) == expect_nan
        assert np.isfinite(out[1].numpy()).all()


def test_injection_into_an_unknown_variable_names_the_flag():
    variables = [tf.Variable([1.0])]
    variables[0].path = "conv/kernel"
    with pytest.raises(ConfigError, match="--inject_nonfinite: no trainable variable"):
        spec = parse_inject_nonfinite("1@lstm")
        inject_nonfinite([tf.ones([1])], variables, tf.constant(1, tf.int64), spec)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"compare": "fp32,fp16"}, "--compare entry 'fp16' is not PRECISION or PRECISION+xla"),
        ({"compare": "mixed+jit"}, "--compare entry 'mixed+jit'"),
        ({"compare": "fp32,fp32"}, "lists a configuration twice"),
        ({"inject_nonfinite": "x@conv"}, "is not STEPS\\[@VARIABLE\\]"),
        ({"inject_nonfinite": "0@conv"}, "with steps >= 1"),
        ({"inject_nonfinite": "5:3"}, "with steps >= 1"),
        ({"summary_every": -1}, "--summary_every must be an integer >= 0"),
        ({"histogram_every": -2}, "--histogram_every must be an integer >= 0"),
    ],
)
def test_bad_diagnostics_flags_are_config_errors(changes, message):
    with pytest.raises(ConfigError, match=message.replace("+", r"\+")):
        Config(**changes)


def test_compare_and_inject_specs_parse():
    assert parse_compare("fp32, mixed+xla,mixed_bf16") == (
        ("fp32", False),
        ("mixed", True),
        ("mixed_bf16", False),
    )
    assert parse_inject_nonfinite("3,5@conv") == (((3, 4), (5, 6)), "conv")
    assert parse_inject_nonfinite("10:20,25:") == (((10, 20), (25, None)), "")
    assert parse_inject_nonfinite("") is None


def test_gradient_probe_weights_the_loss_as_the_step_does():
    # Class 0 weighs nothing: on a batch of class 0 alone, the gradients the
    # step would apply are zero, and so must be the histograms' gradients.
    keras.utils.set_random_seed(0)
    model = create_model("tiny", 2, 16, get_policy("fp32").keras_policy)
    optimizer = keras.optimizers.SGD(0.1)
    optimizer.build(model.trainable_variables)
    images = tf.random.stateless_uniform([4, 16, 16, 3], [0, 4])
    labels = tf.zeros([4], tf.int32)

    def probe_grads(class_weights):
        step = create_train_step(model, optimizer, NoOpLossScale(), 4, class_weights=class_weights)
        return diagnostics.create_gradient_probe(step)(images, labels)

    assert any(float(tf.reduce_max(tf.abs(g))) > 0 for g in probe_grads(None))
    assert all(float(tf.reduce_max(tf.abs(g))) == 0 for g in probe_grads([0.0, 2.0]))
