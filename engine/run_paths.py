"""Where a run's files are: its default folder, its flagfile, the flags that name paths.

A leaf module: it imports nothing from the engine, so `main.py`, the modes and
the checkpoint library share it without importing one another.
"""

import dataclasses
import datetime
import os

from input_pipeline.paths import absolute_path

# The flags that name local files or folders (and `--dataset=folder:|ships:PATH`).
PATH_FLAGS = (
    "model_dir",
    "data_dir",
    "cache",
    "export_dir",
    "benchmark_json",
    "predict_csv",
    "predictions_csv",
    "init_weights",
    "init_from",
)


def same_file(a, b):
    """Whether paths `a` and `b` name one file or folder, through links and spellings."""
    # samefile also sees hard links; realpath covers a path that does not exist yet.
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def dataset_path(dataset):
    """The PATH of `folder:PATH` or `ships:PATH`, else None (generated sets, tfds names)."""
    kind, colon, path = dataset.partition(":")
    return path if colon and kind in ("folder", "ships") else None


def expand_home(name, value):
    """`value` of flag `name` with `~` at the start of a local path expanded.

    The shell leaves `~` in `--data_dir=~/x` alone (it expands a tilde only at
    the start of a word), and neither TFDS nor `open()` expands it: they would
    use a folder named `~` in the working directory.
    """
    if name == "dataset" and dataset_path(value) is not None:
        kind, path = value.split(":", 1)
        return f"{kind}:{os.path.expanduser(path)}"
    return os.path.expanduser(value) if name in PATH_FLAGS else value


def absolute_dataset(dataset):
    """`--dataset` with a local relative `folder:`/`ships:` PATH made absolute."""
    if dataset_path(dataset) is None:
        return dataset
    kind, path = dataset.split(":", 1)
    return f"{kind}:{absolute_path(path)}"


def _replayable(name, value):
    """`value` of flag `name` as flags.txt writes it: the same files from any folder."""
    if name == "dataset":
        return absolute_dataset(value)
    if name in PATH_FLAGS and not (name == "cache" and value in ("auto", "memory")):
        return absolute_path(value)
    return value


def to_flagfile(config):
    """The flags that rebuild `config`, one per line (for `--flagfile`).

    All but `--fresh` and `--overwrite`: replaying a run's flags must never delete
    its checkpoints. Local relative paths (`PATH_FLAGS`, the data set's PATH) are
    written absolute, resolved against the current folder, so a replay from
    another folder reads and writes the run's own files.
    """
    lines = []
    for field in dataclasses.fields(config):
        if field.name in ("fresh", "overwrite"):
            continue  # actions on the model_dir, not configuration
        value = _replayable(field.name, getattr(config, field.name))
        if value is None:
            continue  # unset (--xla before --precision=auto decides): the default replays it
        if isinstance(value, bool):
            lines.append(f"--{field.name}" if value else f"--no{field.name}")
        else:
            # repr keeps every digit of a float, so the value round-trips exactly.
            lines.append(
                f"--{field.name}={value!r}"
                if isinstance(value, float)
                else f"--{field.name}={value}"
            )
    return "\n".join(lines) + "\n"


def default_model_dir(config):
    """A fresh folder under runs/ named for the time and the precision (or `compare`)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    if config.mode == "compare":
        return os.path.join("runs", f"{stamp}-compare")
    return os.path.join("runs", f"{stamp}-{config.precision}{'-xla' if config.xla else ''}")


def resume_hint(config, model_dir, purpose="resume"):
    """How to resume the command that ran `config` in `model_dir`, for stop messages.

    Without --model_dir the same command would start a new timestamped folder:
    the hint names the one this run wrote.
    """
    if config.model_dir:
        return f"rerun the same command to {purpose}"
    return f"rerun with --model_dir={os.path.abspath(model_dir)} to {purpose}"
