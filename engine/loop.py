"""The inner loop (many steps per `tf.function` call) and the host-side outer loop.

Three layers, as in Orbit:
  * the step (`engine.train_step`): one replica, TensorFlow ops only, optionally
    compiled by XLA;
  * the inner loop (`create_train_loop`): `num_steps` steps inside one
    `tf.function`, accumulating statistics in variables. No host sync inside:
    nothing is read back until the call returns;
  * the outer loop (`train_and_evaluate`): Python. Reads the statistics once per
    loop, writes summaries, prints the console line, evaluates each epoch.
"""

import dataclasses
import hashlib
import os
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from engine import (
    checkpointing,
    diagnostics,
    distribute,
    export,
    guards,
    optimizers,
    summaries,
)
from engine import config as config_lib
from engine.data import data_config
from engine.loss_scale import create_loss_scale
from engine.precision import get_policy, slow_combination_warning
from engine.profiling import StepProfiler
from engine.train_step import TrainStep, create_eval_step, create_train_step
from input_pipeline import create_data
from models import create_model


class TrainState(tf.Module):
    """Everything that defines where training is: the checkpointable state.

    The loss scale is a field, so its scale and good-step counter are saved and
    restored with the weights and the optimizer slots.
    """

    def __init__(self, model, optimizer, loss_scale):
        super().__init__(name="train_state")
        self.model = model
        self.optimizer = optimizer
        self.loss_scale = loss_scale
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.skipped_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped")
        # The current run of skipped steps; checkpointed so the divergence guard
        # counts across a resume exactly as it would have without one.
        self.consecutive_skips = tf.Variable(
            0, dtype=tf.int64, trainable=False, name="consecutive_skips"
        )


class LoopStats(tf.Module):
    """Sums over the steps since the host last read them; not checkpointed."""

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
        values = {name: var.numpy() for name, var in self._named()}
        for _, var in self._named():
            var.assign(tf.zeros_like(var))
        return values

    def _named(self):
        names = ("steps", "loss", "correct", "grad_norm", "finite_steps")
        names += ("max_consecutive_skips", "nonfinite_losses")
        return [(n, getattr(self, n)) for n in names]


def create_train_loop(strategy, train_step, state, stats, jit_compile, monitor=None):
    """Returns `train_loop(iterator, num_steps)`, one `tf.function` running many steps.

    `monitor` (a `diagnostics.StepMonitor`) records non-finite steps in the graph.
    Without mirrored variables XLA compiles the whole step; with them (even one
    replica's worth), the part of each replica's step that holds no collective
    (`TrainStep.compute`).
    """
    sum_ = tf.distribute.ReduceOp.SUM
    # autograph=False: the step has no Python control flow on tensors, and not
    # converting it (and everything it calls) cuts tracing time.
    if not distribute.replicated(strategy) or not isinstance(train_step, TrainStep):
        step_fn = tf.function(train_step, jit_compile=jit_compile, autograph=False)

        def run_step(images, labels, number):
            return strategy.run(step_fn, args=(images, labels, number))

    else:
        compute = tf.function(train_step.compute, jit_compile=jit_compile, autograph=False)
        # `strategy.run` would otherwise autograph-convert the step and all it calls.
        replica_step = tf.autograph.experimental.do_not_convert(train_step.replica_step)

        def run_step(images, labels, number):
            out = strategy.run(replica_step, args=(images, labels, number, compute))
            train_step.cross_replica_update(strategy, out)
            return {k: v for k, v in out.items() if k not in ("grads", "saved_state")}

    # An explicit `tf.while_loop`, not autograph's `for ... in tf.range`: the
    # same graph, without converting this function's source on every trace.
    @tf.function(autograph=False)
    def train_loop(iterator, num_steps):
        def one_step(i):
            images, labels = iterator.get_next()
            # `number` is the global step once this step is done (the first is 1).
            out = run_step(images, labels, state.step + 1)
            # Every replica took the same decision on the same reduced gradients.
            finite = strategy.experimental_local_results(out["finite"])[0]
            grad_norm = strategy.experimental_local_results(out["grad_norm"])[0]
            state.step.assign_add(1)
            if monitor is not None:
                first = strategy.experimental_local_results
                monitor.record(state.step, {k: first(v)[0] for k, v in out.items()})
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
            stats.grad_norm.assign_add(tf.where(finite, grad_norm, 0.0))
            return (i + 1,)

        tf.while_loop(lambda i: i < num_steps, one_step, (tf.constant(0, num_steps.dtype),))

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


@dataclasses.dataclass
class RunResult:
    """What a finished run reports (also returned to tests and to --mode=compare)."""

    model_dir: str
    steps: int
    skipped_steps: int
    loss_scale: float
    train_loss: float
    eval_loss: float
    eval_accuracy: float
    train_seconds: float  # in the training loops (the first included): no eval, saves, export
    first_step_seconds: float
    examples_per_sec: float
    stopped_by: str = ""  # the signal that stopped the run early, e.g. "SIGTERM"
    trained_steps: int = 0  # steps this call trained: 0 when resumed already finished
    weights_digest: str = ""  # sha256 of every model variable and the loss scale
    diverged: str = ""  # why the divergence guard stopped it (only --mode=compare's rows)


def weights_digest(state):
    """A short sha256 of the model's variables and the loss scale: equal on workers in sync."""
    digest = hashlib.sha256()
    for variable in state.model.variables:
        digest.update(np.ascontiguousarray(variable.numpy()).tobytes())
    digest.update(np.float32(state.loss_scale.value.numpy()).tobytes())
    return digest.hexdigest()[:16]


def device_type():
    return "GPU" if tf.config.list_physical_devices("GPU") else "CPU"


def create_model_for(config, num_classes):
    """The run's model under its precision's policy.

    BatchNorm runs on TensorFlow's fused kernels unless XLA compiles the step
    (see `models.batch_norm`: faster on TensorFlow's kernels, slower under XLA).
    """
    policy = get_policy(config.precision)
    return create_model(
        config.model,
        num_classes,
        config.image_size,
        policy.keras_policy,
        fused_batch_norm=not config.xla,
    )


def build_state(config, data, strategy):
    """Creates model, optimizer and loss scale under the strategy, all built."""
    policy = get_policy(config.precision)
    total_steps = total_train_steps(config, data)
    with strategy.scope():
        model = create_model_for(config, data.num_classes)
        optimizer = optimizers.create_optimizer(config, total_steps)
        optimizer.build(model.trainable_variables)
        loss_scale = create_loss_scale(
            policy,
            config.loss_scale,
            initial_scale=config.initial_scale,
            growth_interval=config.growth_interval,
            min_scale=config.min_scale,
            max_scale=config.max_scale,
        )
        return TrainState(model, optimizer, loss_scale)


def check_batch_sizes(config, num_replicas):
    """Raises ConfigError unless the batches divide evenly over replicas and micro-batches."""
    per_replica, remainder = divmod(config.batch_size, num_replicas)
    if remainder or per_replica % config.grad_accum_steps:
        raise config_lib.ConfigError(
            f"--batch_size ({config.batch_size}) must be a multiple of the {num_replicas} "
            f"replica(s) x --grad_accum_steps ({config.grad_accum_steps})"
        )
    if config.eval_batch_size % num_replicas:
        raise config_lib.ConfigError(
            f"--eval_batch_size ({config.eval_batch_size}) must be a multiple of the "
            f"{num_replicas} replica(s)"
        )


def steps_per_epoch(config, data):
    return max(data.train_size // config.batch_size, 1)


def total_train_steps(config, data):
    return config.train_steps or config.epochs * steps_per_epoch(config, data)


def _loop_values(state, s, batch_size):
    steps = max(int(s["steps"]), 1)
    return {
        "train/skip_rate": 1.0 - float(s["finite_steps"]) / steps,
        "train/loss": float(s["loss"]) / steps,
        "train/accuracy": float(s["correct"]) / (steps * batch_size),
        "train/grad_norm": float(s["grad_norm"]) / max(int(s["finite_steps"]), 1),
        "train/learning_rate": optimizers.current_learning_rate(state.optimizer),
        "train/loss_scale": float(state.loss_scale.value.numpy()),
        "train/skipped_steps": int(state.skipped_steps.numpy()),
    }


def _speeds(s, seconds, batch_size):
    steps = int(s["steps"])
    return {
        "train/examples_per_sec": steps * batch_size / max(seconds, 1e-9),
        "train/steps_per_sec": steps / max(seconds, 1e-9),
    }


def _loop_size(config, step, total, per_epoch, first):
    """Steps in the next loop: it ends at epoch, checkpoint and summary boundaries."""
    # The first call runs one step, so tracing and compilation are timed alone.
    n = 1 if first else config.steps_per_loop
    n = min(n, total - step, per_epoch - step % per_epoch)
    every = (config.checkpoint_every, config.summary_every, config.histogram_every)
    return _align(n, step, *every)


def train_and_evaluate(config, model_dir):
    """Trains `config` with summaries and checkpoints in `model_dir`; returns a `RunResult`.

    Resumes from the newest readable checkpoint in `model_dir` (see
    `checkpointing.prepare_model_dir` for the rules).

    Raises:
      ConfigError: `--fresh` on a directory with checkpoints, or a flag that
        does not match them.
      checkpointing.DamagedCheckpoints: checkpoints exist but none can be read.
      guards.TrainingDiverged: the divergence guard stopped the run.
    """
    policy = get_policy(config.precision)
    warning = slow_combination_warning(policy, config.xla, device_type())
    if warning:
        logging.warning("%s", warning)
    # First: logical CPU devices can only be set up before TensorFlow starts its runtime.
    strategy = distribute.create_strategy(config.strategy, config.num_cpu_devices)
    check_batch_sizes(config, strategy.num_replicas_in_sync)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(config.seed)
    data = create_data(data_config(config))  # before model_dir: bad data must leave no trace there
    # Also before model_dir: a stale lock or a damaged file cache of the eval
    # images is found here (see `preprocessing.create_eval_dataset`). The
    # training images are decoded (or read from their cache) later, when the
    # iterator is made: after `prepare_model_dir` has checked the flags, so a
    # mismatched resume is refused before a whole data set is decoded.
    eval_data = strategy.distribute_datasets_from_function(data.eval_fn)
    if distribute.is_chief(strategy):
        resume = checkpointing.prepare_model_dir(config, model_dir, data.class_names)
    else:
        resume = checkpointing.has_checkpoints(model_dir) and not config.fresh
    state = build_state(config, data, strategy)
    stats = LoopStats()
    trainable = state.model.trainable_variables
    monitor = diagnostics.StepMonitor(
        [v.path for v in trainable], precision_diagnostics=config.precision_diagnostics
    )
    train_step = create_train_step(
        state.model,
        state.optimizer,
        state.loss_scale,
        config.batch_size,
        config.clip_norm,
        class_weights=data.class_weights,
        precision_diagnostics=config.precision_diagnostics,
        inject=config_lib.parse_inject_nonfinite(config.inject_nonfinite),
        grad_accum_steps=config.grad_accum_steps,
    )
    train_loop = create_train_loop(strategy, train_step, state, stats, config.xla, monitor)
    eval_loop = create_eval_loop(strategy, create_eval_step(state.model), config.xla)

    pipelines = []  # the input contexts the strategy builds this worker's pipelines with

    def train_fn(input_context):
        pipelines.append(input_context)
        return data.train_fn(input_context)

    def new_iterator():
        return iter(strategy.distribute_datasets_from_function(train_fn))

    iterator = new_iterator()
    checkpoint = checkpointing.create_checkpoint(state, iterator)
    # Only the chief writes to model_dir; other workers write to a temporary
    # folder, deleted at the end, and here if restoring fails.
    write_dir = distribute.WriteDir(model_dir, strategy)
    manager = checkpointing.create_manager(checkpoint, write_dir.path, config.keep_checkpoints)
    last_good, saved_step = None, None  # the checkpoint a failure falls back to
    if resume:
        # Every worker restores the chief's checkpoint, which all of them can read.
        source = manager if write_dir.chief else checkpointing.reader(model_dir)
        try:
            last_good = checkpointing.restore_latest(checkpoint, source, new_iterator)
        except BaseException:
            write_dir.cleanup()
            raise
        iterator = getattr(checkpoint, "iterator", iterator)  # replaced if it could not load
        saved_step = int(state.step.numpy())
        logging.info(
            "resuming from %s at step %d (loss scale %g)",
            last_good,
            saved_step,
            float(state.loss_scale.value.numpy()),
        )

    total = total_train_steps(config, data)
    per_epoch = steps_per_epoch(config, data)
    logging.info(
        "training %s on %s (%d classes) for %d steps, precision %s%s, model_dir %s",
        config.model,
        config.dataset,
        data.num_classes,
        total,
        config.precision,
        " + XLA" if config.xla else "",
        model_dir,
    )
    writer = summaries.SummaryWriter(write_dir.path)
    profiler = StepProfiler(config.profile_steps, write_dir.path, total)
    first_step_seconds = None
    timed_seconds = 0.0  # in the loops after the first, whose speed is measured
    values, eval_loss, eval_acc = {}, float("nan"), float("nan")
    step = start_step = int(state.step.numpy())
    profiler.warn_if_unreached(start_step)
    # What an earlier run logged after the checkpoint resumed from is not shown.
    writer.session_start(step + 1)
    interval, interval_seconds = {}, 0.0  # statistics since the last scalar write
    if step >= total:
        logging.info("already trained to step %d of %d: nothing to train", step, total)
    # Signals are caught from here on: a SIGTERM during start-up still saves and exits 0.
    try:
        with guards.stop_on_signals() as stop:
            shown_images, shown_labels = _write_run_start(
                writer, config, write_dir.path, data, pipelines[0]
            )
            probe = diagnostics.create_gradient_probe(train_step)
            while step < total and not stop:
                first_loop = first_step_seconds is None
                n = profiler.clip(step, _loop_size(config, step, total, per_epoch, first_loop))
                profiler.before_loop(step)
                t0 = time.perf_counter()
                train_loop(iterator, tf.constant(n, tf.int32))
                raw = stats.read_and_reset()
                interval_seconds += time.perf_counter() - t0
                _accumulate(interval, raw)
                step = int(state.step.numpy())
                profiler.after_loop(step)
                diverged = guards.divergence(
                    raw, step, policy.loss_scaling, config.max_consecutive_skips
                )
                # On a stop or a divergence too: the skips recorded since the last write
                # must reach TensorBoard and the log before the run ends, not be lost.
                if diverged or stop or _summary_due(step, total, config.summary_every, first_loop):
                    values = _loop_values(state, interval, config.batch_size)
                    readout = monitor.read_and_reset()
                    values.update(readout.scalars)
                    if first_loop:
                        # Tracing and compilation: a time, not a speed that squashes the curve.
                        first_step_seconds = interval_seconds
                        values["train/first_step_seconds"] = interval_seconds
                    else:
                        values.update(_speeds(interval, interval_seconds, config.batch_size))
                        timed_seconds += interval_seconds
                    interval, interval_seconds = {}, 0.0
                    writer.scalars(step, values)
                    summaries.report_nonfinite(writer, readout)
                    summaries.log_progress(step, total, values)
                # Before any save: a diverged state must never replace the last good checkpoint.
                if diverged:
                    _raise_diverged(diverged, step, state, last_good, stop)
                if config.histogram_every and step % config.histogram_every == 0:
                    grads = probe(shown_images, shown_labels)
                    writer.histograms(
                        step, summaries.weight_and_gradient_histograms(trainable, grads)
                    )
                if step % per_epoch == 0 and step < total:  # the last step's eval comes below
                    eval_loss, eval_acc = _evaluate(eval_loop, eval_data, writer, step)
                if stop or (config.checkpoint_every and step % config.checkpoint_every == 0):
                    last_good, saved_step = manager.save(checkpoint_number=step), step
            if saved_step != step:
                last_good = manager.save(checkpoint_number=step)
        # The loops' own time: eval, histograms, profiling, saves and export excluded.
        train_seconds = (first_step_seconds or 0.0) + timed_seconds
        timed_steps = step - start_step - 1  # the first loop (one step) is timed apart
        examples_per_sec = timed_steps * config.batch_size / timed_seconds if timed_seconds else 0.0
        # Only the call that trained the last step has timings; a re-run keeps them.
        if step == total and step > start_step:
            summaries.write_final_timings(writer, step, train_seconds, examples_per_sec)
        if stop:
            guards.log_stop(stop, step, last_good)
        else:
            # From here a stop signal ends the run at once (main.py: one line, exit
            # 128 + N): the last step is saved, and the next start, which has nothing
            # to train, redoes the final eval, its metrics and the export.
            eval_loss, eval_acc = _evaluate(eval_loop, eval_data, writer, step)
            skipped = int(state.skipped_steps.numpy())
            summaries.write_final_eval(writer, step, eval_acc, skipped)
            if config.export_dir:
                _export(config, write_dir, state.model, data.pixel_range)
        result = RunResult(
            model_dir=model_dir,
            steps=step,
            skipped_steps=int(state.skipped_steps.numpy()),
            loss_scale=float(state.loss_scale.value.numpy()),
            train_loss=values.get("train/loss", float("nan")),
            eval_loss=eval_loss,
            eval_accuracy=eval_acc,
            train_seconds=train_seconds,
            first_step_seconds=first_step_seconds or 0.0,
            examples_per_sec=examples_per_sec,
            stopped_by=stop.signal_name or "",
            trained_steps=step - start_step,
            weights_digest=weights_digest(state),
        )
        if not stop:
            _log_done(result)
    finally:
        profiler.stop()
        writer.close()
        write_dir.cleanup()
    return result


def _raise_diverged(diverged, step, state, last_good, stop):
    """Raises `TrainingDiverged`, carrying a stop signal of the same loop (nothing saved)."""
    reason, message = diverged
    last = last_good or "none (no checkpoint was written)"
    raise guards.TrainingDiverged(
        f"{message}; last good checkpoint: {last}",
        step=step,
        reason=reason,
        skipped_steps=int(state.skipped_steps.numpy()),
        loss_scale=float(state.loss_scale.value.numpy()),
        stopped_by=stop.signal_name or "",
    )


def _write_run_start(writer, config, model_dir, data, input_context):
    """Step-0 summaries: config, environment, flagfile, one input batch (returned).

    `input_context` is this worker's training pipeline's, as the strategy made it.
    """
    writer.scalars(0, {"data/skipped_images": data.skipped_images})
    # An absolute path: replayed from another folder, the flagfile resumes this run.
    resolved = config.replace(model_dir=os.path.abspath(model_dir))
    summaries.write_flagfile(resolved, model_dir)
    summaries.write_run_start(writer, resolved, device_type())
    # One fixed batch: shown as images now, and the batch the gradient histograms
    # use. A whole global batch where this worker is the only input pipeline;
    # with several, one of its own pipeline's batches, so that a worker never
    # decodes (or writes to a file cache) more than its own shard of the data.
    if input_context.num_input_pipelines == 1:
        input_context = None
    shown_images, shown_labels = next(iter(data.train_fn(input_context)))
    writer.images(0, "input/train_batch", summaries.as_displayable(shown_images))
    return shown_images, shown_labels


def _evaluate(eval_loop, eval_data, writer, step):
    """One pass over the eval data, written as `eval/*` at `step`; returns (loss, accuracy)."""
    loss, accuracy = (float(v) for v in eval_loop(eval_data))
    writer.scalars(step, {"eval/loss": loss, "eval/accuracy": accuracy})
    logging.info("eval at step %d: loss %.4f accuracy %.4f", step, loss, accuracy)
    return loss, accuracy


def _export(config, write_dir, model, pixel_range):
    # Every worker saves, the others into a temporary folder; the chief's counts.
    export_dir = config.export_dir if write_dir.chief else write_dir.path + "/export"
    export.export_saved_model(model, config.image_size, pixel_range, export_dir)
    logging.info("exported a float32 SavedModel to %s", export_dir)


def _accumulate(totals, raw):
    """Adds one loop's statistics into `totals` (the run of skips takes the maximum)."""
    for name, value in raw.items():
        if name == "max_consecutive_skips":
            totals[name] = max(totals.get(name, 0), value)
        else:
            totals[name] = totals.get(name, 0) + value


def _log_done(result):
    if not result.trained_steps:  # resumed when already trained: nothing was timed
        timing = "trained before"
    else:
        timing = f"in {result.train_seconds:.1f} s, first step {result.first_step_seconds:.1f} s"
        if result.examples_per_sec:  # the first step alone gives no rate
            timing += f", {result.examples_per_sec:.1f} ex/s"
    logging.info(
        "done: %d steps (%d skipped) %s, eval accuracy %.4f, loss scale %g, weights %s",
        result.steps,
        result.skipped_steps,
        timing,
        result.eval_accuracy,
        result.loss_scale,
        result.weights_digest,
    )


def _align(n, step, *every):
    """Shortens a loop of `n` steps so it ends on the next multiple of each `every` (0 = off)."""
    for e in every:
        if e:
            n = min(n, e - step % e)
    return n


def _summary_due(step, total, summary_every, first_loop):
    if first_loop or not summary_every or step == total:
        return True
    return step % summary_every == 0
