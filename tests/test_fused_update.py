"""The fused optimizer update computes Keras' update, on Keras' own slots."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from engine.extras.fused_update import apply_gradients, fusable

_SCHEDULE = keras.optimizers.schedules.CosineDecay(0.0, 10, warmup_target=0.1, warmup_steps=5)
# name: (optimizer factory, the fused kernel it must use)
OPTIMIZERS = {
    "adam": (lambda: keras.optimizers.Adam(1e-2), "ResourceApplyAdam"),
    "adam_schedule": (lambda: keras.optimizers.Adam(_SCHEDULE), "ResourceApplyAdam"),
    "adamw": (lambda: keras.optimizers.AdamW(1e-2, weight_decay=0.05), "ResourceApplyAdam"),
    "sgd": (lambda: keras.optimizers.SGD(0.1), "ResourceApplyGradientDescent"),
    "momentum": (lambda: keras.optimizers.SGD(0.1, momentum=0.9), "ResourceApplyKerasMomentum"),
    "nesterov": (
        lambda: keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True),
        "ResourceApplyKerasMomentum",
    ),
}


def _variables():
    rng = np.random.default_rng(0)
    return [keras.Variable(rng.normal(size=s).astype(np.float32)) for s in [(5, 3), (3,)]]


def _train(optimizer, update, xla, steps=12):
    """Returns (final weights and slots, the op types of the traced update)."""
    variables = _variables()
    optimizer.build(variables)
    step = tf.function(lambda grads: update(optimizer, grads, variables), jit_compile=xla)
    rng = np.random.default_rng(1)
    for _ in range(steps):
        step([tf.constant(rng.normal(size=v.shape).astype(np.float32)) for v in variables])
    spec = [tf.TensorSpec(v.shape, tf.float32) for v in variables]
    op_types = {op.type for op in step.get_concrete_function(spec).graph.get_operations()}
    return [v.numpy() for v in variables + optimizer.variables], op_types


def _keras_apply(optimizer, grads, variables):
    optimizer.apply(grads, variables)


@pytest.mark.parametrize("xla", [False, True], ids=["no_xla", "xla"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_fused_update_matches_keras_apply(name, xla):
    make, kernel = OPTIMIZERS[name]
    expected, keras_ops = _train(make(), _keras_apply, xla)
    got, fused_ops = _train(make(), apply_gradients, xla)
    # Weights, slots and iterations (the schedule's position): the same formulas.
    # Adam's kernel computes 1 - beta in float32 (see the module docstring): its
    # second moment moves 1.3e-5 relative off Keras' per step, hence rtol 2e-5.
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    assert kernel in fused_ops and kernel not in keras_ops  # the fused path really ran


def test_no_gradients_leave_iterations_alone_like_keras():
    optimizer = keras.optimizers.Adam(1e-2)
    optimizer.build(_variables())
    apply_gradients(optimizer, [], [])
    assert int(optimizer.iterations) == 0


def test_unsupported_settings_fall_back_to_keras_bit_for_bit():
    for make in (
        lambda: keras.optimizers.Adam(1e-2, amsgrad=True),
        lambda: keras.optimizers.Adam(1e-2, clipnorm=0.5),
        lambda: keras.optimizers.RMSprop(1e-2),
    ):
        assert not fusable(make(), [tf.zeros(1)], _variables())
        expected, _ = _train(make(), _keras_apply, xla=False)
        got, ops = _train(make(), apply_gradients, xla=False)
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_array_equal(a, b)
        assert not {"ResourceApplyAdam", "ResourceApplyKerasMomentum"} & ops


def test_not_fused_under_a_mirrored_strategy():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        variables = _variables()
        optimizer = keras.optimizers.Adam(1e-2)
        assert not fusable(optimizer, [tf.zeros(1)], variables)
    assert fusable(keras.optimizers.Adam(1e-2), [tf.zeros(1)], _variables())
