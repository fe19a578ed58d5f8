"""`--profile_steps=START,END`: a TensorBoard profile trace of exactly those steps."""

import tensorflow as tf
from absl import logging

from engine.config import parse_profile_steps


class StepProfiler:
    """Starts the TF profiler when step START begins and stops it after step END.

    Loops are cut at START and END (`clip`), so the trace holds exactly the
    requested steps. The trace lands in `<logdir>/plugins/profile/`, where
    TensorBoard's profile plugin (`pip install tensorboard-plugin-profile`) finds it.
    """

    def __init__(self, spec, logdir):
        self._range = parse_profile_steps(spec) if spec else None
        self._logdir = logdir
        self._active = False

    def warn_if_unreached(self, start_step, total):
        """Logs a warning when no step of the range lies in this run's steps."""
        if self._range and (self._range[0] >= total or self._range[1] <= start_step):
            logging.warning(
                "--profile_steps=%d,%d: this run trains from step %d to %d, so no profile "
                "trace will be written",
                *self._range,
                start_step,
                total,
            )

    def clip(self, step, n):
        """The number of steps the next loop may run so it stops at a boundary."""
        if self._range is None:
            return n
        for boundary in self._range:
            if step < boundary:
                n = min(n, boundary - step)
        return n

    def before_loop(self, step):
        if self._range and not self._active and self._range[0] <= step < self._range[1]:
            tf.profiler.experimental.start(self._logdir)
            self._active = True
            logging.info("profiling steps %d-%d into %s", step, self._range[1], self._logdir)

    def after_loop(self, step):
        if self._active and step >= self._range[1]:
            self.stop()

    def stop(self):
        if self._active:
            tf.profiler.experimental.stop()
            self._active = False
