"""The divergence guard: stop a run that can no longer make progress.

Decided on the host, once per loop, from statistics the inner loop kept in
variables: the outer loop never syncs inside a loop to watch for it.
"""

from engine.loop import Action


class TrainingDiverged(Exception):
    """Training cannot continue; the last checkpoint written before it is kept.

    `step` is the global step at which the guard stopped the run, `reason` a
    few words on why, for `--mode=compare`'s table (the message says it in full).
    `stopped_by`: a stop signal that came in the same loop (e.g. "SIGINT"), which
    a comparison must still obey; a training run ends as diverged either way.
    """

    def __init__(
        self,
        message,
        step=0,
        reason="",
        skipped_steps=0,
        loss_scale=float("nan"),
        stopped_by="",
    ):
        super().__init__(message)
        self.step = step
        self.reason = reason
        self.skipped_steps = skipped_steps
        self.loss_scale = loss_scale
        self.stopped_by = stopped_by


def check(values, step, loss_scaling, max_consecutive_skips):
    """Why training must stop, as (a few words, one line), or None if it may go on.

    Args:
      values: the loop's statistics; reads `nonfinite_losses` (steps in the
        loop with a non-finite loss) and `max_consecutive_skips` (the longest
        run of skipped steps that reached into the loop).
      step: the global step after the loop.
      loss_scaling: whether the precision uses a loss scale (float16).
      max_consecutive_skips: the `--max_consecutive_skips` limit; 0 = none.
    """
    # Without a loss scale, a non-finite float32 loss is not an overflow the scale
    # can back off from: the weights or the learning rate are at fault.
    if not loss_scaling and values["nonfinite_losses"] > 0:
        return "non-finite loss", (
            f"training diverged: the loss was not finite in {values['nonfinite_losses']} "
            f"step(s) before step {step}; lower --learning_rate or set --clip_norm"
        )
    run = values["max_consecutive_skips"]
    if max_consecutive_skips and run > max_consecutive_skips:
        return f"{run} steps skipped in a row", (
            f"training diverged: {run} steps in a row were skipped for non-finite "
            f"gradients before step {step} (--max_consecutive_skips={max_consecutive_skips}); "
            "lower --learning_rate, set --clip_norm, or check the data"
        )
    return None


class CheckDivergence(Action):
    """Marks a loop after which training cannot go on (`record.diverged`).

    Listed before the summaries, so a diverged loop's statistics are written.
    """

    def __init__(self, loss_scaling, max_consecutive_skips):
        self.loss_scaling = loss_scaling
        self.max_consecutive_skips = max_consecutive_skips

    def __call__(self, record):
        record.diverged = check(
            record.stats, record.step, self.loss_scaling, self.max_consecutive_skips
        )


class StopOnDivergence(Action):
    """Raises `TrainingDiverged` after a marked loop, carrying a stop signal of the same loop.

    Listed before any save: a diverged state must never replace the last good checkpoint.
    """

    def __init__(self, state, checkpoints):
        self.state, self.checkpoints = state, checkpoints

    def __call__(self, record):
        if not record.diverged:
            return
        reason, message = record.diverged
        last = self.checkpoints.last_good or "none (no checkpoint was written)"
        raise TrainingDiverged(
            f"{message}; last good checkpoint: {last}",
            step=record.step,
            reason=reason,
            skipped_steps=int(self.state.skipped_steps.numpy()),
            loss_scale=float(self.state.loss_scale.value.numpy()),
            stopped_by=record.stop.signal_name or "",
        )
