"""Eval after each epoch, and the run's final eval."""

from absl import logging

from engine.loop import Action, steps_to_multiple


class Evaluation(Action):
    """One pass over the eval data at the end of each epoch, written as `eval/*`.

    The last step's eval is the run's final one, done once training ends
    (`evaluate`), after the last checkpoint is saved. `recalibrate` (see
    `batch_norm_stats`) recomputes BatchNorm's statistics before each epoch's
    eval; before the final one, `engine.train` has already done it.
    """

    def __init__(self, eval_loop, eval_data, writer, steps_per_epoch, recalibrate):
        self.eval_loop, self.eval_data, self.writer = eval_loop, eval_data, writer
        self.steps_per_epoch, self.recalibrate = steps_per_epoch, recalibrate
        self.loss, self.accuracy = float("nan"), float("nan")

    def steps_to_boundary(self, step):
        return steps_to_multiple(self.steps_per_epoch, step)

    def __call__(self, record):
        if record.step % self.steps_per_epoch == 0 and record.step < record.total:
            self.recalibrate(record.step)
            self.evaluate(record.step)

    def evaluate(self, step):
        """Evaluates now; writes `eval/loss` and `eval/accuracy` at `step`."""
        self.loss, self.accuracy = (float(v) for v in self.eval_loop(self.eval_data))
        self.writer.scalars(step, {"eval/loss": self.loss, "eval/accuracy": self.accuracy})
        logging.info("eval at step %d: loss %.4f accuracy %.4f", step, self.loss, self.accuracy)
        return self.loss, self.accuracy
