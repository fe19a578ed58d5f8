"""Float8's checks with two replicas, run among `tests/mirrored_checks.py`'s CHECKS.

`check(strategy, context)`: for each place `commit` can run (in cross-replica context
outside and inside the strategy's scope, and in replica context), what the two replicas
hold; `check_engine_step(strategy)`: the same for the engine's own multi-replica step
and inner loop on the test ViT. Replica 1's inputs are 100 times replica 0's. With
`commit` in replica context, each replica's forward and backward pass is compiled by
XLA, as the engine's are (once is enough, and XLA is slow to compile).
"""

import keras
import numpy as np
import tensorflow as tf

from engine import float8


def copies(strategy, var):
    return [c.numpy() for c in strategy.experimental_local_results(var)]


def check(strategy, context):
    with strategy.scope():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((4, 8))
        hidden = keras.layers.Dense(16, activation="relu", name="first")(inputs)
        model = keras.Model(inputs, keras.layers.Dense(8, name="second")(hidden))
        recipe = float8.DelayedScaling(amax_history=4)
        quantized = float8.quantize_model(model, recipe)

    @tf.function(jit_compile=context == "replica")
    def compute(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(x, training=True) ** 2)
        return tape.gradient(loss, model.trainable_variables)

    def replica_step(x):
        compute(x)
        if context == "replica":
            recipe.commit(tf.constant(True))

    @tf.function
    def step(x):
        strategy.run(replica_step, args=(x,))
        if context == "cross":
            recipe.commit(tf.constant(True))
        elif context == "scope":
            with strategy.scope():
                recipe.commit(tf.constant(True))

    base = tf.random.stateless_normal([2, 4, 8], [0, 1])
    x = strategy.experimental_distribute_values_from_function(
        lambda ctx: base * 100.0**ctx.replica_id_in_sync_group
    )
    step(x)
    pending = copies(strategy, recipe.pending)
    step(x)  # the second step's scales come from the first step's history
    histories = copies(strategy, recipe.state.amax_history)
    scales = copies(strategy, recipe.state.scale)
    statistics = recipe.read_and_reset()
    return {
        "quantized": quantized,
        "pending_differ": not np.array_equal(pending[0], pending[1]),
        "histories_identical": np.array_equal(histories[0], histories[1]),
        "scales_identical": np.array_equal(scales[0], scales[1]),
        "history_is_max": np.array_equal(histories[0][..., 0], np.maximum(*pending)),
        "scales_moved": bool((scales[0] != 1.0).all()),
        # Statistics combine the replicas' copies, and a read resets every copy.
        "statistics_amax_is_max": bool(
            statistics["float8/inputs_amax"] == np.maximum(*pending)[:, 0].max()
        ),
        "statistics_reset": recipe.read_and_reset() == {},
    }


def check_engine_step(strategy):
    """The engine's own replica step and inner loop (`cross_replica_update` commits), 2 steps."""
    from engine import loop
    from engine.loss_scale import NoOpLossScale
    from engine.step import TrainStep
    from models import create_model

    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = create_model("vit_test", 3, 16, "mixed_bfloat16", fused_batch_norm=False)
        recipe = float8.DelayedScaling(amax_history=4)
        float8.quantize_model(model, recipe)
        optimizer = keras.optimizers.Adam()
        optimizer.build(model.trainable_variables)
        state = loop.TrainState(model, optimizer, NoOpLossScale(), recipe)
    step = TrainStep(model, optimizer, state.loss_scale, 8, float8=recipe)
    train_loop = loop.create_train_loop(strategy, step, state, loop.LoopStats(), False)
    # Replica 1's half of the batch is 100 times replica 0's.
    images = (
        tf.random.stateless_uniform([8, 16, 16, 3], [0, 1])
        * tf.repeat([1.0, 100.0], 4)[:, None, None, None]
    )
    labels = tf.constant([0, 1, 2, 0, 1, 2, 0, 1])
    data = tf.data.Dataset.from_tensors((images, labels)).repeat()
    train_loop(iter(strategy.experimental_distribute_dataset(data)), tf.constant(2))
    histories = copies(strategy, recipe.state.amax_history)
    scales = copies(strategy, recipe.state.scale)
    return {
        "steps": int(state.step.numpy()),
        "histories_identical": np.array_equal(histories[0], histories[1]),
        "scales_identical": np.array_equal(scales[0], scales[1]),
        "two_amaxes_each": bool(((histories[0] > 0).sum(-1) == 2).all()),
        "scales_moved": bool((scales[0] != 1.0).all()),
    }
