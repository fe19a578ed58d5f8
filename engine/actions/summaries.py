"""TensorBoard writing and the console line. Host-side only: never call from a step."""

import dataclasses
import datetime
import math
import os
import time

import keras
import tensorflow as tf
from absl import logging
from tensorboard.compat.proto import event_pb2
from tensorboard.plugins.hparams import api as hp

from engine import config as config_lib
from engine import files, optimizers, run_paths
from engine.actions import dashboard
from engine.loop import Action, steps_to_multiple
from engine.precision import get_policy

# The run's final numbers, written once at the end: the HParams dashboard's metrics.
FINAL_METRICS = (
    ("final/eval_accuracy", "eval accuracy"),
    ("final/examples_per_sec", "examples/s"),
    ("final/skipped_steps", "skipped steps"),
    ("final/train_seconds", "training time (s)"),
)
# Flags that name places, not settings: left out of the HParams table.
_NOT_HPARAMS = ("model_dir", "compare")
FLAGFILE = "flags.txt"


class SummaryWriter:
    """One event-file writer under `--model_dir`; tags carry their `train/` or `eval/` prefix."""

    def __init__(self, logdir):
        self.logdir = logdir
        self._writer = tf.summary.create_file_writer(logdir)
        self._described = set()  # tags whose description this writer wrote

    def session_start(self, step):
        """Marks the summaries from `step` on as this run's.

        Each start writes a `SessionLog.START` event. TensorBoard's Python loader
        (`--load_fast=false`) takes every one after a run's first as a restart and
        drops the summaries it holds at `step` or later, in every tag: those a
        crashed run wrote after the checkpoint this run resumed from, which would
        otherwise be drawn twice. (The default fast loader ignores START and drops
        a tag's later points only when that tag is logged again.) TF2's summary
        API has no call for it, so the event goes through the writer's resource.
        """
        event = event_pb2.Event(
            step=step,
            wall_time=time.time(),
            session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START),
        )
        tf.raw_ops.ImportEvent(writer=self._writer._resource, event=event.SerializeToString())

    def scalars(self, step, values):
        """Writes `values` ({tag: number}); a tag's first write carries its description."""
        with self._writer.as_default(step=step):
            for tag, value in values.items():
                description = None
                if tag not in self._described:
                    description = dashboard.DESCRIPTIONS.get(tag)
                    self._described.add(tag)
                tf.summary.scalar(tag, value, description=description)

    def layout(self, with_float8=False):
        """The custom-scalars dashboard's layout (`dashboard.LAYOUT`), at step 0."""
        with self._writer.as_default(step=0):
            dashboard.write_layout(with_float8)

    def text(self, step, tag, markdown):
        with self._writer.as_default(step=step):
            tf.summary.text(tag, markdown)

    def histograms(self, step, values):
        """Writes `values` ({tag: tensor}); described as `scalars` are."""
        with self._writer.as_default(step=step):
            for tag, value in values.items():
                description = None
                if tag not in self._described:
                    description = dashboard.DESCRIPTIONS.get(tag)
                    self._described.add(tag)
                tf.summary.histogram(tag, value, description=description)

    def images(self, step, tag, images, max_outputs=8):
        with self._writer.as_default(step=step):
            tf.summary.image(tag, images, max_outputs=max_outputs)

    def hparams(self, config):
        """The run's flags for the HParams dashboard, and the dashboard's layout."""
        values = hparams_of(config)
        with self._writer.as_default(step=0):
            hp.hparams_config(
                hparams=[hp.HParam(name, _domain(name, value)) for name, value in values.items()],
                metrics=[hp.Metric(tag, display_name=name) for tag, name in FINAL_METRICS],
            )
            # The whole path: compare runs in different parents share a base name
            # (fp32, mixed-xla, ...), and HParams would merge them into one group.
            hp.hparams(values, trial_id=os.path.abspath(self.logdir))

    def flush(self):
        self._writer.flush()

    def close(self):
        self._writer.close()


def format_eta(seconds):
    # Clamped to 10**12 s: `timedelta` ends at 1e9 days, and nan has no int.
    seconds = 10**12 if math.isnan(seconds) else min(max(seconds, 0), 10**12)
    return str(datetime.timedelta(seconds=int(seconds)))


def log_progress(step, total_steps, values):
    """The console line written after every scalar write.

    After the first step (tracing, compilation) it shows that step's time: a
    speed or an ETA from it would be far off.
    """
    if "train/examples_per_sec" in values:
        speed = f"{values['train/examples_per_sec']:.1f} ex/s"
        remaining = (total_steps - step) / max(values["train/steps_per_sec"], 1e-9)
        eta = f"  ETA {format_eta(remaining)}"
    else:
        speed, eta = f"first step {values['train/first_step_seconds']:.1f} s", ""
    logging.info(
        "step %d/%d  loss %.4f  acc %.3f  scale %g  skipped %d  %s  lr %.2e%s",
        step,
        total_steps,
        values["train/loss"],
        values["train/accuracy"],
        values["train/loss_scale"],
        values["train/skipped_steps"],
        speed,
        values["train/learning_rate"],
        eta,
    )


# The same domains for every run, so runs started apart agree on the dashboard's
# layout (the plugin takes the layout from any one run under the logdir).
_CHOICES = {
    "mode": config_lib.MODES,
    "precision": config_lib.PRECISIONS,
    "fp8_recipe": config_lib.FP8_RECIPES,
    "model": config_lib.MODELS,
    "optimizer": config_lib.OPTIMIZERS,
    "lr_schedule": config_lib.LR_SCHEDULES,
}


def _domain(name, value):
    if name in _CHOICES:
        return hp.Discrete(list(_CHOICES[name]))
    if isinstance(value, bool):
        return hp.Discrete([False, True])
    if isinstance(value, int):
        return hp.IntInterval(0, 2**31 - 1)
    if isinstance(value, float):
        return hp.RealInterval(0.0, float("inf"))
    return None  # free-form strings (dataset, loss_scale): the plugin shows them as text


def hparams_of(config):
    return {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if f.name not in _NOT_HPARAMS
    }


def markdown_table(header, rows):
    """A Markdown table (TensorBoard's text dashboard renders it)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def environment(precision, xla, device):
    return {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "device": device,
        "precision": precision,
        "xla": xla,
    }


def write_run_start(writer, config, device):
    """Step 0: the resolved configuration, the environment and the HParams entry."""
    fields = [(f.name, getattr(config, f.name)) for f in dataclasses.fields(config)]
    writer.text(0, "run/config", markdown_table(["flag", "value"], fields))
    env = environment(config.precision, config.xla, device)
    writer.text(0, "run/environment", markdown_table(["component", "value"], env.items()))
    writer.hparams(config)
    writer.layout(with_float8=get_policy(config.precision).float8)


def write_flagfile(config, model_dir):
    """`<model_dir>/flags.txt`: `python main.py --flagfile=<it>` repeats the run."""
    os.makedirs(model_dir, exist_ok=True)
    path = os.path.join(model_dir, FLAGFILE)
    with files.written_whole(path) as f:  # a re-run's stop signal keeps the old file
        f.write(run_paths.to_flagfile(config))
    return path


def as_displayable(images):
    """Min-max to [0, 1] per batch, so any pipeline's normalisation shows."""
    images = tf.cast(images, tf.float32)
    low, high = tf.reduce_min(images), tf.reduce_max(images)
    return (images - low) / tf.maximum(high - low, 1e-6)


def report_nonfinite(writer, readout):
    """`train/nonfinite_events` at each recorded step, and which gradients were bad."""
    for step, names in readout.events:
        writer.scalars(step, {"train/nonfinite_events": 1.0})
        listed = ", ".join(names)
        writer.text(
            step,
            "train/nonfinite_variables",
            f"step {step}: non-finite gradients in " + ", ".join(f"`{n}`" for n in names),
        )
        logging.warning("step %d skipped: non-finite gradients in %s", step, listed)
    if readout.dropped:
        logging.warning(
            "%d more non-finite steps since the last summary are not itemised", readout.dropped
        )


def weight_and_gradient_histograms(variables, grads):
    """{tag: tensor} for `--histogram_every`: `weights/<path>` and `gradients/<path>`."""
    values = {}
    for var, grad in zip(variables, grads, strict=True):
        values[f"weights/{var.path}"] = var.value
        values[f"gradients/{var.path}"] = grad
    return values


def write_final_timings(writer, step, train_seconds, examples_per_sec):
    """HParams' timing metrics (see `FINAL_METRICS`), from the call that trained the last step.

    A later start with nothing to train does not write them: its zeros would
    replace the training's figures.
    """
    writer.scalars(
        step,
        {"final/examples_per_sec": examples_per_sec, "final/train_seconds": train_seconds},
    )


def write_final_eval(writer, step, eval_accuracy, skipped_steps):
    """HParams' other metrics, after every final eval (a re-run redoes an interrupted one)."""
    writer.scalars(
        step, {"final/eval_accuracy": eval_accuracy, "final/skipped_steps": skipped_steps}
    )


class Summaries(Action):
    """Writes the scalars and the console line every `--summary_every` steps.

    Statistics add up over the loops since the last write. The run's first loop
    (one step: tracing and compilation) is written as `train/first_step_seconds`,
    never as a speed. A stop or a divergence writes at once, so the skips recorded
    since the last write reach TensorBoard and the log before the run ends.
    """

    def __init__(self, writer, state, step, batch_size, summary_every, write_at=()):
        # `step`: the current step (`train_run.CurrentStep`); its monitor is read
        # at each write, so a step rebuilt at --freeze_steps is the one read.
        self.writer, self.state, self.step = writer, state, step
        self.batch_size, self.summary_every = batch_size, summary_every
        self.write_at = set(write_at)  # steps written whatever the cadence (a new step after)
        self.interval, self.interval_seconds = {}, 0.0  # since the last write
        self.first_step_seconds = None
        self.timed_seconds = 0.0  # in the loops after the first, whose speed is measured
        self.values = {}  # the last written

    def steps_to_boundary(self, step):
        return steps_to_multiple(self.summary_every, step)

    def __call__(self, record):
        self.interval_seconds += record.seconds
        _accumulate(self.interval, record.stats)
        due = not self.summary_every or record.step % self.summary_every == 0
        # A stop or a divergence writes at once: its skips must not be lost.
        urgent = record.first or record.step == record.total or record.stop or record.diverged
        urgent = urgent or record.step in self.write_at
        if not (due or urgent):
            return
        values = _loop_values(self.state, self.interval, self.batch_size)
        readout = self.step.monitor.read_and_reset()
        values.update(readout.scalars)
        per_layer = self.state.float8.read_per_layer()  # {} unless float8 records
        values.update(self.state.float8.read_and_reset())
        if record.first:
            self.first_step_seconds = self.interval_seconds
            values["train/first_step_seconds"] = self.interval_seconds
        else:
            values.update(_speeds(self.interval, self.interval_seconds, self.batch_size))
            self.timed_seconds += self.interval_seconds
        self.interval, self.interval_seconds, self.values = {}, 0.0, values
        self.writer.scalars(record.step, values)
        self.writer.histograms(record.step, {f"{t}_by_layer": v for t, v in per_layer.items()})
        report_nonfinite(self.writer, readout)
        log_progress(record.step, record.total, values)

    @property
    def train_seconds(self):
        """Time in the training loops, the first included (no eval, saves or export)."""
        return (self.first_step_seconds or 0.0) + self.timed_seconds


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


def _accumulate(totals, raw):
    """Adds one loop's statistics into `totals` (the run of skips takes the maximum)."""
    for name, value in raw.items():
        if name == "max_consecutive_skips":
            totals[name] = max(totals.get(name, 0), value)
        else:
            totals[name] = totals.get(name, 0) + value
