"""Run in a fresh process by tests/test_keras_fit.py: two logical CPUs need a new runtime.

`python tests/fit_mirrored_checks.py` runs every check and prints one JSON line:
  * "fit/xla{0,1}/bad{0,1}": `LossScaledModel.fit` under MirroredStrategy, one
    clean batch and then one whose half for replica `bad` is nan images, without
    XLA and with the per-replica XLA;
  * "keras/bad{0,1}": the same batches through stock `fit` with Keras'
    `LossScaleOptimizer`;
  * "xla_compiled": the functions XLA compiled, read from the dump folder that
    `XLA_FLAGS=--xla_dump_to=...` names (empty without it).
"""

import json
import os
import re
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras
import numpy as np
import tensorflow as tf

from engine.keras_fit import LossScaledModel

BATCH = 8  # global; 4 per replica
SCALE = 2.0**15


def _data(bad):
    """A clean global batch, then one whose half for replica `bad` is nan images."""
    images = tf.random.stateless_uniform([2, BATCH, 8, 8, 3], [1, 2])
    labels = tf.random.stateless_uniform([2, BATCH], [3, 4], maxval=3, dtype=tf.int32)
    # fit splits each global batch in order: replica 0 takes the first half.
    half = slice(bad * BATCH // 2, (bad + 1) * BATCH // 2)
    poisoned = images[1].numpy()
    poisoned[half] = np.nan
    return (images[0], labels[0]), (tf.constant(poisoned), labels[1])


def _model(model_class):
    keras.utils.set_random_seed(0)
    keras.config.set_dtype_policy("mixed_float16")
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(x))
    return model_class(inputs, keras.layers.Dense(3, dtype="float32")(x))


def _replica_values(variable):
    value = variable.value if hasattr(variable, "value") else variable
    return [np.asarray(c) for c in (getattr(value, "values", None) or (value,))]


class _Snapshot(keras.callbacks.Callback):
    """The weights after the first (clean) batch, replica 0's copy."""

    def on_train_batch_end(self, batch, logs=None):
        if batch == 0:
            self.weights = [_replica_values(v)[0] for v in self.model.weights]


def _train(strategy, model, bad):
    """One clean step, then the poisoned one; what the test asserts on."""
    clean, poisoned = _data(bad)
    batches = tf.data.Dataset.from_tensors(clean).concatenate(
        tf.data.Dataset.from_tensors(poisoned)
    )
    snapshot = _Snapshot()
    history = model.fit(batches, verbose=0, callbacks=[snapshot])
    after = [_replica_values(v) for v in model.weights + model.optimizer.variables]
    weights = after[: len(snapshot.weights)]
    return {
        "replicas": strategy.num_replicas_in_sync,
        "identical_across_replicas": all(all(np.array_equal(r, v[0]) for r in v) for v in after),
        "finite": all(np.isfinite(r).all() for v in weights for r in v),
        "unchanged": all(
            np.array_equal(v[0], b) for v, b in zip(weights, snapshot.weights, strict=True)
        ),
        "iterations": int(model.optimizer.iterations.numpy()),
        "logs": {k: v[-1] for k, v in history.history.items() if k != "loss"},
    }


def engine_fit(strategy, bad, xla):
    with strategy.scope():
        model = _model(LossScaledModel)
        model.compile(
            keras.optimizers.Adam(0.01),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=xla,
            loss_scale={"initial_scale": SCALE},
        )
    result = _train(strategy, model, bad)
    result["scale"] = float(model.loss_scale.value.numpy())
    if xla and bad:
        # Keras' own evaluate and predict, which stock jit_compile cannot run here.
        images, labels = _data(bad)[0]
        result["evaluate_finite"] = bool(np.isfinite(model.evaluate(images, labels, verbose=0)))
        result["predict_shape"] = list(model.predict(images, verbose=0).shape)
    return result


def keras_fit(strategy, bad):
    with strategy.scope():
        model = _model(keras.Model)
        optimizer = keras.optimizers.LossScaleOptimizer(
            keras.optimizers.Adam(0.01), initial_scale=SCALE
        )
        model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    result = _train(strategy, model, bad)
    trainable = [_replica_values(v) for v in model.trainable_variables]
    result["nan_trainable_per_replica"] = [
        float(np.mean(np.concatenate([np.isnan(v[i]).ravel() for v in trainable])))
        for i in range(strategy.num_replicas_in_sync)
    ]
    result["scale"] = [float(s) for s in _replica_values(optimizer.dynamic_scale)]
    return result


def xla_compiled():
    """The names of the functions XLA compiled, from the dump's module file names."""
    match = re.search(r"--xla_dump_to=(\S+)", os.environ.get("XLA_FLAGS", ""))
    if not match or not os.path.isdir(match.group(1)):
        return []
    names = (
        re.match(r"module_\d+\.a_inference_(.+?)_\d+__", f) for f in os.listdir(match.group(1))
    )
    return sorted({m.group(1) for m in names if m})


def main():
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    results = {}
    for xla in (0, 1):
        for bad in (0, 1):
            results[f"fit/xla{xla}/bad{bad}"] = engine_fit(strategy, bad, bool(xla))
    for bad in (0, 1):
        results[f"keras/bad{bad}"] = keras_fit(strategy, bad)
    results["xla_compiled"] = xla_compiled()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
