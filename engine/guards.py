"""What stops a run early: a preemption signal (clean stop) or divergence (failure).

Both are decided on the host, once per loop, from values the inner loop kept in
variables: the outer loop never syncs inside a loop to watch for them.
"""

import contextlib
import os
import signal
import threading

from absl import logging


@contextlib.contextmanager
def written_whole(path, newline=None):
    """`open(path, "w")` through a temporary file renamed over `path` once written.

    A stop signal or an error in the middle leaves the previous file (or none).
    """
    partial = f"{path}.partial"
    with open(partial, "w", newline=newline) as f:
        yield f
    os.replace(partial, path)


class Terminated(BaseException):
    """SIGTERM arrived where the run cannot stop cleanly (see `terminate_as_interrupt`).

    A `BaseException`, like `KeyboardInterrupt`: an `except Exception` (such as
    the one that passes over a damaged checkpoint) must not swallow it.
    """


@contextlib.contextmanager
def terminate_as_interrupt():
    """SIGTERM raises `Terminated`, as SIGINT raises `KeyboardInterrupt`.

    Where no stop can be taken cleanly (start-up, before the training loop
    catches signals; a benchmark waiting for its worker), SIGTERM would end the
    process at once, with no word; raised, it unwinds like Ctrl-C, so a running
    `subprocess.run` kills its child and the command line reports it in one line.
    """

    def handler(signum, frame):
        del signum, frame
        raise Terminated()

    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can only be installed from the main thread
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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


class StopRequest:
    """Set by SIGTERM or SIGINT; the outer loop reads it between loops."""

    def __init__(self):
        self.signal_name = None

    def __bool__(self):
        return self.signal_name is not None


@contextlib.contextmanager
def stop_on_signals(signums=(signal.SIGTERM, signal.SIGINT)):
    """Turns the first SIGTERM/SIGINT into a `StopRequest`; a second one acts as usual.

    Only a flag is set in the handler: the step in flight cannot be interrupted
    anyway, and logging or saving from inside a handler is not safe.
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request  # signal handlers can only be installed from the main thread
        return
    previous = {s: signal.getsignal(s) for s in signums}

    def restore():
        for s, handler in previous.items():
            signal.signal(s, handler)

    def handler(signum, frame):
        del frame
        if request:  # a second signal: the user does not want to wait for the save
            restore()
            signal.raise_signal(signum)
            return
        request.signal_name = signal.Signals(signum).name

    for s in signums:
        signal.signal(s, handler)
    try:
        yield request
    finally:
        restore()


def divergence(values, step, loss_scaling, max_consecutive_skips):
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


def log_stop(request, step, checkpoint_path):
    # How to resume is the command's to say (see `config.resume_hint`): a
    # --mode=compare run's folder is not the --model_dir to rerun with.
    logging.info("received %s: saved %s at step %d", request.signal_name, checkpoint_path, step)
