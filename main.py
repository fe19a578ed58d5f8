"""Mixed-precision training: `python main.py --precision=mixed --xla`.

Flags in, one validated `Config` out, one call into the engine. The flags are
generated from the options `engine/config.py` declares. A user mistake (bad
flag, bad data) is one line on stderr and exit status 2, never a traceback.
"""

import atexit
import dataclasses
import gc
import os
import signal
import sys

from absl import app, flags, logging

from engine import config as config_lib
from engine import families, preflight, run_paths
from engine.files import one_line

_DEFINE = {
    bool: flags.DEFINE_bool,
    int: flags.DEFINE_integer,
    float: flags.DEFINE_float,
    str: flags.DEFINE_string,
}


def _define_flags():
    """One flag per `Config` field: its name, default, help and choices (an enum)."""
    for field in dataclasses.fields(config_lib.Config):
        help_text, choices = field.metadata["help"], field.metadata["choices"]
        if choices:
            flags.DEFINE_enum(field.name, field.default, choices, help_text)
        else:
            _DEFINE[field.type](field.name, field.default, help_text)


_define_flags()
FLAGS = flags.FLAGS


def config_from_flags():
    """Builds the validated `Config` from the parsed flags (`~` in paths expanded).

    Options not given take the model family's defaults (`families.FAMILY_DEFAULTS`).
    """
    fields = dataclasses.fields(config_lib.Config)
    config = config_lib.Config(
        **{
            field.name: run_paths.expand_home(field.name, FLAGS[field.name].value)
            for field in fields
        }
    )
    given = {field.name for field in fields if FLAGS[field.name].present}
    return families.with_family_defaults(config, given)


def _parse_flags(argv):
    """absl's parser, but a bad flag is one line and exit 2 instead of two lines."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        # absl's own prefix (a flagfile it cannot open) would follow ours.
        _fail(str(e).removeprefix("ERROR:: "))


def _fail(message, status=2):
    """Prints `error: MESSAGE` as one line, whatever `message` holds, and exits with `status`."""
    print(f"error: {one_line(message)}", file=sys.stderr)
    sys.exit(status)


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; flags look like --name=value")
    try:
        config = config_from_flags()
        config.check_precision_flags()  # the command line's own run only (see there)
        preflight.check(config)  # run.run checks again; here before TensorFlow loads
    except config_lib.ConfigError as e:
        _fail(str(e))
    # Resolved once: a stop message must name the folder this run writes.
    model_dir = config.model_dir or run_paths.default_model_dir(config)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    # Imported here so that a bad flag is rejected before TensorFlow loads.
    from engine import run

    try:
        # Until the training loop catches them (and after it), a stop signal
        # unwinds: no traceback, no half-written file of ours, what was saved kept.
        with run.terminate_as_interrupt():
            run.run(config, model_dir)
    except run.UserError as e:
        _fail(str(e))
    except run.TrainingDiverged as e:
        _fail(str(e), status=3)  # not a usage error: a scheduler should not just retry
    except (KeyboardInterrupt, run.Terminated) as e:
        signum = signal.SIGINT if isinstance(e, KeyboardInterrupt) else signal.SIGTERM
        resumable = config.mode in ("train", "compare")
        _fail(
            f"stopped by {signum.name}"
            + (
                "; checkpoints already written are kept: "
                + run_paths.resume_hint(config, model_dir)
                if resumable
                else ""
            ),
            status=128 + signum,  # as a shell reports a process a signal ended
        )


def run_main():
    """Console-script entry point (`mixed-precision-train`).

    Once `main` is done, every file it wrote is closed: the process ends at once
    (`os._exit`) instead of tearing the interpreter down. That teardown garbage-
    collects the hundreds of thousands of Python objects TensorFlow's traced graphs
    hold, which took 3 to 30 s after the last line on a shared 2-core machine.
    """
    try:
        app.run(main, flags_parser=_parse_flags)
    except SystemExit as e:
        status = e.code
    else:
        status = 0
    if isinstance(status, str):  # as `sys.exit("message")` prints it
        print(status, file=sys.stderr)
        status = 1
    # The exit functions run, as at any exit (TensorFlow's remove the autograph
    # files it wrote to the temporary folder); the collection registered against
    # a teardown deadlock is not needed, as no teardown follows.
    atexit.unregister(gc.collect)
    atexit._run_exitfuncs()
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status or 0)


if __name__ == "__main__":
    run_main()
