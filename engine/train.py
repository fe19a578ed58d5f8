"""The train mode: a `Config` wired into the core loop and its actions.

`train_and_evaluate(config, model_dir)` builds a `TrainRun` (`build_run`: the
strategy, the data, the train state with its starting or restored weights,
the step, the checkpoint and the TensorBoard writer), then hands the outer loop
(`loop.run_loops`) its actions, in the order they act after each inner loop:

  profiler → divergence check → summaries → stop on divergence → histograms
  → eval (BatchNorm statistics recomputed first) → checkpoints [→ unfreeze]

and, once training ends: BatchNorm statistics, the last save, the final eval
and the export. Preemption (SIGTERM, SIGINT) sets the stop flag the loop and
the checkpoint action read.
"""

import dataclasses
import os

from absl import logging

from engine import initialization, loop, machine, train_run
from engine.actions import (
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
from engine.precision import get_policy


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


def train_and_evaluate(config, model_dir):
    """Trains `config` with summaries and checkpoints in `model_dir`; returns a `RunResult`.

    Resumes from the newest readable checkpoint in `model_dir` (see
    `checkpoints.prepare_model_dir` for the rules).

    Raises:
      ConfigError: `--fresh` on a directory with checkpoints, or a flag that
        does not match them.
      checkpoints.DamagedCheckpoints: checkpoints exist but none can be read.
      divergence.TrainingDiverged: the divergence guard stopped the run.
    """
    config = machine.resolve(config, model_dir)  # --precision=auto decided
    config = initialization.resolve_preprocessing(config, model_dir)
    run = train_run.build_run(config, model_dir)
    _log_start(config, run)
    writer = summaries.SummaryWriter(run.write_dir.path)
    profiler = StepProfiler(config.profile_steps, run.write_dir.path, run.total)
    profiler.warn_if_unreached(run.start_step)
    # What an earlier run logged after the checkpoint resumed from is not shown.
    writer.session_start(run.start_step + 1)
    try:
        # Signals are caught from here on: a SIGTERM during start-up still saves and exits 0.
        with preemption.stop_on_signals() as stop, train_run.images_named_if_they_fail(run.data):
            actions = create_actions(config, run, writer, profiler)
            step = loop.run_loops(
                run.step,
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
        return _finish(config, run, writer, actions, step, stop)
    finally:
        profiler.stop()
        writer.close()
        run.write_dir.cleanup()


def create_actions(config, run, writer, profiler):
    """The outer loop's actions, in the order they act; features that are off are absent."""
    images, labels = _write_run_start(writer, config, run)
    saves = checkpointing.Checkpoints(
        run.manager, config.checkpoint_every, run.last_good, run.saved_step
    )
    summary = summaries.Summaries(
        writer,
        run.state,
        run.step,
        config.batch_size,
        config.summary_every,
        write_at=(config.freeze_steps,),
    )
    evaluation = Evaluation(
        run.eval_loop,
        run.eval_data,
        writer,
        train_run.steps_per_epoch(config.batch_size, run.data),
        run.recalibrate,
    )
    actions = [
        profiler,
        divergence.CheckDivergence(
            get_policy(config.precision).loss_scaling, config.max_consecutive_skips
        ),
        summary,
        divergence.StopOnDivergence(run.state, saves),
    ]
    if config.histogram_every:
        actions.append(Histograms(writer, run.step, images, labels, config.histogram_every))
    actions += [evaluation, saves]
    if run.start_step < config.freeze_steps:
        actions.append(freezing.Unfreeze(config.freeze_steps, run.state.model, run.step))
    return Actions(actions, saves, summary, evaluation)


@dataclasses.dataclass
class Actions:
    """The outer loop's actions in order, and those `train_and_evaluate` calls itself."""

    all: list
    checkpoints: checkpointing.Checkpoints
    summaries: summaries.Summaries
    evaluation: Evaluation


def _log_start(config, run):
    logging.info(
        "training %s on %s (%d classes) for %d steps, precision %s%s, model_dir %s",
        config.model,
        config.dataset,
        run.data.num_classes,
        run.total,
        config.precision,
        " + XLA" if config.xla else "",
        run.model_dir,
    )
    if run.start_step >= run.total:
        logging.info(
            "already trained to step %d of %d: nothing to train", run.start_step, run.total
        )


def _finish(config, run, writer, actions, step, stop):
    """Final timings, then (unless stopped) the final eval, its metrics and the export."""
    summary, evaluation = actions.summaries, actions.evaluation
    train_seconds = summary.train_seconds
    timed_steps = step - run.start_step - 1  # the first loop (one step) is timed apart
    timed = summary.timed_seconds
    examples_per_sec = timed_steps * config.batch_size / timed if timed else 0.0
    # Only the call that trained the last step has timings; a re-run keeps them.
    if step == run.total and step > run.start_step:
        summaries.write_final_timings(writer, step, train_seconds, examples_per_sec)
    if stop:
        preemption.log_stop(stop, step, actions.checkpoints.last_good)
    else:
        # From here a stop signal ends the run at once (main.py: one line, exit
        # 128 + N): the last step is saved, and the next start, which has nothing
        # to train, redoes the final eval, its metrics and the export.
        evaluation.evaluate(step)
        skipped = int(run.state.skipped_steps.numpy())
        summaries.write_final_eval(writer, step, evaluation.accuracy, skipped)
        if config.export_dir:
            _export(
                config.export_dir,
                config.image_size,
                run.write_dir,
                run.state,
                run.data.pixel_range,
            )
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


def _write_run_start(writer, config, run):
    """Step-0 summaries: config, environment, flagfile, one input batch (returned)."""
    model_dir, data = run.write_dir.path, run.data
    if data.skipped_images:  # TensorBoard's first cards: a lone 0 would open the Time Series
        writer.scalars(0, {"data/skipped_images": data.skipped_images})
    # An absolute path: replayed from another folder, the flagfile resumes this run.
    resolved = config.replace(model_dir=os.path.abspath(model_dir))
    summaries.write_flagfile(resolved, model_dir)
    summaries.write_run_start(writer, resolved, train_run.device_type())
    # One fixed batch: shown as images now, and the batch the gradient histograms
    # use. A whole global batch where this worker is the only input pipeline;
    # with several, one of its own pipeline's batches, so that a worker never
    # decodes (or writes to a file cache) more than its own shard of the data.
    input_context = run.input_pipelines[0]
    if input_context.num_input_pipelines == 1:
        input_context = None
    shown_images, shown_labels = next(iter(data.train_fn(input_context)))
    writer.images(0, "input/train_batch", summaries.as_displayable(shown_images))
    return shown_images, shown_labels


def _export(export_dir, image_size, write_dir, state, pixel_range):
    # Every worker saves, the others into a temporary folder; the chief's counts.
    export_dir = export_dir if write_dir.chief else write_dir.path + "/export"
    export.export_saved_model(state.model, image_size, pixel_range, export_dir, state.float8.state)
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
