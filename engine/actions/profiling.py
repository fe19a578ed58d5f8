"""`--profile_steps=START,END`: a TensorBoard profile trace of exactly steps START to END."""

import tensorflow as tf
from absl import logging

from engine.loop import Action
from engine.validation import parse_profile_steps


class StepProfiler(Action):
    """Starts the TF profiler before step START and stops it after step END.

    Steps are numbered as the console and `--inject_nonfinite` number them (the
    first is 1), and both ends are traced. Loops are cut before START and after
    END (`steps_to_boundary`), so the trace holds exactly the requested steps. The trace lands
    in `<logdir>/plugins/profile/`, where TensorBoard's profile plugin
    (`pip install tensorboard-plugin-profile`) finds it.
    """

    def __init__(self, spec, logdir, total):
        self._range = parse_profile_steps(spec) if spec else None
        self._logdir = logdir
        self._total = total  # the run's last step
        self._active = False

    def warn_if_unreached(self, start_step):
        """Logs a warning when no step of the range lies in this run's steps."""
        total = self._total
        if self._range and (self._range[0] > total or self._range[1] <= start_step):
            trains = f"steps {start_step + 1}-{total}" if start_step < total else "no step"
            logging.warning(
                "--profile_steps=%d,%d: this run trains %s, so no profile trace will be written",
                *self._range,
                trains,
            )

    def steps_to_boundary(self, step):
        """Steps to the next range boundary after `step` steps done, or None."""
        if self._range is None:
            return None
        # Boundaries in steps done: START - 1 (the trace starts before step START) and END.
        ahead = [b - step for b in (self._range[0] - 1, self._range[1]) if step < b]
        return min(ahead, default=None)

    def before_loop(self, step):
        """Starts the trace if the loop about to run (from step `step + 1`) is in the range."""
        start, end = self._range or (0, 0)
        if not self._active and start <= step + 1 <= end:
            tf.profiler.experimental.start(self._logdir)
            self._active = True
            last = min(end, self._total)
            logging.info("profiling steps %d-%d into %s", step + 1, last, self._logdir)

    def __call__(self, record):
        self.after_loop(record.step)

    def after_loop(self, step):
        if self._active and step >= self._range[1]:
            self.stop()

    def stop(self):
        if self._active:
            tf.profiler.experimental.stop()
            self._active = False
