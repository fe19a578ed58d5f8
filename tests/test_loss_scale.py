"""The loss scale's algorithm, state by state."""

import math

import numpy as np
import pytest
import tensorflow as tf

from engine.loss_scale import DynamicLossScale, NoOpLossScale, StaticLossScale, create_loss_scale
from engine.precision import get_policy


def _run(scale, finite_flags):
    values = []
    for finite in finite_flags:
        scale.update(tf.constant(finite))
        values.append(float(scale.value))
    return values


def test_grows_exactly_at_the_growth_interval():
    scale = DynamicLossScale(initial_scale=8.0, growth_interval=3)
    assert _run(scale, [True] * 7) == [8, 8, 16, 16, 16, 32, 32]
    assert int(scale.good_steps) == 1


def test_backs_off_on_a_nonfinite_step_and_resets_the_counter():
    scale = DynamicLossScale(initial_scale=64.0, growth_interval=3)
    assert _run(scale, [True, True, False, True, True, True]) == [64, 64, 32, 32, 32, 64]


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_unscaled_inf_or_nan_gradient_backs_off(bad):
    scale = DynamicLossScale(initial_scale=1024.0, growth_interval=10)
    grads = scale.unscale([tf.constant([1.0, bad], tf.float16), tf.constant([2.0])])
    finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
    assert not bool(finite)
    scale.update(finite)
    assert float(scale.value) == 512.0


def test_respects_min_scale():
    scale = DynamicLossScale(initial_scale=4.0, min_scale=1.0, growth_interval=5)
    assert _run(scale, [False] * 5) == [2, 1, 1, 1, 1]


def test_respects_max_scale_and_never_becomes_inf():
    scale = DynamicLossScale(initial_scale=2.0**120, growth_interval=1, max_scale=2.0**127)
    values = _run(scale, [True] * 50)
    assert max(values) == 2.0**127
    assert all(math.isfinite(v) for v in values)


def test_growth_never_overflows_float32_even_at_the_largest_bound():
    largest = float(np.finfo(np.float32).max)
    scale = DynamicLossScale(initial_scale=2.0**127, growth_interval=1, max_scale=largest)
    values = _run(scale, [True] * 3)
    assert all(math.isfinite(v) for v in values)


def test_scale_and_unscale_round_trip_in_float32():
    scale = DynamicLossScale(initial_scale=2.0**15)
    loss = tf.constant(0.123, tf.float32)
    assert float(scale.scale(loss)) == pytest.approx(0.123 * 2**15)
    (grad,) = scale.unscale([tf.constant([2.0**15, 1.5 * 2**15], tf.float16)])
    assert grad.dtype == tf.float32
    np.testing.assert_array_equal(grad.numpy(), [1.0, 1.5])


def test_static_scale_never_changes():
    scale = StaticLossScale(128.0)
    assert _run(scale, [False, True, True]) == [128, 128, 128]
    (grad,) = scale.unscale([tf.constant([256.0], tf.float16)])
    np.testing.assert_array_equal(grad.numpy(), [2.0])


def test_noop_scale_is_identity_and_casts_to_float32():
    scale = NoOpLossScale()
    loss = tf.constant(3.0)
    assert scale.scale(loss) is loss
    (grad,) = scale.unscale([tf.constant([1.5], tf.bfloat16)])
    assert grad.dtype == tf.float32
    assert _run(scale, [False, True]) == [1.0, 1.0]


def test_update_runs_inside_xla():
    scale = DynamicLossScale(initial_scale=16.0, growth_interval=2)
    update = tf.function(scale.update, jit_compile=True)
    for finite in [True, True, False]:
        update(tf.constant(finite))
    assert float(scale.value) == 16.0
    assert int(scale.good_steps) == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial_scale": 0.0},
        {"initial_scale": 8.0, "max_scale": 4.0},
        {"initial_scale": 8.0, "min_scale": 16.0},
        {"growth_interval": 0},
        {"backoff_factor": 1.0},
        {"max_scale": float("inf")},
    ],
)
def test_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        DynamicLossScale(**kwargs)


def test_policy_decides_which_scale():
    assert type(create_loss_scale(get_policy("fp32"))) is NoOpLossScale
    assert type(create_loss_scale(get_policy("mixed_bf16"))) is NoOpLossScale
    assert type(create_loss_scale(get_policy("mixed"))) is DynamicLossScale
    static = create_loss_scale(get_policy("mixed"), "256")
    assert type(static) is StaticLossScale and float(static.value) == 256.0


def test_state_survives_a_checkpoint_round_trip(tmp_path):
    scale = DynamicLossScale(initial_scale=2.0**10, growth_interval=7)
    _run(scale, [True, True, False, True, True])  # scale 512, counter 2
    path = tf.train.Checkpoint(loss_scale=scale).save(str(tmp_path / "ckpt"))
    restored = DynamicLossScale()
    tf.train.Checkpoint(loss_scale=restored).restore(path).assert_consumed()
    assert float(restored.value) == 512.0
    assert int(restored.good_steps) == 2
