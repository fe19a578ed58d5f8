"""TensorBoard writing and the console line. Host-side only: never call from a step."""

import datetime

import tensorflow as tf
from absl import logging


class SummaryWriter:
    """One event-file writer under `--model_dir`; tags carry their `train/` or `eval/` prefix."""

    def __init__(self, logdir):
        self._writer = tf.summary.create_file_writer(logdir)

    def scalars(self, step, values):
        with self._writer.as_default(step=step):
            for tag, value in values.items():
                tf.summary.scalar(tag, value)

    def text(self, step, tag, markdown):
        with self._writer.as_default(step=step):
            tf.summary.text(tag, markdown)

    def flush(self):
        self._writer.flush()

    def close(self):
        self._writer.close()


def format_eta(seconds):
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def log_progress(step, total_steps, values, eta_seconds):
    """The console line written after every loop."""
    logging.info(
        "step %d/%d  loss %.4f  acc %.3f  scale %g  skipped %d  %.1f ex/s  lr %.2e  ETA %s",
        step,
        total_steps,
        values["train/loss"],
        values["train/accuracy"],
        values["train/loss_scale"],
        values["train/skipped_steps"],
        values["train/examples_per_sec"],
        values["train/learning_rate"],
        format_eta(eta_seconds),
    )
