"""engine.keras_fit: `model.fit` with the engine's loss scale, step and skip rule."""

import contextlib
import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import ROOT, read_scalars

from engine import loop
from engine.extras import create_train_step
from engine.keras_fit import LossScaledModel, compile_for_fit
from engine.loss_scale import DynamicLossScale, NoOpLossScale

# Its module fixture runs once: under pytest-xdist, its tests share one worker.
pytestmark = pytest.mark.xdist_group("keras_fit")

BATCH = 8
SCALE = {"initial_scale": 2.0**10, "growth_interval": 4}
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


class _Process:
    """A subprocess started now and read when a test needs it: they overlap this file's tests."""

    def __init__(self, args, **kwargs):
        self.proc = subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **kwargs,
        )
        self.output = None

    def result(self):
        if self.output is None:
            self.output = self.proc.communicate(timeout=600)
        assert self.proc.returncode == 0, self.output[1][-3000:]
        return self.output[0]


def _readme_example():
    with open(os.path.join(ROOT, "README.md")) as f:
        section = f.read().split("## Train with Keras `fit`", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module", autouse=True)
def background(tmp_path_factory):
    """The README example and the two-replica checks, each in a fresh process."""
    dump = tmp_path_factory.mktemp("xla_dump")
    env = dict(os.environ, XLA_FLAGS=f"--xla_dump_to={dump}")
    check = (
        "\nassert len(history.history['loss']) == 2\n"
        "assert history.history['loss_scale'] == [2.0**15] * 2\n"
        "assert history.history['skipped_steps'] == [0.0, 0.0]\n"
        "assert int(model.optimizer.iterations.numpy()) == 8\n"
        "print('EXAMPLE OK')\n"
    )
    processes = {
        "readme": _Process(["-c", _readme_example() + check]),
        "mirrored": _Process([os.path.join(ROOT, "tests", "fit_mirrored_checks.py")], env=env),
    }
    yield processes
    for process in processes.values():
        process.proc.kill()


@contextlib.contextmanager
def _dtype_policy(name):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _layers(policy="mixed_float16", seed=0):
    """A tiny convolutional model's (inputs, outputs), BatchNorm included."""
    keras.utils.set_random_seed(seed)
    with _dtype_policy(policy):
        inputs = keras.Input((8, 8, 3))
        x = keras.layers.Conv2D(4, 3)(inputs)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(x))
        return inputs, keras.layers.Dense(3, dtype="float32")(x)


def _fit_model(policy="mixed_float16", **compile_kwargs):
    inputs, outputs = _layers(policy)
    with _dtype_policy(policy):
        model = LossScaledModel(inputs, outputs)
    model.compile(keras.optimizers.Adam(0.01), LOSS, loss_scale=SCALE, **compile_kwargs)
    return model


def _data(steps, bad_steps=()):
    """`steps` batches of BATCH; the images of each step in `bad_steps` (0-based) are nan."""
    images = tf.random.stateless_uniform([steps, BATCH, 8, 8, 3], [1, 2]).numpy()
    images[list(bad_steps)] = np.nan
    labels = tf.random.stateless_uniform([steps * BATCH], [3, 4], maxval=3, dtype=tf.int32)
    return tf.data.Dataset.from_tensor_slices((images.reshape(-1, 8, 8, 3), labels)).batch(BATCH)


def _values(variables):
    return [np.array(v.numpy()) for v in variables]


def _state(model):
    """Everything a skipped step must leave bit-identical, and the scaling state."""
    return {
        "weights": _values(model.weights),  # BatchNorm moving statistics included
        "optimizer": _values(model.optimizer.variables),  # slots and iterations
        "scale": float(model.loss_scale.value.numpy()),
        "good_steps": int(model.loss_scale.good_steps.numpy()),
        "skipped": int(model.skipped_steps.numpy()),
    }


def _equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_twenty_fit_steps_match_the_engine_loop_bit_for_bit():
    # The nan comes in the data, a batch of nan images at step 8, so both runners
    # see it the same way: in the forward pass, the BatchNorm statistics and the
    # gradients. float16 compute without XLA; Keras' optimizer.apply in both.
    data = _data(20, bad_steps=[7])
    engine_model = keras.Model(*_layers())
    optimizer = keras.optimizers.Adam(0.01)
    optimizer.build(engine_model.trainable_variables)
    scale = DynamicLossScale(**SCALE)
    state = loop.TrainState(engine_model, optimizer, scale)
    step = create_train_step(engine_model, optimizer, scale, BATCH, fused_optimizer=False)
    strategy = tf.distribute.get_strategy()
    train_loop = loop.create_train_loop(strategy, step, state, loop.LoopStats(), False)
    train_loop(iter(data), tf.constant(20))

    model = _fit_model()
    history = model.fit(data, shuffle=False, verbose=0)
    fit_state = _state(model)
    assert fit_state["skipped"] == int(state.skipped_steps.numpy()) == 1
    assert history.history["skipped_steps"] == [1.0]
    # 2^10, x2 after steps 4, halved at 8, x2 after 12, 16 and 20.
    assert fit_state["scale"] == float(scale.value.numpy()) == 2.0**13
    assert fit_state["good_steps"] == int(scale.good_steps.numpy()) == 0
    assert _equal(fit_state["weights"], _values(engine_model.weights))
    assert _equal(fit_state["optimizer"], _values(optimizer.variables))
    assert int(model.optimizer.iterations.numpy()) == 19


def test_in_float32_fit_steps_equal_keras_own_train_step():
    # The loss is compile's plus model.losses (a regulariser here), the metrics
    # are compile's, and a finite step is Keras' own update: same weights, same logs.
    def build(model_class):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((4,))
        dense = keras.layers.Dense(3, kernel_regularizer=keras.regularizers.L2(0.1))
        model = model_class(inputs, dense(inputs))
        model.compile(keras.optimizers.Adam(0.01), LOSS, metrics=["accuracy"])
        return model

    x = np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)
    y = np.arange(32) % 3
    ours, theirs = build(LossScaledModel), build(keras.Model)
    logs = ours.fit(x, y, batch_size=8, shuffle=False, verbose=0).history
    keras_logs = theirs.fit(x, y, batch_size=8, shuffle=False, verbose=0).history
    assert _equal(_values(ours.weights), _values(theirs.weights))
    assert logs.pop("loss_scale") == [1.0] and logs.pop("skipped_steps") == [0.0]
    assert logs == keras_logs


@pytest.mark.parametrize("jit_compile", [False, True])
def test_a_skipped_step_leaves_weights_slots_iterations_and_statistics(jit_compile):
    model = _fit_model(jit_compile=jit_compile)
    assert model.jit_compile == jit_compile  # Keras falls back without XLA under determinism
    model.fit(_data(2), shuffle=False, verbose=0)  # slots and statistics not at their start
    before = _state(model)
    model.fit(_data(1, bad_steps=[0]), shuffle=False, verbose=0)
    after = _state(model)
    assert _equal(after["weights"], before["weights"])
    assert _equal(after["optimizer"], before["optimizer"])
    assert int(model.optimizer.iterations.numpy()) == 2
    assert after["scale"] == before["scale"] / 2 and after["skipped"] == 1
    assert np.isfinite(model.predict(_data(1), verbose=0)).all()


def test_logs_and_tensorboard_carry_the_loss_scale_and_skipped_steps(tmp_path):
    model = _fit_model()
    history = model.fit(
        _data(6, bad_steps=[1]).repeat(),
        steps_per_epoch=3,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[keras.callbacks.TensorBoard(tmp_path)],
    )
    # Epoch 1: steps 1-3, step 2 skipped. Epoch 2: steps 4-6, 4 finite in a row by step 6.
    assert history.history["skipped_steps"] == [1.0, 1.0]
    assert history.history["loss_scale"] == [2.0**9, 2.0**10]
    scalars = read_scalars(tmp_path / "train")
    assert scalars["epoch_loss_scale"] == [(0, 2.0**9), (1, 2.0**10)]
    assert scalars["epoch_skipped_steps"] == [(0, 1.0), (1, 1.0)]


def _trained_with_a_skip():
    model = _fit_model()
    model.fit(_data(4, bad_steps=[1]), shuffle=False, verbose=0)
    state = _state(model)
    assert (state["scale"], state["good_steps"], state["skipped"]) == (2.0**9, 2, 1)
    return model, state


def _round_trip(model, kind, path):
    if kind == "keras":
        model.save(path / "model.keras")
        return keras.models.load_model(path / "model.keras")
    restored = _fit_model()
    restored.optimizer.build(restored.trainable_variables)
    if kind == "weights.h5":
        model.save_weights(path / "model.weights.h5")
        restored.load_weights(path / "model.weights.h5")
    else:
        tf.train.Checkpoint(model=model).write(str(path / "ckpt"))
        tf.train.Checkpoint(model=restored).read(str(path / "ckpt")).assert_consumed()
    return restored


@pytest.mark.parametrize("kind", ["keras", "weights.h5", "checkpoint"])
def test_save_and_load_keep_the_scaling_state(tmp_path, kind):
    model, state = _trained_with_a_skip()
    restored = _round_trip(model, kind, tmp_path)
    assert isinstance(restored, LossScaledModel)
    restored_state = _state(restored)
    for key in ("scale", "good_steps", "skipped"):
        assert restored_state[key] == state[key], key
    assert _equal(restored_state["weights"], state["weights"])


def test_an_overflowing_norm_with_clipping_is_skipped():
    # Finite gradients whose squares overflow float32: clipping by their
    # infinite norm would write nan, so the step is skipped.
    inputs = keras.Input((2,))
    model = LossScaledModel(inputs, keras.layers.Dense(1)(inputs))
    model.compile(keras.optimizers.SGD(0.1, global_clipnorm=1.0), "mae")
    model.fit(np.full((1, 2), 1e20, np.float32), np.zeros((1, 1)), verbose=0)
    assert np.isfinite(model.get_weights()[0]).all() and int(model.skipped_steps.numpy()) == 1


def test_the_scale_follows_the_models_dtype_policy_and_compile_for_fit_shares_layers():
    base = keras.Model(*_layers("mixed_bfloat16"))
    fitted = compile_for_fit(base, keras.optimizers.SGD(0.1), LOSS)
    assert isinstance(fitted.loss_scale, NoOpLossScale)
    assert fitted.weights[0] is base.weights[0]
    mixed = compile_for_fit(keras.Model(*_layers()), "sgd", LOSS, loss_scale=SCALE)
    assert isinstance(mixed.loss_scale, DynamicLossScale) and mixed.loss_scale.growth_interval == 4


class _Subclassed(keras.Model):
    def call(self, x):
        return x


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: _fit_model().compile(
                keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD()), LOSS
            ),
            "pass the inner optimizer, not a LossScaleOptimizer",
        ),
        (
            lambda: _fit_model().compile(keras.optimizers.SGD(loss_scale_factor=8.0), LOSS),
            "unset the optimizer's loss_scale_factor",
        ),
        (lambda: _fit_model().compile("sgd", LOSS, loss_scale="auto"), "loss_scale='auto'"),
        (
            lambda: _fit_model().compile("sgd", LOSS, loss_scale={"initial": 8.0}),
            "a dict holds DynamicLossScale settings",
        ),
        (lambda: compile_for_fit(_Subclassed(), "sgd", LOSS), "inherit from"),
    ],
)
def test_a_mistake_is_one_line_naming_the_fix(make, message):
    with pytest.raises(ValueError, match=re.escape(message)) as raised:
        make()
    assert "\n" not in str(raised.value)


# Last: these wait for the processes started at the top, which ran meanwhile.


def test_the_readme_fit_example_trains_and_logs_the_scale(background):
    assert "EXAMPLE OK" in background["readme"].result()


@pytest.mark.parametrize("xla", [0, 1])
@pytest.mark.parametrize("bad", [0, 1])
def test_one_replica_nonfinite_every_replica_skips(background, xla, bad):
    result = json.loads(background["mirrored"].result().splitlines()[-1])[f"fit/xla{xla}/bad{bad}"]
    assert result["replicas"] == 2
    assert result["finite"] and result["unchanged"] and result["identical_across_replicas"]
    assert result["iterations"] == 1  # the clean step's; the bad one did not count
    assert result["scale"] == 2.0**14  # 2^15 halved once, not once per replica
    assert result["logs"] == {"loss_scale": 2.0**14, "skipped_steps": 1.0}


def test_keras_loss_scale_optimizer_in_fit_applies_a_replica_1_nan(background):
    # Why this path exists; if it fails, Keras changed and the report must too.
    results = json.loads(background["mirrored"].result().splitlines()[-1])
    first, second = results["keras/bad0"], results["keras/bad1"]
    assert first["iterations"] == 1 and first["nan_trainable_per_replica"] == [0.0, 0.0]
    assert second["iterations"] == 2 and second["nan_trainable_per_replica"] == [1.0, 1.0]
    assert second["scale"] == [2.0**15] * 2  # and never backed off


def test_under_mirrored_xla_compiles_only_each_replicas_forward_and_backward(background):
    results = json.loads(background["mirrored"].result().splitlines()[-1])
    assert results["xla_compiled"] == ["_forward_backward"]
    # Keras' own evaluate and predict ran under the same strategy and jit_compile.
    assert results["fit/xla1/bad1"]["evaluate_finite"]
    assert results["fit/xla1/bad1"]["predict_shape"] == [BATCH, 3]
