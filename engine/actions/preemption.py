"""Preemption: SIGTERM or SIGINT stops the run cleanly, after the loop in flight.

The signal only sets a flag; the outer loop reads it between loops, the
checkpoint action saves, and the run ends with what it trained kept.
"""

import contextlib
import signal
import threading

from absl import logging


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


def log_stop(request, step, checkpoint_path):
    # How to resume is the command's to say (see `run_paths.resume_hint`): a
    # --mode=compare run's folder is not the --model_dir to rerun with.
    logging.info("received %s: saved %s at step %d", request.signal_name, checkpoint_path, step)
