"""Float8: the formats against ml_dtypes, the recipes, their state, and Keras' float8 Dense."""

import collections
import os
import re

import keras
import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf
from conftest import MIRRORED, mirrored_check, tiny_config

from engine import float8
from engine.float8 import E4M3, E5M2
from models import create_model

NUMPY_FORMATS = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}
RECIPES = ["current", "delayed", "block", "unscaled"]


def _np_qdq(x, scale, fmt):
    """The reference quantize-dequantize: float32 numpy arithmetic and ml_dtypes' cast."""
    scale = np.float32(scale)
    scaled = np.clip(np.asarray(x, np.float32) * scale, -fmt.max, fmt.max)
    return scaled.astype(NUMPY_FORMATS[fmt.name]).astype(np.float32) * (np.float32(1) / scale)


def _np_tiles(x, rows, cols, fmt=E4M3):
    """`x` through `fmt` with one scale (max / amax) per `rows` x `cols` tile, tile by tile."""
    out = np.empty_like(x)
    for i in range(0, x.shape[0], rows):
        for j in range(0, x.shape[1], cols):
            tile = x[i : i + rows, j : j + cols]
            amax = np.abs(tile).max()
            scale = np.float32(fmt.max) / amax if amax > 0 else 1.0
            out[i : i + rows, j : j + cols] = _np_qdq(tile, scale, fmt)
    return out


def _assert_product(got, a, b):
    """`got` is a @ b (float64 from float32 operands) up to float32 summation error."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    bound = 2.0**-20 * (np.abs(a) @ np.abs(b)) + 1e-30
    assert (np.abs(got.astype(np.float64) - a @ b) <= bound).all()


def _probe(fmt):
    """Every finite float8 value, the midpoints between neighbours and one float32 ulp
    either side of them, values past the max, and random magnitudes over the range."""
    grid = np.arange(256, dtype=np.uint8).view(NUMPY_FORMATS[fmt.name]).astype(np.float32)
    grid = np.unique(grid[np.isfinite(grid)])
    mids = (grid[:-1] + grid[1:]) / 2  # exact: one more significant bit than the format
    rng = np.random.default_rng(0)
    randoms = np.exp(rng.uniform(np.log(1e-9), np.log(4 * fmt.max), 4000))
    past = [fmt.max * 1.01, fmt.overflow, np.nextafter(np.float32(fmt.overflow), np.inf), 1e30]
    values = [grid, mids, np.nextafter(mids, np.inf), np.nextafter(mids, -np.inf), randoms]
    values = np.concatenate([*values, past, -randoms, np.negative(past)])
    return values.astype(np.float32)


def _dense_model(k=32, units=16, tokens=5):
    inputs = keras.Input((tokens, k))
    layer = keras.layers.Dense(units, name="dense")
    return keras.Model(inputs, layer(inputs)), layer


def _train_step(model, recipe, jit_compile=False):
    """(x, finite) -> gradients of x and of the model's weights; commits `finite`."""

    def step(x, finite):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = model(x, training=True)
            loss = 0.5 * tf.reduce_sum(tf.cast(y, tf.float32) ** 2)  # dy = y: every dot is live
        grads = tape.gradient(loss, [x, *model.trainable_variables])
        recipe.commit(finite)
        return grads

    return tf.function(step, jit_compile=jit_compile)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "xla"])
@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=lambda f: f.name)
def test_quantize_matches_ml_dtypes_bit_for_bit(fmt, jit):
    x = _probe(fmt)
    quantize = tf.function(lambda x, s: float8.quantize(x, s, fmt), jit_compile=jit)
    for scale in (1.0, 2.0**-7, 3.7):
        scaled = np.clip(x * np.float32(scale), -fmt.max, fmt.max)
        expected = scaled.astype(NUMPY_FORMATS[fmt.name]).view(np.uint8)
        got = quantize(tf.constant(x), tf.constant(scale)).numpy().view(np.uint8)
        mismatches = np.flatnonzero(got != expected)
        assert mismatches.size == 0, (scale, x[mismatches[:5]])


def test_bfloat16_inputs_quantize_as_their_float32_values():
    x = tf.constant(_probe(E4M3), tf.bfloat16)
    expected = _np_qdq(x.numpy().astype(np.float32), 3.7, E4M3)
    got = float8.quantize_dequantize(x, 3.7, E4M3, dtype=tf.float32)
    np.testing.assert_array_equal(got.numpy(), expected)


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=lambda f: f.name)
def test_out_of_range_and_inf_saturate_at_the_max_and_nan_stays_nan(fmt):
    x = tf.constant([fmt.max * 2.4, -np.inf, np.inf, np.nan, 1.0])
    # The trap the clip guards: TensorFlow's own cast makes x[0] / 2 nan (E4M3) or inf.
    assert not np.isfinite(tf.cast(tf.cast(x[0] / 2, fmt.dtype), tf.float32).numpy())
    got = float8.quantize_dequantize(x, tf.constant(0.5), fmt).numpy()
    np.testing.assert_array_equal(got[[0, 1, 2, 4]], [2 * fmt.max, -2 * fmt.max, 2 * fmt.max, 1.0])
    assert np.isnan(got[3])


def test_quantize_dequantize_returns_the_input_dtype_unless_asked():
    x = tf.constant([1.0, 3.0], tf.bfloat16)
    assert float8.quantize_dequantize(x, 1.0, E4M3).dtype == tf.bfloat16
    assert float8.quantize_dequantize(x, 1.0, E4M3, dtype=tf.float32).dtype == tf.float32


def test_scale_is_max_over_amax_with_margin_and_falls_back_on_zero_or_nonfinite_amax():
    amax = tf.constant([2.0, 0.0, np.inf, np.nan, 1e-38])
    got = float8.scale_from_amax(amax, 448.0, margin=1, fallback=5.0).numpy()
    np.testing.assert_array_equal(got[:4], [112.0, 5.0, 5.0, 5.0])
    assert np.isfinite(got[4])  # a tiny amax must not give an inf scale (0 * inf = nan)


def test_power_of_two_scales_round_down_and_make_the_dequantize_exact():
    rng = np.random.default_rng(1)
    x = tf.constant(rng.normal(size=1000) * 3, tf.float32)
    amax = tf.reduce_max(tf.abs(x))
    plain = float8.scale_from_amax(amax, 448.0)
    rounded = float8.scale_from_amax(amax, 448.0, power_of_two=True)
    assert rounded <= plain < 2 * rounded
    assert np.log2(rounded.numpy()) == np.round(np.log2(rounded.numpy()))

    def back_on_the_grid(scale):  # dequantized * scale: exactly the float8 values?
        values = float8.quantize_dequantize(x, scale, E4M3).numpy() * scale.numpy()
        return np.array_equal(values, values.astype(ml_dtypes.float8_e4m3fn).astype(np.float32))

    assert back_on_the_grid(rounded)
    assert not back_on_the_grid(plain)


@pytest.mark.parametrize("name", ["current", "delayed"])
def test_per_tensor_gradients_come_from_quantized_operands_dy_in_e5m2(name):
    rng = np.random.default_rng(2)
    x = rng.normal(size=[2, 5, 32]).astype(np.float32) * 4
    w = rng.normal(size=[32, 16]).astype(np.float32) * 0.1
    dy = rng.normal(size=[2, 5, 16]).astype(np.float32) * 1e-3
    recipe = float8.create_recipe(name, amax_history=4)
    recipe.build(["dense"])
    if name == "delayed":
        scales = np.array([8.0, 1000.0, 2.0**20], np.float32)
        recipe.state.scale.assign(scales[None])
    else:
        amaxes = [np.abs(t).max() for t in (x, w, dy)]
        scales = [fmt.max / a for fmt, a in zip(recipe.formats, amaxes, strict=True)]
    x_, w_ = tf.constant(x), tf.constant(w)
    with tf.GradientTape() as tape:
        tape.watch([x_, w_])
        y = recipe.matmul(x_, w_, 0)
        loss = tf.reduce_sum(y * dy)
    dx, dw = tape.gradient(loss, [x_, w_])
    qx, qw = _np_qdq(x.reshape(10, 32), scales[0], E4M3), _np_qdq(w, scales[1], E4M3)
    qdy = _np_qdq(dy.reshape(10, 16), scales[2], E5M2)
    _assert_product(y.numpy().reshape(10, 16), qx, qw)
    _assert_product(dx.numpy().reshape(10, 32), qdy, qw.T)
    _assert_product(dw.numpy(), qx.T, qdy)


def test_block_scales_tiles_along_each_contraction_axis_and_pads_the_last_tile():
    # 140 rows, 200 features, 136 units: no dimension is a multiple of 128.
    rng = np.random.default_rng(3)
    x = rng.normal(size=[140, 200]).astype(np.float32) * np.geomspace(0.01, 100, 200)
    x = x.astype(np.float32)
    w = rng.normal(size=[200, 136]).astype(np.float32) * np.geomspace(0.01, 1, 136)
    w = w.astype(np.float32)
    dy = rng.normal(size=[140, 136]).astype(np.float32) * 1e-4
    recipe = float8.BlockScaling()
    recipe.build(["dense"])
    x_, w_ = tf.constant(x), tf.constant(w)
    with tf.GradientTape() as tape:
        tape.watch([x_, w_])
        loss = tf.reduce_sum(recipe.matmul(x_, w_, 0) * dy)
    dx, dw = tape.gradient(loss, [x_, w_])
    qw = _np_tiles(w, 128, 128)
    _assert_product(recipe.matmul(x_, w_, 0, training=False).numpy(), _np_tiles(x, 1, 128), qw)
    _assert_product(dx.numpy(), _np_tiles(dy, 1, 128), qw.T)
    _assert_product(dw.numpy(), _np_tiles(x, 128, 1).T, _np_tiles(dy, 128, 1))


def test_quantize_model_swaps_the_transformer_dense_layers_only():
    keras.utils.set_random_seed(0)  # unseeded, one initialisation in ~6 moved a logit by 0.11
    model = create_model("vit_test", 3, 16, "mixed_bfloat16")
    images = tf.random.stateless_uniform([2, 16, 16, 3], [0, 0], minval=-1, maxval=1)
    plain = model(images).numpy()
    weights = [v.path for v in model.variables]
    recipe = float8.CurrentScaling()
    assert float8.quantize_model(model, recipe) == 8  # 2 blocks: qkv, out, mlp1, mlp2
    assert sorted(recipe.layer_names) == sorted(
        f"block{i}_{name}" for i in range(2) for name in ("attn/qkv", "attn/out", "mlp1", "mlp2")
    )
    quantized = model(images).numpy()
    assert quantized.dtype == np.float32 and np.isfinite(quantized).all()
    assert not np.array_equal(quantized, plain)  # the matmuls changed ...
    # ... by float8's rounding: a few percent of the largest logit
    np.testing.assert_allclose(quantized, plain, atol=0.1 * np.abs(plain).max())
    assert [v.path for v in model.variables] == weights
    assert float8.quantize_model(create_model("tiny", 3, 16, "mixed_bfloat16"), recipe) == 0


def test_no_float8_leaves_the_model_alone_and_records_nothing():
    model, _ = _dense_model()
    x = tf.random.stateless_normal([2, 5, 32], [0, 1])
    before = model(x).numpy()
    recipe = float8.create_recipe("none")
    assert float8.quantize_model(model, recipe) == 0
    np.testing.assert_array_equal(model(x).numpy(), before)
    recipe.commit(tf.constant(False))
    assert recipe.read_and_reset() == {} and recipe.read_per_layer() == {}
    assert recipe.state.variables == ()


def test_create_recipe_names_the_choices():
    assert isinstance(float8.create_recipe("delayed", amax_history=16), float8.DelayedScaling)
    assert float8.create_recipe("delayed", amax_history=16).amax_history == 16
    with pytest.raises(ValueError, match="unknown float8 recipe 'mxfp8'; choose one of none, "):
        float8.create_recipe("mxfp8")


def test_float8_state_stays_outside_the_model_and_its_gradients(tmp_path):
    model = create_model("vit_test", 3, 16, "mixed_bfloat16")
    counts = len(model.trainable_variables), len(model.non_trainable_variables)
    recipe = float8.DelayedScaling(amax_history=4)
    float8.quantize_model(model, recipe)
    images = tf.random.stateless_uniform([2, 16, 16, 3], [0, 0])
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(model(images, training=True) ** 2)
    grads = tape.gradient(loss, model.trainable_variables)
    recipe.commit(tf.constant(True))
    assert (len(model.trainable_variables), len(model.non_trainable_variables)) == counts
    assert all(g is not None and g.dtype == tf.float32 for g in grads)
    float8_vars = [*recipe.state.variables, recipe.pending, *recipe.statistics.variables]
    watched = {v.ref() for v in tape.watched_variables()}
    assert not any(v.ref() in watched for v in float8_vars)
    assert not any(v.trainable for v in float8_vars)
    saved = tf.train.Checkpoint(model=model).write(str(tmp_path / "model"))
    names = " ".join(name for name, _ in tf.train.list_variables(saved))
    assert "amax" not in names and "float8" not in names
    assert float(tf.reduce_max(recipe.state.amax_history)) > 0  # the state did move


def test_checkpoint_round_trip_restores_the_delayed_state_bit_for_bit(tmp_path):
    model, _ = _dense_model()
    recipe = float8.DelayedScaling(amax_history=4)
    float8.quantize_model(model, recipe)
    step = _train_step(model, recipe)
    for i in range(3):
        step(tf.random.stateless_normal([2, 5, 32], [i, 0]) * (i + 1), tf.constant(True))
    saved_values = [v.numpy() for v in recipe.state.variables]
    assert any((v != 1.0).any() for v in saved_values if v.ndim == 2)  # scales moved
    path = tf.train.Checkpoint(float8=recipe.state).write(str(tmp_path / "float8"))
    stored = sorted(name for name, _ in tf.train.list_variables(path) if "float8/" in name)
    assert stored == [f"float8/{v}/.ATTRIBUTES/VARIABLE_VALUE" for v in ("amax_history", "scale")]
    step(tf.random.stateless_normal([2, 5, 32], [9, 0]) * 50, tf.constant(True))
    fresh = float8.DelayedScaling(amax_history=4)
    float8.quantize_model(_dense_model()[0], fresh)
    tf.train.Checkpoint(float8=fresh.state).read(path).assert_consumed()
    for saved, restored in zip(saved_values, fresh.state.variables, strict=True):
        np.testing.assert_array_equal(restored.numpy(), saved)


def test_a_skipped_step_leaves_history_and_scales_as_after_the_applied_one_under_xla():
    model, _ = _dense_model()
    recipe = float8.DelayedScaling(amax_history=4)
    float8.quantize_model(model, recipe)
    step = _train_step(model, recipe, jit_compile=True)
    x = tf.random.stateless_normal([2, 5, 32], [0, 0])
    step(x, tf.constant(True))
    step(x, tf.constant(True))
    after_applied = [v.numpy() for v in recipe.state.variables]
    step(x * 1000.0, tf.constant(False))
    assert recipe.pending.numpy()[0, 0] == pytest.approx(1000 * after_applied[0][0, 0, 0])
    for var, kept in zip(recipe.state.variables, after_applied, strict=True):
        np.testing.assert_array_equal(var.numpy(), kept)
    step(x * 1000.0, tf.constant(True))  # the same step applied: recorded
    assert recipe.state.amax_history.numpy()[0, 0, 0] == recipe.pending.numpy()[0, 0]


def test_history_keeps_the_last_n_amaxes_and_the_scale_follows_the_history_before_the_step():
    model, _ = _dense_model()
    recipe = float8.DelayedScaling(amax_history=3)
    float8.quantize_model(model, recipe)
    step = _train_step(model, recipe)
    base = tf.one_hot([0] * 5, 32)[None]  # every row's amax is 1
    expected_scales = []
    for amax in (1.0, 2.0, 3.0, 4.0):
        history = recipe.state.amax_history.numpy()[0, 0]
        expected_scales.append(448.0 / history.max() if history.max() > 0 else 1.0)
        step(base * amax, tf.constant(True))
    # Keras' layout: roll left, write the newest at index 0.
    np.testing.assert_array_equal(recipe.state.amax_history.numpy()[0, 0], [4.0, 2.0, 3.0])
    assert recipe.state.scale.numpy()[0, 0] == np.float32(expected_scales[-1]) == 448 / 3


def test_matches_keras_float8_dense_under_delayed_scaling():
    """Same weights, inputs, history and scales: the same outputs, dx, dW, history, scales.

    Bit for bit over three steps, with two differences of Keras': in a float32
    layer it rounds its bias (and so the bias gradient) to bfloat16, and it
    stores 1 / scale. (It divides by 1 / s where we multiply by s: a value within
    a float32 ulp of a float8 rounding midpoint could round apart; none does here.)
    """
    rng = np.random.default_rng(4)
    k, n, length = 48, 24, 1024  # Keras' history length
    kernel = rng.normal(size=[k, n]).astype(np.float32) * 0.2
    bias = rng.normal(size=[n]).astype(ml_dtypes.bfloat16).astype(np.float32)
    ref = keras.layers.Dense(n, name="dense")
    ref.build((None, 8, k))
    ref.kernel.assign(kernel)
    ref.bias.assign(bias)
    ref.quantize("float8")
    model, layer = _dense_model(k, n, tokens=8)
    layer.kernel.assign(kernel)
    layer.bias.assign(bias)
    recipe = float8.DelayedScaling(amax_history=length)
    float8.quantize_model(model, recipe)
    kinds = ("inputs", "kernel", "outputs_grad")
    history = np.abs(rng.normal(size=[3, length])) * np.float32([[3], [0.5], [1e-2]])
    for kind, h, s in zip(kinds, history, [2.0**-5, 2.0**-9, 2.0**-20], strict=True):
        getattr(ref, f"{kind}_amax_history").assign(h)
        getattr(ref, f"{kind}_scale").assign(s)
    recipe.state.amax_history.assign(history[None].astype(np.float32))
    recipe.state.scale.assign([[2.0**5, 2.0**9, 2.0**20]])
    outputs_grad = tf.constant(rng.normal(size=[2, 8, n]) * 1e-2, tf.float32)

    @tf.function
    def keras_step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = ref(x, training=True)
            loss = tf.reduce_sum(y * outputs_grad)
        grads = tape.gradient(loss, [x, *ref.trainable_variables])
        new_state = dict(zip([v.name for v in ref.trainable_variables], grads[1:], strict=True))
        return y, grads[0], new_state

    @tf.function
    def our_step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = model(x, training=True)
            loss = tf.reduce_sum(y * outputs_grad)
        grads = tape.gradient(loss, [x, layer.kernel, layer.bias])
        recipe.commit(tf.constant(True))
        return y, grads

    for i in range(3):
        x = tf.constant(rng.normal(size=[2, 8, k]) * (i + 2), tf.float32)
        y, dx, new = keras_step(x)
        y_ours, (dx_ours, dw_ours, db_ours) = our_step(x)
        np.testing.assert_array_equal(y_ours.numpy(), y.numpy())
        np.testing.assert_array_equal(dx_ours.numpy(), dx.numpy())
        np.testing.assert_array_equal(dw_ours.numpy(), new["kernel"].numpy())
        rounded = db_ours.numpy().astype(ml_dtypes.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(rounded, new["bias"].numpy())
        np.testing.assert_array_equal(
            recipe.state.amax_history.numpy()[0],
            np.stack([new[f"{kind}_amax_history"].numpy() for kind in kinds]),
        )
        keras_scales = np.array([new[f"{kind}_scale"].numpy() for kind in kinds])
        np.testing.assert_array_equal(np.float32(1) / recipe.state.scale.numpy()[0], keras_scales)
        for var in ref.trainable_variables[2:]:  # Keras' optimizer would overwrite them so
            var.assign(new[var.name])


def test_an_injected_huge_activation_is_clipped_and_counted_never_nan():
    model, _ = _dense_model()
    recipe = float8.DelayedScaling(amax_history=4)
    float8.quantize_model(model, recipe)
    recipe.state.amax_history.assign(tf.ones([1, 3, 4]))
    recipe.state.scale.assign([[448.0, 448.0, 57344.0]])
    x = np.full([2, 5, 32], 0.5, np.float32)
    x[0, 0, :2] = [1e6, np.inf]
    dx, dw, db = _train_step(model, recipe)(tf.constant(x), tf.constant(True))
    assert all(np.isfinite(g.numpy()).all() for g in (dx, dw, db))
    assert np.isfinite(model(tf.constant(x)).numpy()).all()
    stats = recipe.read_and_reset()
    assert stats["float8/inputs_clipped_fraction"] == pytest.approx(2 / x.size)
    assert stats["float8/inputs_amax"] == np.inf
    # The inf amax is not recorded: the inputs' history and scale stay; the others roll.
    np.testing.assert_array_equal(recipe.state.amax_history.numpy()[0, 0], [1, 1, 1, 1])
    assert recipe.state.scale.numpy()[0, 0] == 448.0
    assert recipe.state.amax_history.numpy()[0, 1, 0] != 1.0


def test_statistics_count_clipped_and_underflowed_values_per_layer_then_reset():
    model, _ = _dense_model(k=4, tokens=2)
    recipe = float8.DelayedScaling(amax_history=4)  # scales 1 until the history fills
    float8.quantize_model(model, recipe)
    # Past 448: clipped; below half E4M3's smallest subnormal (2**-10): zero; 0 is not counted.
    x = tf.constant([[[1000.0, 1e-5, 0.0, 1.0]] * 2])
    _train_step(model, recipe)(x, tf.constant(True))
    per_layer = recipe.read_per_layer()
    assert per_layer["float8/inputs_amax"].tolist() == [1000.0]
    assert per_layer["float8/inputs_clipped_fraction"].tolist() == [0.25]
    stats = recipe.read_and_reset()
    assert stats["float8/inputs_scale"] == 1.0
    assert stats["float8/inputs_clipped_fraction"] == 0.25
    assert stats["float8/inputs_underflow_fraction"] == pytest.approx(1 / 3)
    assert set(stats) == set(float8.DESCRIPTIONS)
    assert recipe.read_and_reset() == {}  # nothing since the last read


def test_unscaled_casts_as_is_and_small_gradients_vanish_where_a_scale_keeps_them():
    # The ablation: output gradients of 1e-6 are below E5M2's smallest subnormal (2**-16).
    x = tf.ones([1, 2, 4])
    found = {}
    for name in ("unscaled", "current"):
        model, layer = _dense_model(k=4, units=2, tokens=2)
        layer.kernel.assign(tf.fill([4, 2], 0.5))
        recipe = float8.create_recipe(name)
        float8.quantize_model(model, recipe)
        with tf.GradientTape() as tape:
            loss = 1e-6 * tf.reduce_sum(model(x, training=True))  # dy = 1e-6
        found[name] = (tape.gradient(loss, layer.kernel), recipe.read_and_reset())
    kernel_grad, stats = found["unscaled"]
    assert stats["float8/inputs_scale"] == stats["float8/gradients_scale"] == 1.0
    assert stats["float8/gradients_underflow_fraction"] == 1.0
    assert not np.any(kernel_grad.numpy())  # no update at all
    kernel_grad, stats = found["current"]
    assert stats["float8/gradients_scale"] == pytest.approx(57344 / 1e-6)
    assert stats["float8/gradients_underflow_fraction"] == 0.0
    np.testing.assert_allclose(kernel_grad.numpy(), np.full([4, 2], 2e-6), rtol=1e-6)


def test_evaluation_quantizes_the_same_but_records_nothing():
    model, _ = _dense_model()
    recipe = float8.DelayedScaling(amax_history=4)
    float8.quantize_model(model, recipe)
    recipe.state.scale.assign([[2.0, 4.0, 8.0]])
    x = tf.random.stateless_normal([2, 5, 32], [0, 0])
    evaluated = model(x, training=False)
    assert recipe.read_and_reset() == {}
    assert not recipe.pending.numpy().any()
    np.testing.assert_array_equal(model(x, training=True).numpy(), evaluated.numpy())
    assert recipe.pending.numpy()[0, 0] == pytest.approx(np.abs(x.numpy()).max())


def test_every_tag_is_described_and_in_exactly_one_float8_chart():
    from tensorboard.plugins.custom_scalar import layout_pb2

    category, charts = float8.LAYOUT
    assert category == "Float8"
    for tag, description in float8.DESCRIPTIONS.items():
        assert re.fullmatch(r"float8/(inputs|kernels|gradients)_\w+", tag)
        assert description.endswith(".")
        assert sum(any(re.search(r, tag) for r in regexes) for _, regexes in charts) == 1
    assert len(float8.DESCRIPTIONS) == 12
    layout_pb2.Category(
        title=category,
        chart=[
            layout_pb2.Chart(title=t, multiline=layout_pb2.MultilineChartContent(tag=r))
            for t, r in charts
        ],
    )


def _float8_types_of_dot_operands(hlo):
    """[(types of operand 0, of operand 1)] for each dot: the float8 types converted to
    in the fusion producing each operand (through layout-only ops)."""
    computations, name = {}, None
    for line in hlo.splitlines():
        header = re.match(r"(?:ENTRY )?%(\S+) \(", line)
        if header:
            name = header.group(1)
            computations[name] = {}
        elif name and (m := re.match(r"\s+(?:ROOT )?%(\S+) = (.*)", line)):
            computations[name][m.group(1)] = m.group(2)

    def converted(comp):
        found = set()
        for text in computations[comp].values():
            found |= set(re.findall(r"^(f8e4m3fn|f8e5m2)\[\S* convert\(", text))
            found |= {t for c in re.findall(r"calls=%([\w.\-]+)", text) for t in converted(c)}
        return found

    def producer_types(comp, operand):
        text = computations[comp][operand]
        op = re.match(r"\S+ ([\w-]+)\(", text).group(1)
        if op in ("bitcast", "copy", "transpose", "reshape"):
            return producer_types(comp, re.search(r"\(%([\w.\-]+)", text).group(1))
        called = re.findall(r"calls=%([\w.\-]+)", text)
        return frozenset(t for c in called for t in converted(c))

    dots = []
    for comp, instructions in computations.items():
        for text in instructions.values():
            if re.match(r"\S+ dot\(", text):
                operands = re.findall(r"%([\w.\-]+)", text.split("dot(", 1)[1].split(")")[0])
                dots.append(tuple(producer_types(comp, o) for o in operands))
    return dots


@pytest.mark.parametrize("name", RECIPES)
def test_compiled_step_converts_to_float8_in_front_of_every_dot(name):
    model, _ = _dense_model()
    recipe = float8.create_recipe(name, amax_history=4)
    float8.quantize_model(model, recipe)
    step = _train_step(model, recipe, jit_compile=True)
    x, finite = tf.random.stateless_normal([2, 5, 32], [0, 0]), tf.constant(True)
    hlo = step.experimental_get_compiler_ir(x, finite)(stage="optimized_hlo")
    dots = _float8_types_of_dot_operands(hlo)
    assert len(dots) == 3  # y, dx, dW
    e4m3, e5m2 = frozenset(["f8e4m3fn"]), frozenset(["f8e5m2"])
    backward = [{e4m3, e5m2}] * 2 if name != "block" else [{e4m3}] * 2
    assert sorted(set(d) for d in dots) == sorted([{e4m3}, *backward])
    compiled, eager = step(x, finite), _train_step(model, recipe)(x, finite)
    for a, b in zip(compiled, eager, strict=True):
        # The same quantized operands; XLA's dots may sum in another order.
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5 * np.abs(b.numpy()).max())


@MIRRORED
@pytest.mark.parametrize("context", ["cross", "scope", "replica"])
def test_replicas_agree_on_the_delayed_scales_wherever_they_are_committed(context):
    assert mirrored_check("float8_agreement", context) == {
        "replicas": 2,
        "quantized": 2,
        "pending_differ": True,  # the replicas did see different magnitudes
        "histories_identical": True,
        "scales_identical": True,
        "history_is_max": True,
        "scales_moved": True,
        "statistics_amax_is_max": True,
        "statistics_reset": True,
    }


@MIRRORED
def test_replicas_agree_on_the_delayed_scales_in_the_engines_step():
    assert mirrored_check("float8_agreement", "engine") == {
        "steps": 2,
        "histories_identical": True,
        "scales_identical": True,
        "two_amaxes_each": True,  # both steps committed, in cross-replica context
        "scales_moved": True,
    }


# --- in the engine: --precision=mixed_fp8 ---------------------------------------


def _fp8_config(**overrides):
    """A few float8 steps of the test ViT, delayed scaling, a constant rate: any budget
    trains the same first steps, so a shorter run is a stopped one."""
    base = dict(model="vit_test", precision="mixed_fp8", fp8_recipe="delayed")
    base |= dict(fp8_amax_history=4, lr_schedule="constant", deterministic=True)
    return tiny_config(**base, **overrides)


def _saved(model_dir):
    """Every tensor of the newest checkpoint by name, but the iterator's, the count of saves
    and the object graph (which names the optimizer as this process numbered it)."""
    reader = tf.train.load_checkpoint(os.path.join(model_dir, "checkpoints"))
    names = reader.get_variable_to_shape_map()
    skip = ("iterator", "save_counter", "_CHECKPOINTABLE_OBJECT_GRAPH")
    return {n: reader.get_tensor(n) for n in names if not n.startswith(skip)}


@pytest.fixture(scope="module")
def delayed_runs(tmp_path_factory):
    """(folder, result) of 6 steps uninterrupted (exported to `export` beside it), and of 3
    steps resumed to 6."""
    from engine import train

    root = tmp_path_factory.mktemp("fp8")
    config = _fp8_config(train_steps=6, export_dir=str(root / "export"))
    whole = train.train_and_evaluate(config, str(root / "whole"))
    train.train_and_evaluate(_fp8_config(train_steps=3), str(root / "resumed"))
    resumed = train.train_and_evaluate(_fp8_config(train_steps=6), str(root / "resumed"))
    return (root / "whole", whole), (root / "resumed", resumed)


def test_a_stopped_and_resumed_delayed_run_matches_the_uninterrupted_one_bit_for_bit(
    delayed_runs,
):
    (whole_dir, whole), (resumed_dir, resumed) = delayed_runs
    assert (resumed.steps, resumed.trained_steps, whole.trained_steps) == (6, 3, 6)
    expected, actual = _saved(whole_dir), _saved(resumed_dir)
    history = expected["float8/amax_history/.ATTRIBUTES/VARIABLE_VALUE"]
    assert history.shape == (8, 3, 4) and (history > 0).all()  # 8 layers x 3 kinds, 4 steps
    assert (expected["float8/scale/.ATTRIBUTES/VARIABLE_VALUE"] != 1.0).all()  # scales moved
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(actual[name], value, err_msg=name)
    assert resumed.weights_digest == whole.weights_digest


def test_a_float8_run_writes_every_statistic_described_in_its_float8_group(delayed_runs):
    from conftest import read_scalars, tf_make_ndarray
    from tensorboard.backend.event_processing import plugin_event_accumulator
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    (whole_dir, _), _ = delayed_runs
    scalars = read_scalars(whole_dir)
    assert "data/skipped_images" not in scalars  # none skipped: not written
    tags = {tag for tag in scalars if tag.startswith("float8/")}
    assert tags == set(float8.DESCRIPTIONS)
    for kind in float8.KINDS:
        steps, amaxes = zip(*scalars[f"float8/{kind}_amax"], strict=True)
        assert steps[-1] == 6 and all(a > 0 for a in amaxes)  # written at every summary
        assert all(0 <= f <= 1 for _, f in scalars[f"float8/{kind}_underflow_fraction"])
    acc = plugin_event_accumulator.EventAccumulator(str(whole_dir), size_guidance={"tensors": 0})
    acc.Reload()
    for tag in tags:
        assert acc.SummaryMetadata(tag).summary_description == float8.DESCRIPTIONS[tag]
    # Per layer: a histogram of the 8 layers' values at every summary, described.
    for tag, description in float8.BY_LAYER_DESCRIPTIONS.items():
        events = acc.Tensors(tag)
        assert [e.step for e in events] == [s for s, _ in scalars[tag.removesuffix("_by_layer")]]
        buckets = tf_make_ndarray(events[-1].tensor_proto)  # [left, right, count] rows
        assert buckets[:, 2].sum() == 8
        assert acc.SummaryMetadata(tag).summary_description == description
    (event,) = acc.Tensors(metadata.CONFIG_SUMMARY_TAG)
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    assert [c.title for c in layout.category] == ["Mixed precision", "Training", "Float8"]


def test_the_engines_compiled_vit_step_converts_to_float8_in_front_of_every_quantized_dot():
    from engine.loss_scale import NoOpLossScale
    from engine.step import TrainStep

    model = create_model("vit_test", 3, 16, "mixed_bfloat16", fused_batch_norm=False)
    recipe = float8.create_recipe("current")
    assert float8.quantize_model(model, recipe) == 8  # 2 blocks: qkv, out, mlp1, mlp2
    optimizer = keras.optimizers.Adam()
    optimizer.build(model.trainable_variables)
    step = TrainStep(model, optimizer, NoOpLossScale(), 4, float8=recipe)
    compiled = tf.function(step, jit_compile=True, autograph=False)
    images = tf.random.stateless_uniform([4, 16, 16, 3], [0, 0], minval=-1, maxval=1)
    labels = tf.constant([0, 1, 2, 0])
    hlo = compiled.experimental_get_compiler_ir(images, labels)(stage="optimized_hlo")
    operand_types = collections.Counter(
        tuple(sorted("+".join(sorted(types)) for types in dot))
        for dot in _float8_types_of_dot_operands(hlo)
        if any(dot)
    )
    # Per quantized layer: y from two E4M3 operands, dx and dW each from E5M2 dy and E4M3;
    # the attention products and the head have no float8 operand.
    assert operand_types == {("f8e4m3fn", "f8e4m3fn"): 8, ("f8e4m3fn", "f8e5m2"): 16}
    assert np.isfinite(compiled(images, labels)["grad_norm"].numpy())


def test_the_export_of_a_delayed_run_serves_its_float8_matmuls_with_the_saved_scales(
    delayed_runs,
):
    (whole_dir, _), _ = delayed_runs
    served = tf.saved_model.load(str(whole_dir.parent / "export"))
    saved_scale = _saved(whole_dir)["float8/scale/.ATTRIBUTES/VARIABLE_VALUE"]
    np.testing.assert_array_equal(served.float8_state.scale.numpy(), saved_scale)
    images = tf.random.stateless_uniform([2, 16, 16, 3], [0, 2])
    probabilities = served.signatures["serving_default"](images=images)["probabilities"]
    np.testing.assert_allclose(probabilities.numpy().sum(-1), 1.0, rtol=1e-5)
