"""The train mode: a `Config` wired into the core loop and its actions.

`train_and_evaluate(config, model_dir)` builds the strategy, the data, the
train state and the step, restores the newest checkpoint, then hands the
outer loop (`loop.run_loops`) its actions, in the order they act after each
inner loop:

  profiler → divergence check → summaries → stop on divergence → histograms
  → eval (BatchNorm statistics recomputed first) → checkpoints

and, once training ends: BatchNorm statistics, the last save, the final eval
and the export.
Preemption (SIGTERM, SIGINT) sets the stop flag the loop and the checkpoint
action read.
"""

import contextlib
import dataclasses
import os
import types

import keras
import tensorflow as tf
from absl import logging

from engine import config as config_lib
from engine import distribute, initialization, loop, machine, optimizers, validation
from engine.actions import (
    batch_norm_stats,
    checkpointing,
    divergence,
    export,
    freezing,
    preemption,
    summaries,
)
from engine.actions.evaluation import Evaluation
from engine.actions.histograms import Histograms
from engine.actions.profiling import StepProfiler
from engine.data import data_config
from engine.extras import create_train_step, diagnostics
from engine.loss_scale import create_loss_scale
from engine.precision import get_policy, slow_combination_warning
from engine.step import create_eval_step
from input_pipeline import create_data
from input_pipeline.preprocessing import PIXEL_RANGE, DataError
from models import create_model


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


def device_type():
    return "GPU" if tf.config.list_physical_devices("GPU") else "CPU"


def create_model_for(config, num_classes, pixel_range=PIXEL_RANGE):
    """The run's model under its precision's policy, fed pixels in `pixel_range`.

    BatchNorm runs on TensorFlow's fused kernels unless XLA compiles the step
    (see `models.batch_norm`: faster on TensorFlow's kernels, slower under XLA).
    `--preprocessing=caffe` puts Keras' ResNet50 input step in the model (see
    `models.inputs`); "auto" is decided before (`initialization.resolve_preprocessing`).
    """
    policy = get_policy(config.precision)
    return create_model(
        config.model,
        num_classes,
        config.image_size,
        policy.keras_policy,
        fused_batch_norm=not config.xla,
        preprocessing="caffe" if config.preprocessing == "caffe" else "scaled",
        pixel_range=pixel_range,
        patch_size=config.patch_size,
        stochastic_depth=config.stochastic_depth,
    )


def build_state(config, data, strategy):
    """Creates model, optimizer and loss scale under the strategy, all built."""
    policy = get_policy(config.precision)
    total_steps = total_train_steps(config, data)
    with strategy.scope():
        model = create_model_for(config, data.num_classes, data.pixel_range)
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
        return loop.TrainState(model, optimizer, loss_scale)


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


def train_and_evaluate(config, model_dir):
    """Trains `config` with summaries and checkpoints in `model_dir`; returns a `RunResult`.

    Resumes from the newest readable checkpoint in `model_dir` (see
    `checkpointing.prepare_model_dir` for the rules).

    Raises:
      ConfigError: `--fresh` on a directory with checkpoints, or a flag that
        does not match them.
      checkpointing.DamagedCheckpoints: checkpoints exist but none can be read.
      divergence.TrainingDiverged: the divergence guard stopped the run.
    """
    config = machine.resolve(config, model_dir)  # --precision=auto decided
    config = initialization.resolve_preprocessing(config, model_dir)
    run = _prepare(config, model_dir)
    _build(config, run)
    _restore(config, run)
    run.start_step = int(run.state.step.numpy())
    # Frozen until --freeze_steps (a resume past it starts unfrozen); see `freezing`.
    freezing.set_frozen(run.state.model, run.start_step < config.freeze_steps)
    _build_step(config, run)
    run.total = total_train_steps(config, run.data)
    logging.info(
        "training %s on %s (%d classes) for %d steps, precision %s%s, model_dir %s",
        config.model,
        config.dataset,
        run.data.num_classes,
        run.total,
        config.precision,
        " + XLA" if config.xla else "",
        model_dir,
    )
    run.writer = summaries.SummaryWriter(run.write_dir.path)
    run.profiler = StepProfiler(config.profile_steps, run.write_dir.path, run.total)
    run.profiler.warn_if_unreached(run.start_step)
    # What an earlier run logged after the checkpoint resumed from is not shown.
    run.writer.session_start(run.start_step + 1)
    if run.start_step >= run.total:
        logging.info(
            "already trained to step %d of %d: nothing to train", run.start_step, run.total
        )
    try:
        # Signals are caught from here on: a SIGTERM during start-up still saves and exits 0.
        with preemption.stop_on_signals() as stop, _images_named_if_they_fail(run.data):
            actions = _create_actions(config, run)
            step = loop.run_loops(
                lambda iterator, n: run.train_loop(iterator, n),  # --freeze_steps rebuilds it
                run.iterator,
                run.state,
                run.stats,
                run.total,
                config.steps_per_loop,
                actions.all,
                stop,
            )
            # The last checkpoint (the one --mode=predict restores) holds the
            # statistics the final eval and the export use.
            recalibrated = not stop and run.recalibrate(step)
            actions.checkpoints.save_unless_saved(step, changed=recalibrated)
        return _finish(config, run, actions, step, stop)
    finally:
        run.profiler.stop()
        run.writer.close()
        run.write_dir.cleanup()


@contextlib.contextmanager
def _images_named_if_they_fail(data):
    """An image file that fails mid-run (changed or gone since the start-up check) is named.

    Checkpoints already written stay; a rerun checks the changed file again at
    start-up (and skips it with --skip_bad_images).
    """
    try:
        yield
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError):
        bad = data.find_bad_files() if data.find_bad_files else []
        if not bad:
            raise
        raise DataError(
            f"image {bad[0]} can no longer be read or decoded (it passed the check at "
            "start-up); fix or remove it, then rerun to resume from the last checkpoint"
        ) from None


def _prepare(config, model_dir):
    """Strategy, seeds, data and the model_dir checks: everything before the state."""
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
    # Before model_dir: bad data must leave no trace there.
    data = create_data(data_config(config))
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
    return types.SimpleNamespace(
        model_dir=model_dir,
        policy=policy,
        strategy=strategy,
        data=data,
        eval_data=eval_data,
        resume=resume,
    )


def _build(config, run):
    """The train state, with its starting weights, the loop statistics and the eval loop."""
    run.state = build_state(config, run.data, run.strategy)
    if not run.resume:  # a resumed run restores its own weights
        with run.strategy.scope():
            initialization.initialize(
                config, run.state.model, run.data.num_classes, run.data.pixel_range
            )
    run.stats = loop.LoopStats()
    run.eval_loop = loop.create_eval_loop(
        run.strategy, create_eval_step(run.state.model), config.xla
    )


def _build_step(config, run):
    """The step over the trainable weights, with the extras the config asks for, and its loop."""
    run.monitor = diagnostics.StepMonitor(
        [v.path for v in run.state.model.trainable_variables],
        precision_diagnostics=config.precision_diagnostics,
    )
    run.train_step = create_train_step(
        run.state.model,
        run.state.optimizer,
        run.state.loss_scale,
        config.batch_size,
        config.clip_norm,
        class_weights=run.data.class_weights,
        precision_diagnostics=config.precision_diagnostics,
        inject=validation.parse_inject_nonfinite(config.inject_nonfinite),
        grad_accum_steps=config.grad_accum_steps,
        label_smoothing=config.label_smoothing,
    )
    run.train_loop = loop.create_train_loop(
        run.strategy, run.train_step, run.state, run.stats, config.xla, run.monitor
    )


def _restore(config, run):
    """The training iterator and the checkpoint; restores the newest one when resuming."""
    strategy = run.strategy
    run.pipelines = []  # the input contexts the strategy builds this worker's pipelines with

    def train_fn(input_context):
        run.pipelines.append(input_context)
        return run.data.train_fn(input_context)

    def new_iterator():
        return iter(strategy.distribute_datasets_from_function(train_fn))

    # Making it decodes every image into memory (or a file cache): one that broke
    # since the start-up check is named here too, not only mid-run.
    with _images_named_if_they_fail(run.data):
        run.iterator = new_iterator()
    run.recalibrate = batch_norm_stats.create_recalibration(
        config, strategy, run.state.model, run.data
    )
    run.checkpoint = checkpointing.create_checkpoint(run.state, run.iterator)
    # Only the chief writes to model_dir; other workers write to a temporary
    # folder, deleted at the end, and here if restoring fails.
    run.write_dir = distribute.WriteDir(run.model_dir, strategy)
    run.manager = checkpointing.create_manager(
        run.checkpoint, run.write_dir.path, config.keep_checkpoints
    )
    run.last_good, run.saved_step = None, None  # the checkpoint a failure falls back to
    if not run.resume:
        return
    # Every worker restores the chief's checkpoint, which all of them can read.
    source = run.manager if run.write_dir.chief else checkpointing.reader(run.model_dir)
    try:
        run.last_good = checkpointing.restore_latest(run.checkpoint, source, new_iterator)
    except BaseException:
        run.write_dir.cleanup()
        raise
    run.iterator = getattr(run.checkpoint, "iterator", run.iterator)  # replaced if unreadable
    run.saved_step = int(run.state.step.numpy())
    logging.info(
        "resuming from %s at step %d (loss scale %g)",
        run.last_good,
        run.saved_step,
        float(run.state.loss_scale.value.numpy()),
    )


def _create_actions(config, run):
    """The outer loop's actions, in the order they act; features that are off are absent."""
    images, labels = _write_run_start(run.writer, config, run.write_dir.path, run.data, run)
    checkpoints = checkpointing.Checkpoints(
        run.manager, config.checkpoint_every, run.last_good, run.saved_step
    )
    summary = summaries.Summaries(
        run.writer,
        run.state,
        run.monitor,
        config.batch_size,
        config.summary_every,
        write_at=(config.freeze_steps,),
    )
    evaluation = Evaluation(
        run.eval_loop,
        run.eval_data,
        run.writer,
        steps_per_epoch(config, run.data),
        run.recalibrate,
    )
    actions = [
        run.profiler,
        divergence.CheckDivergence(run.policy.loss_scaling, config.max_consecutive_skips),
        summary,
        divergence.StopOnDivergence(run.state, checkpoints),
    ]

    def histograms():
        return Histograms(run.writer, run.train_step, images, labels, config.histogram_every)

    if config.histogram_every:
        actions.append(histograms())
    actions += [evaluation, checkpoints]
    if run.start_step < config.freeze_steps:

        def rebuild_step():  # the actions that hold the frozen step take the new one
            _build_step(config, run)
            summary.monitor = run.monitor  # read at the boundary (`write_at`)
            if config.histogram_every:
                actions[next(i for i, a in enumerate(actions) if isinstance(a, Histograms))] = (
                    histograms()
                )

        actions.append(freezing.Unfreeze(config.freeze_steps, run.state.model, rebuild_step))
    return types.SimpleNamespace(
        all=actions, checkpoints=checkpoints, summaries=summary, evaluation=evaluation
    )


def _finish(config, run, actions, step, stop):
    """Final timings, then (unless stopped) the final eval, its metrics and the export."""
    summary, evaluation = actions.summaries, actions.evaluation
    train_seconds = summary.train_seconds
    timed_steps = step - run.start_step - 1  # the first loop (one step) is timed apart
    timed = summary.timed_seconds
    examples_per_sec = timed_steps * config.batch_size / timed if timed else 0.0
    # Only the call that trained the last step has timings; a re-run keeps them.
    if step == run.total and step > run.start_step:
        summaries.write_final_timings(run.writer, step, train_seconds, examples_per_sec)
    if stop:
        preemption.log_stop(stop, step, actions.checkpoints.last_good)
    else:
        # From here a stop signal ends the run at once (main.py: one line, exit
        # 128 + N): the last step is saved, and the next start, which has nothing
        # to train, redoes the final eval, its metrics and the export.
        evaluation.evaluate(step)
        skipped = int(run.state.skipped_steps.numpy())
        summaries.write_final_eval(run.writer, step, evaluation.accuracy, skipped)
        if config.export_dir:
            _export(config, run.write_dir, run.state.model, run.data.pixel_range)
    result = RunResult(
        model_dir=run.model_dir,
        steps=step,
        skipped_steps=int(run.state.skipped_steps.numpy()),
        loss_scale=float(run.state.loss_scale.value.numpy()),
        train_loss=summary.values.get("train/loss", float("nan")),
        eval_loss=evaluation.loss,
        eval_accuracy=evaluation.accuracy,
        train_seconds=train_seconds,
        first_step_seconds=summary.first_step_seconds or 0.0,
        examples_per_sec=examples_per_sec,
        stopped_by=stop.signal_name or "",
        trained_steps=step - run.start_step,
        weights_digest=loop.weights_digest(run.state),
    )
    if not stop:
        _log_done(result)
    return result


def _write_run_start(writer, config, model_dir, data, run):
    """Step-0 summaries: config, environment, flagfile, one input batch (returned)."""
    writer.scalars(0, {"data/skipped_images": data.skipped_images})
    # An absolute path: replayed from another folder, the flagfile resumes this run.
    resolved = config.replace(model_dir=os.path.abspath(model_dir))
    summaries.write_flagfile(resolved, model_dir)
    summaries.write_run_start(writer, resolved, device_type())
    # One fixed batch: shown as images now, and the batch the gradient histograms
    # use. A whole global batch where this worker is the only input pipeline;
    # with several, one of its own pipeline's batches, so that a worker never
    # decodes (or writes to a file cache) more than its own shard of the data.
    input_context = run.pipelines[0]
    if input_context.num_input_pipelines == 1:
        input_context = None
    shown_images, shown_labels = next(iter(data.train_fn(input_context)))
    writer.images(0, "input/train_batch", summaries.as_displayable(shown_images))
    return shown_images, shown_labels


def _export(config, write_dir, model, pixel_range):
    # Every worker saves, the others into a temporary folder; the chief's counts.
    export_dir = config.export_dir if write_dir.chief else write_dir.path + "/export"
    export.export_saved_model(model, config.image_size, pixel_range, export_dir)
    logging.info("exported a float32 SavedModel to %s", export_dir)


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
