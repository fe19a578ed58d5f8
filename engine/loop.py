"""The train state, the inner loop and the outer loop.

Three layers, as in Orbit:
  * the step (`engine.step`): one replica, TensorFlow ops only, optionally
    compiled by XLA;
  * the inner loop (`create_train_loop`): `num_steps` steps inside one
    `tf.function`, accumulating statistics in variables. No host sync inside:
    nothing is read back until the call returns;
  * the outer loop (`run_loops`): Python. Runs one inner loop, reads its
    statistics once, then lets each action act (summaries, the divergence
    guard, eval, checkpoints, ...: `engine.actions`). Turning a feature off
    removes its action; the loop itself never changes.
"""

import dataclasses
import hashlib
import time

import numpy as np
import tensorflow as tf

from engine import distribute
from engine.float8 import NoFloat8
from engine.step import TrainStep


class TrainState(tf.Module):
    """Everything that defines where training is: the checkpointable state.

    The loss scale is a field, so its scale and good-step counter are saved and
    restored with the weights and the optimizer slots; so is the float8 recipe,
    whose `state` (the delayed recipe's amax histories and scales) a checkpoint holds.
    """

    def __init__(self, model, optimizer, loss_scale, float8=None):
        super().__init__(name="train_state")
        self.model = model
        self.optimizer = optimizer
        self.loss_scale = loss_scale
        self.float8 = float8 or NoFloat8()
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.skipped_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped")
        # The current run of skipped steps; checkpointed so the divergence guard
        # counts across a resume exactly as it would have without one.
        self.consecutive_skips = tf.Variable(
            0, dtype=tf.int64, trainable=False, name="consecutive_skips"
        )


class LoopStats(tf.Module):
    """Sums over the steps since the host last read them; not checkpointed."""

    NAMES = ("steps", "loss", "correct", "grad_norm", "finite_steps")
    NAMES += ("max_consecutive_skips", "nonfinite_losses")

    def __init__(self):
        super().__init__(name="loop_stats")
        self.steps = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.loss = tf.Variable(0.0, dtype=tf.float32, trainable=False)
        self.correct = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.grad_norm = tf.Variable(0.0, dtype=tf.float32, trainable=False)
        self.finite_steps = tf.Variable(0, dtype=tf.int64, trainable=False)
        # For the divergence guard: the longest skip run seen during the loop (not
        # just the one at its end) and the number of steps with a non-finite loss.
        self.max_consecutive_skips = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.nonfinite_losses = tf.Variable(0, dtype=tf.int64, trainable=False)

    def read_and_reset(self):
        values = {name: getattr(self, name).numpy() for name in self.NAMES}
        for name in self.NAMES:
            getattr(self, name).assign(tf.zeros_like(getattr(self, name)))
        return values


def _step_runner(strategy, train_step, jit_compile):
    """`run_step(images, labels) -> outputs`: the step under the strategy.

    Without mirrored variables XLA compiles the whole step; with them (even one
    replica's worth), the part of each replica's step that holds no collective
    (`TrainStep.compute`), and stages 7-8 run in cross-replica context.
    """
    # autograph=False: the step has no Python control flow on tensors, and not
    # converting it (and everything it calls) cuts tracing time.
    if not distribute.replicated(strategy) or not isinstance(train_step, TrainStep):
        step_fn = tf.function(train_step, jit_compile=jit_compile, autograph=False)
        return lambda images, labels: strategy.run(step_fn, args=(images, labels))

    compute = tf.function(train_step.compute, jit_compile=jit_compile, autograph=False)
    # `strategy.run` would otherwise autograph-convert the step and all it calls.
    replica_step = tf.autograph.experimental.do_not_convert(train_step.replica_step)

    def run_step(images, labels):
        out = strategy.run(replica_step, args=(images, labels, compute))
        train_step.cross_replica_update(strategy, out)
        return {k: v for k, v in out.items() if k not in ("grads", "saved_state")}

    return run_step


def create_train_loop(strategy, train_step, state, stats, jit_compile, monitor=None):
    """Returns `train_loop(iterator, num_steps)`, one `tf.function` running many steps.

    `monitor` (an `extras.diagnostics.StepMonitor`) records non-finite steps in the graph.
    """
    run_step = _step_runner(strategy, train_step, jit_compile)
    sum_ = tf.distribute.ReduceOp.SUM

    def first(value):  # every replica took the same decision on the same summed gradients
        return strategy.experimental_local_results(value)[0]

    def one_step(iterator):
        images, labels = iterator.get_next()
        out = run_step(images, labels)
        finite = first(out["finite"])
        state.step.assign_add(1)
        if monitor is not None:
            monitor.record(state.step, {k: first(v) for k, v in out.items()})
        state.skipped_steps.assign_add(tf.cast(tf.logical_not(finite), tf.int64))
        run = tf.where(finite, tf.constant(0, tf.int64), state.consecutive_skips + 1)
        state.consecutive_skips.assign(run)
        stats.max_consecutive_skips.assign(tf.maximum(stats.max_consecutive_skips, run))
        loss = strategy.reduce(sum_, out["loss"], axis=None)
        stats.nonfinite_losses.assign_add(
            tf.cast(tf.logical_not(tf.math.is_finite(loss)), tf.int64)
        )
        stats.steps.assign_add(1)
        stats.loss.assign_add(loss)
        stats.correct.assign_add(
            tf.cast(strategy.reduce(sum_, out["correct"], axis=None), tf.int64)
        )
        stats.finite_steps.assign_add(tf.cast(finite, tf.int64))
        stats.grad_norm.assign_add(tf.where(finite, first(out["grad_norm"]), 0.0))

    # An explicit `tf.while_loop`, not autograph's `for ... in tf.range`: the
    # same graph, without converting this function's source on every trace.
    @tf.function(autograph=False)
    def train_loop(iterator, num_steps):
        def body(i):
            one_step(iterator)
            return (i + 1,)

        tf.while_loop(lambda i: i < num_steps, body, (tf.constant(0, num_steps.dtype),))

    return train_loop


def create_eval_loop(strategy, eval_step, jit_compile):
    """Returns `eval_loop(dist_dataset) -> (mean loss, accuracy)` as one `tf.function`."""
    compiled = tf.function(eval_step, jit_compile=jit_compile, autograph=False)

    def step_fn(images, labels):
        # Called from a plain replica function: a compiled function handed to
        # `strategy.run` directly is placed on the first device for every
        # replica, and XLA then cannot reach the other replicas' variables.
        # With several replicas the last, partial batch can leave a replica
        # with no example at all, which convolutions reject: it counts nothing.
        return tf.cond(
            tf.shape(images)[0] > 0,
            lambda: compiled(images, labels),
            lambda: {
                "loss_sum": tf.constant(0.0),
                "correct": tf.constant(0, tf.int32),
                "count": tf.constant(0, tf.int32),
            },
        )

    sum_ = tf.distribute.ReduceOp.SUM

    @tf.function
    def eval_loop(dist_dataset):
        loss_sum = tf.constant(0.0)
        correct = tf.constant(0, tf.int64)
        count = tf.constant(0, tf.int64)
        for images, labels in dist_dataset:
            out = strategy.run(step_fn, args=(images, labels))
            loss_sum += strategy.reduce(sum_, out["loss_sum"], axis=None)
            correct += tf.cast(strategy.reduce(sum_, out["correct"], axis=None), tf.int64)
            count += tf.cast(strategy.reduce(sum_, out["count"], axis=None), tf.int64)
        count_f = tf.cast(tf.maximum(count, 1), tf.float32)
        return loss_sum / count_f, tf.cast(correct, tf.float32) / count_f

    return eval_loop


class Action:
    """What the outer loop calls; every hook is optional (a no-op here).

    `steps_to_boundary(step)`: steps until this action must run (the next loop
    is cut to end there), or None. `before_loop(step)`: before a loop starts.
    `__call__(record)`: after each loop, in the order the actions are listed; an
    action may mark the record for those after it (`record.diverged`).
    """

    def steps_to_boundary(self, step):
        del step

    def before_loop(self, step):
        del step

    def __call__(self, record):
        del record


@dataclasses.dataclass
class LoopRecord:
    """What one inner loop did, as the actions see it."""

    step: int  # the global step after the loop
    total: int  # the run's last step
    stats: dict  # `LoopStats.read_and_reset()`
    seconds: float  # wall time of the loop call
    first: bool  # the run's first loop: one step, tracing and compilation included
    stop: object  # a `preemption.StopRequest`: true once SIGTERM or SIGINT arrived
    diverged: tuple | None = None  # set by the divergence guard: (reason, message)


def steps_to_multiple(interval, step):
    """Steps until the next multiple of `interval` (0 = never): a `steps_to_boundary`."""
    return interval - step % interval if interval else None


def run_loops(train_loop, iterator, state, stats, total, steps_per_loop, actions, stop):
    """The outer loop: inner loops until `total` steps or a stop; returns the last step.

    The first loop runs one step, so tracing and compilation are timed alone.
    Each later loop runs `steps_per_loop` steps, cut to end where an action is due.
    """
    step = int(state.step.numpy())
    first = True
    while step < total and not stop:
        n = min(1 if first else steps_per_loop, total - step)
        for action in actions:
            n = min(n, action.steps_to_boundary(step) or n)
        for action in actions:
            action.before_loop(step)
        t0 = time.perf_counter()
        train_loop(iterator, tf.constant(n, tf.int32))
        loop_stats = stats.read_and_reset()  # the host's one read of the loop
        seconds = time.perf_counter() - t0
        step = int(state.step.numpy())
        record = LoopRecord(step, total, loop_stats, seconds, first, stop)
        for action in actions:
            action(record)
        first = False
    return step


def weights_digest(state):
    """A short sha256 of the model's variables and the loss scale: equal on workers in sync."""
    digest = hashlib.sha256()
    for variable in state.model.variables:
        digest.update(np.ascontiguousarray(variable.numpy()).tobytes())
    digest.update(np.float32(state.loss_scale.value.numpy()).tobytes())
    return digest.hexdigest()[:16]
