"""The checks with two replicas on two logical CPUs, run together in one fresh process.

Logical CPU devices can only be set up before TensorFlow starts its runtime, so
the tests cannot make them in their own process; starting one process per check
cost ~7 s each. `python tests/mirrored_checks.py` runs every check of `CHECKS`
and prints one JSON line, {"CHECK ARGS": what the test asserts on};
`conftest.mirrored_check(CHECK, *ARGS)` starts it once per test session.
"""

import json
import os
import sys
import tempfile
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import float8_mirrored_check
import keras
import numpy as np
import tensorflow as tf

from engine import distribute, loop
from engine.extras import create_train_step
from engine.loss_scale import DynamicLossScale
from models import create_model

BATCH = 8  # global; 4 per replica
# One strategy for every check, made before any op starts the runtime: two strategies
# in one process would number their collective operations alike, and TensorFlow
# matches a collective by its number.
STRATEGY = distribute.create_strategy("mirrored", 2)


def _batches(seed, poison=None):
    """The global batch, and its two replica halves; half `poison` is all nan."""
    images = tf.random.stateless_uniform([BATCH, 16, 16, 3], [seed, 0])
    labels = tf.random.stateless_uniform([BATCH], [seed, 1], maxval=3, dtype=tf.int32)
    halves = [(images[:4], labels[:4]), (images[4:], labels[4:])]
    if poison is not None:
        halves[poison] = (tf.fill([4, 16, 16, 3], float("nan")), halves[poison][1])
    return images, labels, halves


def _dense_model(policy):
    # No BatchNorm: per-replica batch statistics would differ from the global
    # batch's, and this check is about how gradients are combined.
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(8, activation="relu", dtype=policy)(x)
    return keras.Model(inputs, keras.layers.Dense(3, dtype="float32")(x))


def _run(strategy, model_fn, policy, halves, steps=1, jit_compile=False):
    with strategy.scope():
        model = model_fn(policy)
        optimizer = keras.optimizers.SGD(0.5)
        optimizer.build(model.trainable_variables)
        scale = DynamicLossScale(initial_scale=2.0**15, growth_interval=1000)
        state = loop.TrainState(model, optimizer, scale)
        stats = loop.LoopStats()
    before = [v.numpy().copy() for v in model.variables]
    step = create_train_step(model, optimizer, scale, BATCH)
    train_loop = loop.create_train_loop(strategy, step, state, stats, jit_compile=jit_compile)
    # One input pipeline, two replicas: consecutive elements go to replica 0, then 1.
    per_replica = tf.data.Dataset.from_tensor_slices(
        tuple(tf.stack(t) for t in zip(*halves, strict=True))
    )
    dataset = strategy.distribute_datasets_from_function(lambda ctx: per_replica.repeat())
    train_loop(iter(dataset), tf.constant(steps))
    return state, model, before


def _replica_values(variable):
    value = variable.value if hasattr(variable, "value") else variable
    components = getattr(value, "values", None) or (value,)
    return [np.asarray(c) for c in components]


def skip_agreement(poison, model_name="tiny", xla="noxla"):
    strategy = STRATEGY
    _, _, halves = _batches(0, poison=poison)
    state, model, before = _run(
        strategy,
        lambda p: create_model(model_name, 3, 16, p, fused_batch_norm=xla != "xla"),
        "mixed_float16",
        halves,
        jit_compile=xla == "xla",
    )
    replicas = [_replica_values(v) for v in model.variables + state.optimizer.variables]
    return {
        "replicas": strategy.num_replicas_in_sync,
        # Each variable's copies, one per replica: what "identical" compared.
        "copies_compared": sorted({len(copies) for copies in replicas}),
        "skipped": int(state.skipped_steps.numpy()),
        "scale": float(state.loss_scale.value.numpy()),
        "iterations": int(state.optimizer.iterations.numpy()),
        "identical_across_replicas": all(
            all(np.array_equal(c, copies[0]) for c in copies) for copies in replicas
        ),
        "unchanged": all(
            np.array_equal(_replica_values(v)[0], b)
            for v, b in zip(model.variables, before, strict=True)
        ),
    }


def matches_single_device():
    mirrored = STRATEGY
    images, labels, halves = _batches(1)
    _, model, _ = _run(mirrored, _dense_model, "float32", halves)
    mirrored_weights = [_replica_values(v) for v in model.variables]
    _, single, _ = _run(tf.distribute.get_strategy(), _dense_model, "float32", [(images, labels)])
    max_diff = max(
        float(np.max(np.abs(reps[0] - v.numpy())))
        for reps, v in zip(mirrored_weights, single.variables, strict=True)
    )
    spread = max(float(np.max(np.abs(r - reps[0]))) for reps in mirrored_weights for r in reps)
    changed = any(
        not np.array_equal(a, b)
        for a, b in zip(
            [w[0] for w in mirrored_weights],
            [v.numpy() for v in _dense_model("float32").variables],
            strict=True,
        )
    )
    return {"max_diff": max_diff, "replica_spread": spread, "changed": changed}


def keras_loss_scale_optimizer(poison):
    """Keras' own LossScaleOptimizer, same situation: replica `poison`'s gradients are nan."""
    strategy = STRATEGY
    with strategy.scope():
        var = keras.Variable(np.ones(2, np.float32))
        optimizer = keras.optimizers.LossScaleOptimizer(
            keras.optimizers.SGD(0.1), initial_scale=1024.0
        )
        optimizer.build([var])

    def gradients(ctx):
        g = tf.constant([1.0, 1.0])
        return g * float("nan") if ctx.replica_id_in_sync_group == poison else g

    @tf.function
    def step(grads):
        strategy.run(lambda g: optimizer.apply([g], [var]), args=(grads,))

    step(strategy.experimental_distribute_values_from_function(gradients))
    return {
        "weights": [_replica_values(var)[i].tolist() for i in range(2)],
        "scale": [float(s) for s in _replica_values(optimizer.dynamic_scale)],
    }


def bn_recalibration(xla):
    """Precise BatchNorm statistics with two replicas, each on its own half-batches."""
    from engine.actions.batch_norm_stats import Recalibration

    strategy = STRATEGY
    # Four per-replica batches, each with its own offset: replica 0 gets the
    # first and third, replica 1 the second and fourth (one input pipeline).
    images = tf.stack([tf.random.stateless_uniform([4, 16, 16, 3], [i, 0]) + i for i in range(4)])
    per_replica = tf.data.Dataset.from_tensor_slices((images, tf.zeros([4, 4], tf.int32)))
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = create_model("tiny", 3, 16, "float32", fused_batch_norm=xla != "xla")
    recalibrate = Recalibration(
        strategy, model, lambda ctx: per_replica, num_batches=2, jit_compile=xla == "xla"
    )
    recalibrate(step=1)
    features = keras.Model(model.inputs, model.get_layer("conv").output)
    x = [features(images[i]).numpy().astype(np.float64) for i in range(4)]
    expected = [
        np.mean([b.mean(axis=(0, 1, 2)) for b in x], 0),
        np.mean([b.var(axis=(0, 1, 2)) for b in x], 0),
    ]
    got = [_replica_values(v) for v in recalibrate.statistics]
    identical = all(all(np.array_equal(r, reps[0]) for r in reps) for reps in got)
    error = max(
        float(np.max(np.abs(reps[0] - e) / np.abs(e)))
        for reps, e in zip(got, expected, strict=True)
    )
    return {
        "replicas": strategy.num_replicas_in_sync,
        "identical_across_replicas": identical,
        "max_relative_error": error,
    }


def _train_under(strategy, **flags):
    """`engine.train.train_and_evaluate` of a tiny run, under `strategy` (--strategy=mirrored).

    The strategy is handed in: a second mirrored strategy in this process would
    number its collective operations as `STRATEGY` does (see there).
    """
    from unittest import mock

    from engine import train

    with mock.patch.object(distribute, "create_strategy", lambda *args: strategy):
        return train.train_and_evaluate(_config(**flags), tempfile.mkdtemp())


def _config(**flags):
    """A tiny mirrored run's `Config`, `flags` over the defaults."""
    from engine.config import Config

    base = dict(model="tiny", image_size=16, batch_size=16, train_examples=128)
    base |= dict(eval_examples=64, eval_batch_size=32, steps_per_loop=3)
    return Config(**(base | {"strategy": "mirrored"} | flags))


def trains_end_to_end(devices):
    """Mixed + XLA trained under MirroredStrategy; one replica too (its variables still
    mirrored, so its updates must not run inside the compiled step)."""
    strategy = STRATEGY if devices == 2 else tf.distribute.MirroredStrategy(["/cpu:0"])
    result = _train_under(
        strategy, num_cpu_devices=devices, precision="mixed", xla=True, train_steps=6
    )
    return {
        "replicas": strategy.num_replicas_in_sync,
        "steps": result.steps,
        "finite_loss": bool(np.isfinite(result.train_loss)),
    }


def eval_with_an_empty_replica():
    """3 eval images in batches of 8 over two replicas: one replica gets none.

    Returns the run's eval accuracy and the one computed apart: its last
    checkpoint restored into a model of its own, on one device.
    """
    from image_trees import make_folder_tree

    root = make_folder_tree(os.path.join(tempfile.mkdtemp(), "data"), per_class=10)
    flags = dict(
        dataset=f"folder:{root}",
        eval_fraction=0.1,  # 30 images, 3 for eval
        precision="fp32",
        model="small_resnet",
        batch_size=8,
        eval_batch_size=8,
        train_steps=2,
        steps_per_loop=1,
        bn_recalibration_examples=0,  # the checkpoint holds the statistics eval used
    )
    result = _train_under(STRATEGY, **flags)
    accuracy, count = _evaluated_apart(_config(**flags), result.model_dir)
    return {
        "steps": result.steps,
        "eval_accuracy": result.eval_accuracy,
        "accuracy_apart": accuracy,
        "eval_count": count,
    }


def _evaluated_apart(config, model_dir):
    """(accuracy, examples) of `model_dir`'s last checkpoint on the eval set, one device."""
    from engine import checkpoints, train_run
    from engine.data import data_config
    from input_pipeline import create_data

    data = create_data(data_config(config))
    model = train_run.create_model_for(config, data.num_classes)
    latest = tf.train.latest_checkpoint(checkpoints.checkpoint_dir(model_dir))
    tf.train.Checkpoint(model=model).restore(latest).expect_partial()
    correct = count = 0
    for images, labels in data.eval_fn():
        predicted = tf.argmax(model(images, training=False), -1, output_type=labels.dtype)
        correct += int(tf.reduce_sum(tf.cast(tf.equal(predicted, labels), tf.int32)))
        count += int(tf.size(labels))
    return correct / count, count


def float8_agreement(context):
    """Float8's delayed scales, committed in `context` (see float8_mirrored_check.py)."""
    if context == "engine":
        return float8_mirrored_check.check_engine_step(STRATEGY)
    return {
        "replicas": STRATEGY.num_replicas_in_sync,
        **float8_mirrored_check.check(STRATEGY, context),
    }


# Every check the tests read: (function, its arguments as the command line gives them).
CHECKS = [
    (skip_agreement, ("0", "tiny", "noxla")),
    (skip_agreement, ("1", "tiny", "noxla")),
    (skip_agreement, ("0", "tiny", "xla")),
    (skip_agreement, ("1", "tiny", "xla")),
    (skip_agreement, ("1", "vit_test")),
    (keras_loss_scale_optimizer, ("0",)),
    (keras_loss_scale_optimizer, ("1",)),
    (matches_single_device, ()),
    (bn_recalibration, ("noxla",)),
    (bn_recalibration, ("xla",)),
    (trains_end_to_end, ("2",)),
    (trains_end_to_end, ("1",)),
    (eval_with_an_empty_replica, ()),
    (float8_agreement, ("cross",)),
    (float8_agreement, ("scope",)),
    (float8_agreement, ("replica",)),
    (float8_agreement, ("engine",)),
]


def run_all():
    """{"CHECK ARGS": result} for every check of `CHECKS`, in this one process."""
    results = {}
    for check, args in CHECKS:
        typed = [int(a) if a.isdigit() else a for a in args]
        try:
            results[" ".join((check.__name__, *args))] = check(*typed)
        except Exception:  # the test of that check fails with it; the others still run
            results[" ".join((check.__name__, *args))] = {"error": traceback.format_exc()}
    return results


if __name__ == "__main__":
    print(json.dumps(run_all()))
