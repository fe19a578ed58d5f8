"""The start-up checks that touch the disk: can the run write where it is told to?

`engine.config` checks values alone; these look at the folders a run will
write into, before anything runs, so a benchmark or a training run never ends
by failing to write its result. `engine.run.run` calls `check` first; main.py
calls it before TensorFlow loads too, so a bad path is refused in milliseconds.

This module imports no TensorFlow.
"""

import os

from engine.config import ConfigError
from engine.files import write_error
from input_pipeline.paths import cache_prefix


def check(config):
    """Refuses, in one line, a path of `config` the run could not write.

    Raises:
      ConfigError: --cache names a remote path; the folder of a file --cache,
        --benchmark_json or --predictions_csv is missing or a file, a file cannot
        be written where --cache or --export_dir would write (tried by writing
        one, then removed), or --init_weights / --init_from name nothing.
    """
    _check_cache(config)
    _check_output_files(config)
    _check_export_dir(config)
    _check_initial_weights(config)


def _check_cache(config):
    if config.cache in ("", "auto", "memory"):
        return
    scheme, remote, _ = config.cache.partition("://")
    if remote:  # as a local path it would name a folder `gs:` in the working directory
        raise ConfigError(
            f"--cache={config.cache}: a decoded cache must be on a local disk ({scheme}:// is "
            "remote; each step reads its images from it by index): give a local folder, e.g. "
            "--cache=/tmp/cache/, or use --cache=memory, or --cache= to decode at every step"
        )
    parent = os.path.dirname(os.path.abspath(cache_prefix(config.cache)))
    if not os.path.isdir(parent):
        raise ConfigError(
            f"--cache={config.cache}: {_not_a_folder(parent)}, or use --cache=memory or --cache="
        )
    reason = write_error(parent)
    if reason:
        raise ConfigError(
            f"--cache={config.cache}: cannot write in {parent} ({reason}); give a folder you can "
            "write to, or use --cache="
        )


def _check_output_files(config):
    # Local paths only: `engine.config` refuses a `scheme://` one.
    for name in ("benchmark_json", "predictions_csv"):
        path = getattr(config, name)
        if not path:
            continue
        if os.path.isdir(path):
            raise ConfigError(f"--{name}={path} is a folder; give a file path")
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise ConfigError(f"--{name}={path}: {_not_a_folder(parent)}")


def _check_export_dir(config):
    export_dir = config.export_dir
    if not export_dir or "://" in export_dir or config.mode not in ("train", "compare"):
        return
    if os.path.exists(export_dir) and not os.path.isdir(export_dir):
        raise ConfigError(f"--export_dir={export_dir} is a file; give a folder path")
    # The export is written after training: a folder that cannot be made must
    # stop the run now, not then. `lexists`: a link to nothing is where the walk
    # stops (abspath drops a trailing `/` that would follow it). Nothing is
    # created on the way: the export makes its folders itself.
    existing = os.path.abspath(export_dir)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.exists(existing):
        raise ConfigError(
            f"--export_dir={export_dir}: {existing} is a symbolic link to "
            f"{os.readlink(existing)}, which does not exist; create it or give another path"
        )
    if not os.path.isdir(existing):
        raise ConfigError(
            f"--export_dir={export_dir}: {existing} is a file, so the folder cannot be made; "
            "give another path"
        )
    # Written at the end of training: a file is created (and removed) here now,
    # where the export would make its folder, or write in place (it exists).
    reason = write_error(existing)
    if reason:
        raise ConfigError(
            f"--export_dir={export_dir}: cannot write in {existing} ({reason}); give a folder "
            "you can write to"
        )


def _check_initial_weights(config):
    if config.init_weights and not os.path.isfile(config.init_weights):
        raise ConfigError(
            f"--init_weights={config.init_weights}: no such file; name a Keras weights file "
            "(.h5 or .weights.h5)"
        )
    if config.init_from and not os.path.isdir(config.init_from):
        raise ConfigError(
            f"--init_from={config.init_from}: no such folder; name the --model_dir of a "
            "finished training run"
        )


def _not_a_folder(path):
    """Why files cannot go into `path`, for an error message."""
    if os.path.exists(path):
        return f"{path} is a file, not a folder; give a path in a folder"
    return f"folder {path} does not exist; create it"
