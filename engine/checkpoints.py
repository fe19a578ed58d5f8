"""The checkpoint library: what a checkpoint holds, where it lives, and how a run resumes.

Layout: `<model_dir>/checkpoints/ckpt-<step>.*`, written by `tf.train.CheckpointManager`,
plus `config.json`, the configuration of the run that wrote the first checkpoint, and
`classes.json`, its class names in label order.
The root object has these children, so any of them can be restored alone
(`tf.train.Checkpoint(model=model).restore(path).expect_partial()`):
  model, optimizer, loss_scale, step, skipped_steps, consecutive_skips, iterator, and
  `random` for a model that draws random numbers (`random_states`), `float8` for a float8
  recipe that keeps state (the delayed one's amax histories and scales).
`iterator` is the training `tf.data` iterator: its stream position and the few batches
in flight (the pipelines are index-based, see `input_pipeline/batching.py`: the data
itself is not in it), so a resumed run sees exactly the batches it would have seen.
TensorFlow 2.21 cannot save the iterator of a multi-device strategy
(`DistributedIterator` is not trackable): there the input restarts from the
beginning of its shuffled stream on resume, and the run says so.
"""

import contextlib
import dataclasses
import glob
import json
import os
import shutil
import tempfile
import types

import tensorflow as tf
from absl import logging

from engine import files
from engine.config import RESUME_FIELDS, ConfigError, applies
from engine.files import first_line
from engine.run_paths import absolute_dataset, dataset_path, same_file

CONFIG_FILE = "config.json"
# The class names in label order: a `folder:` data set takes them from its folders,
# which may change between runs while every flag stays the same.
CLASSES_FILE = "classes.json"
# The root checkpoint's children besides `iterator`, which a multi-device run
# cannot save (see the module docstring).
STATE_CHILDREN = ("model", "optimizer", "loss_scale", "step", "skipped_steps", "consecutive_skips")


class DamagedCheckpoints(Exception):
    """No checkpoint in the directory can be restored."""


def checkpoint_dir(model_dir):
    return os.path.join(model_dir, "checkpoints")


def random_states(model):
    """The states of the model's Keras `SeedGenerator`s (dropout, stochastic depth).

    `tf.train.Checkpoint(model=...)` does not reach them: without them a resumed
    run would draw other masks than the run it continues.
    """
    return [v for v in model.non_trainable_variables if v.path.endswith("seed_generator_state")]


def create_checkpoint(state, iterator=None):
    """The root `tf.train.Checkpoint` for a `loop.TrainState` and the train iterator."""
    children = {name: getattr(state, name) for name in STATE_CHILDREN}
    random = random_states(state.model)
    if random:
        children["random"] = random
    if state.float8.state.variables:
        children["float8"] = state.float8.state
    if isinstance(iterator, tf.__internal__.tracking.Trackable):
        children["iterator"] = iterator
    elif iterator is not None:
        logging.warning(
            "this strategy's input iterator cannot be checkpointed; a resumed run restarts "
            "the input stream (use --strategy=default for an exact resume)"
        )
    return tf.train.Checkpoint(**children)


def create_manager(checkpoint, model_dir, max_to_keep=3):
    return tf.train.CheckpointManager(
        checkpoint, checkpoint_dir(model_dir), max_to_keep=max_to_keep, step_counter=None
    )


def reader(model_dir):
    """What `restore_latest` needs of a manager, for a task that only reads `model_dir`.

    Another worker restores the chief's checkpoints; building a manager would
    parse the index file, which the chief may be rewriting (see `_repair_index`).
    """
    directory = checkpoint_dir(model_dir)
    return types.SimpleNamespace(checkpoints=list_checkpoints(directory), directory=directory)


def has_checkpoints(model_dir):
    """True if `<model_dir>/checkpoints` lists a checkpoint or holds a finished one.

    Files of a save that was killed before it finished (`ckpt-N_temp`, no
    `.index`) do not count: that save never happened.
    """
    directory = checkpoint_dir(model_dir)
    return bool(_listed(directory) or glob.glob(os.path.join(directory, "ckpt-*.index")))


def resumed_config(model_dir, fresh):
    """Is a start in `model_dir` a resume, and with which saved config? The one answer.

    Returns None for a new run (no checkpoints, or `--fresh`), else the flags the
    run was written with (`config.json`; {} for a run written before it existed).

    Raises:
      ConfigError: config.json cannot be read.
    """
    if fresh or not has_checkpoints(model_dir):
        return None
    return load_config(checkpoint_dir(model_dir)) or {}


def _read_index(directory):
    """The state in the `checkpoint` index file, or None if it is missing or unreadable."""
    try:
        return tf.train.get_checkpoint_state(directory)
    # Garbage fails in the text-proto parser as a ValueError (UnicodeDecodeError,
    # "Invalid checkpoint state"...); TensorFlow itself catches only some of it.
    except (ValueError, tf.errors.OpError):
        return None


def _listed(directory):
    """The checkpoints the `checkpoint` index file lists; [] if it is missing or unreadable."""
    state = _read_index(directory)
    return list(state.all_model_checkpoint_paths) if state is not None else []


def _found_checkpoints(directory):
    """The finished checkpoints on disk (`ckpt-N.index`), oldest first, by N."""
    steps = []
    for path in glob.glob(os.path.join(directory, "ckpt-*.index")):
        n = os.path.basename(path)[len("ckpt-") : -len(".index")]
        if n.isdigit():
            steps.append(int(n))
    return [os.path.join(directory, f"ckpt-{n}") for n in sorted(steps)]


def list_checkpoints(directory):
    """The checkpoints in `directory`, oldest first, for a reader (nothing is written).

    Those the `checkpoint` index file lists; if it lists none (missing, emptied,
    garbage) but finished checkpoints are there, those, with a warning: good
    checkpoints are never refused for the want of their index.
    """
    listed = _listed(directory)
    if listed:
        return listed
    found = _found_checkpoints(directory)
    if found:
        logging.warning(
            "%s is missing or unreadable: using the checkpoints found next to it (%s)",
            os.path.join(directory, "checkpoint"),
            ", ".join(os.path.basename(p) for p in found),
        )
    return found


def _repair_index(directory):
    """Rewrites a `checkpoint` index file that lists no checkpoint from those on disk.

    `tf.train.CheckpointManager` knows only what the index lists: without this
    it would resume nothing, and never rotate the unlisted checkpoints away.
    """
    found = [] if _listed(directory) else _found_checkpoints(directory)
    if not found:
        return
    index = os.path.join(directory, "checkpoint")
    logging.warning(
        "%s is missing or unreadable: rewriting it from the checkpoints found next to it (%s)",
        index,
        ", ".join(os.path.basename(p) for p in found),
    )
    # Names relative to the folder, as the manager writes them, so it can move;
    # given an absolute folder, TensorFlow stores them as they are.
    names = [os.path.basename(p) for p in found]
    # The v1 API is the public one that writes the index; its deprecation notice
    # ("use tf.train.CheckpointManager") would only confuse the user.
    try:
        with tf_log_filtered(lambda record: record.module != "deprecation"):
            tf.compat.v1.train.update_checkpoint_state(  # written atomically
                os.path.abspath(directory),
                names[-1],
                all_model_checkpoint_paths=names,
                all_model_checkpoint_timestamps=[os.path.getmtime(f"{p}.index") for p in found],
            )
    except (OSError, tf.errors.OpError) as e:
        raise ConfigError(
            f"cannot rewrite {index} ({first_line(e)}); make {directory} writable"
        ) from None


@contextlib.contextmanager
def tf_log_filtered(keep):
    """Inside, TensorFlow's Python log drops the records `keep(record)` rejects."""
    logger = tf.get_logger()
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def prepare_model_dir(config, model_dir, class_names=None):
    """Applies the resume rules before anything is built; returns True to resume.

    * no checkpoints: a fresh start; `config.json` (and `classes.json`, given
      `class_names`) are written for later resumes.
    * checkpoints and `--fresh`: an error, unless `--overwrite` (then they are deleted).
    * checkpoints: resume, after checking that `RESUME_FIELDS` (engine.config) match `config.json`
      and `class_names` match `classes.json`.
    Either way `model_dir` and its checkpoints folder must take new files.

    Raises:
      ConfigError: `--fresh` without `--overwrite`, checkpoints that cannot be
        deleted, an incompatible flag, other classes, or a folder that cannot be written.
    """
    directory = checkpoint_dir(model_dir)
    if has_checkpoints(model_dir) and config.fresh:
        if not config.overwrite:
            raise ConfigError(
                f"--fresh: --model_dir={model_dir} already holds checkpoints; add --overwrite "
                "to delete them, use another --model_dir, or drop --fresh to resume"
            )
        logging.warning("--fresh --overwrite: deleting %s", directory)
        try:
            shutil.rmtree(directory)
        except OSError as e:
            raise ConfigError(
                f"--fresh --overwrite: cannot delete {directory} ({first_line(e)}); some of "
                "its files may be deleted already, as asked: make it writable and run again, "
                "or use another --model_dir"
            ) from None
    if has_checkpoints(model_dir):
        check_compatible(config, directory)
        if class_names is not None:
            check_classes(config, directory, class_names)
        check_writable(model_dir)
        _repair_index(directory)
        return True
    index = os.path.join(directory, "checkpoint")
    if os.path.exists(index) and _read_index(directory) is None:
        # Garbage that lists nothing, with no checkpoint beside it: the manager
        # would fail to parse it, now and at every later start.
        logging.warning("%s is unreadable and no checkpoint is there: removed it", index)
        os.remove(index)
    try:
        tf.io.gfile.makedirs(directory)
        check_writable(model_dir)  # a ConfigError of its own, not caught here
        # The data set's PATH absolute: a resume from another folder must name it exactly.
        record = dataclasses.asdict(config) | {"dataset": absolute_dataset(config.dataset)}
        _write_json(os.path.join(directory, CONFIG_FILE), record)
        if class_names is not None:
            _write_json(os.path.join(directory, CLASSES_FILE), list(class_names))
    except (OSError, tf.errors.OpError) as e:
        raise ConfigError(
            f"--model_dir={model_dir}: cannot create {directory} ({first_line(e)}); "
            "choose a folder you can write to"
        ) from None
    return False


def check_writable(model_dir):
    """Raises ConfigError unless `model_dir` and its checkpoints folder take new files.

    Found at start-up, not at the first save or summary. A file is really
    created: `os.access` says yes to root, and on an immutable (`chattr +i`)
    or read-only-mounted folder.
    """
    if "://" in model_dir:
        return  # a remote file system (gs://...): TensorFlow's own writes will tell
    for folder in (model_dir, checkpoint_dir(model_dir)):
        try:
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
                pass
        except OSError as e:
            raise ConfigError(
                f"--model_dir={model_dir}: cannot write in {folder} ({first_line(e)}); make it "
                "writable, or choose another --model_dir"
            ) from None


def _write_json(path, value):
    with files.written_whole(path) as f:  # a stop signal may land in the middle
        json.dump(value, f, indent=2, sort_keys=True)


def check_classes(config, directory, class_names):
    """Raises ConfigError if `class_names` are not those in `classes.json`.

    A label is an index into the class names: other names, or the same ones in
    another order, would resume the model with its labels shuffled. Runs
    written before `classes.json` existed are not checked.
    """
    path = os.path.join(directory, CLASSES_FILE)
    saved = load_classes(directory)
    if saved is None:
        return
    new = list(class_names)
    if saved == new:
        return
    added = [n for n in new if n not in saved]
    removed = [n for n in saved if n not in new]
    if len(added) == len(removed) == 1:
        what = f"class {removed[0]} is now {added[0]}"
    elif added or removed:
        what = "; ".join(
            f"{label}: {', '.join(names)}"
            for label, names in (("added", added), ("removed", removed))
            if names
        )
    else:
        what = "same names, different order"
    raise ConfigError(
        f"--dataset={config.dataset} has other classes than the checkpoints in {directory} "
        f"({what}; theirs are in {path}); restore the class folders as they were, or train "
        "in another --model_dir"
    )


def check_compatible(config, directory, fields=RESUME_FIELDS):
    """Raises ConfigError naming the first of `fields` that differs from config.json."""
    saved = load_config(directory)
    if saved is None:
        logging.warning(
            "%s is missing; cannot check the flags against the checkpoints",
            os.path.join(directory, CONFIG_FILE),
        )
        return
    for name in fields:
        if not applies(name, saved):
            # E.g. --loss_scale without float16: it changed nothing (older runs
            # recorded it; a run now refuses an option outside its scope).
            continue
        new = getattr(config, name)
        if name in saved and saved[name] != new and not _same_data_set(name, saved[name], new):
            raise ConfigError(
                f"--{name}={new} does not match the checkpoints in {directory} (written with "
                f"--{name}={saved[name]}); resume with --{name}={saved[name]}, or start a new "
                "run in another --model_dir"
            )


def _same_data_set(name, saved, new):
    """Whether `--dataset=new` names the data set config.json records as `saved`.

    The same kind and PATH, spelled another way. config.json records PATH
    absolute. Runs written before it did recorded PATH as given: a relative one
    was resolved against a folder it does not record, so it may have named any
    folder whose absolute path ends with it (the same relative PATH resumed
    from any folder), and the absolute spelling flags.txt writes matches it.
    A PATH of only `.` and `..` names no folder in particular: it matches none.
    """
    if name != "dataset" or str(saved).split(":")[0] != new.split(":")[0]:
        return False
    saved_path, new_path = dataset_path(str(saved)), dataset_path(new)
    if saved_path is None or new_path is None or "://" in saved_path + new_path:
        return False
    if os.path.isabs(saved_path):
        return same_file(saved_path, new_path)  # a link to it, or from a linked folder
    new_parts = os.path.abspath(new_path).split(os.sep)
    # "../data" from some folder is a folder named data: the leading ".." say nothing more.
    tail = [p for p in os.path.normpath(saved_path).split(os.sep) if p not in (os.curdir, "")]
    while tail and tail[0] == os.pardir:
        tail.pop(0)
    return bool(tail) and new_parts[-len(tail) :] == tail


def load_classes(directory):
    """The class names in `<directory>/classes.json`, in label order, or None if it is missing."""
    path = os.path.join(directory, CLASSES_FILE)
    return _load_json(path, list, "the class names the checkpoints were trained on")


def load_config(directory):
    """The flags in `<directory>/config.json` as a dict, or None if there is no such file.

    Raises:
      ConfigError: the file cannot be read or is not a JSON object.
    """
    return _load_json(
        os.path.join(directory, CONFIG_FILE), dict, "the flags the checkpoints were written with"
    )


def _load_json(path, kind, what):
    """The `kind` (dict or list) in the JSON file `path`, or None if there is no such file.

    Raises:
      ConfigError: the file cannot be read or does not hold a `kind`; `what` says what it records.
    """
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            saved = json.load(f)
        if not isinstance(saved, kind):
            raise ValueError(f"not a JSON {'object' if kind is dict else 'array'}")
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{path} is unreadable ({first_line(e)}); it records {what}: restore it, or "
            "delete it to resume without this check"
        ) from None
    return saved


def restore_latest(checkpoint, manager, new_iterator=None):
    """Restores the newest readable checkpoint; returns its path.

    A damaged checkpoint (truncated or missing file) is reported and the one
    before it is tried: a run never silently restarts from scratch. A checkpoint
    saved without the input iterator (by a multi-device run) restores everything
    else, and the input stream restarts. So does one whose iterator this input
    pipeline cannot load (written by another version of it), if `new_iterator`
    is given: a failed load leaves the iterator unusable, so `checkpoint.iterator`
    is then replaced by `new_iterator()`, a fresh one the caller must train from.

    Raises:
      DamagedCheckpoints: checkpoints exist but none can be restored.
    """
    failures, mismatches = [], 0
    # The chief's manager reads an index `prepare_model_dir` repaired; another
    # worker's `reader` may have come before the repair: it lists the files on disk.
    paths = manager.checkpoints or list_checkpoints(manager.directory)
    for path in reversed(paths):
        try:
            _restore(checkpoint, path, new_iterator)
        # A truncated file fails wherever the reader runs out of bytes (DataLossError,
        # IndexError, ...), so any error counts; each one is logged with its reason.
        except Exception as e:
            # Objects left unbound, or a tensor of another shape: the file is whole
            # but was written by a run built differently.
            mismatch = isinstance(e, AssertionError) or "shape" in first_line(e)
            mismatches += mismatch
            reason = f"{type(e).__name__}: {first_line(e)}"
            what = (
                "does not match how this run is built" if mismatch else "is damaged or unreadable"
            )
            logging.error("checkpoint %s %s: %s", path, what, reason)
            failures.append(f"{os.path.basename(path)}: {reason}")
            continue
        if failures:
            logging.warning("fell back to %s, the newest checkpoint that could be read", path)
        return path
    directory = manager.directory
    if failures and mismatches == len(failures):
        # Good files, another configuration: never advise deleting them.
        raise DamagedCheckpoints(
            f"the checkpoints in {directory} were written by a differently built run "
            f"({failures[0]}); resume with the flags in {os.path.join(directory, CONFIG_FILE)}, "
            "or train in another --model_dir"
        )
    raise DamagedCheckpoints(
        f"no checkpoint in {directory} can be restored ({'; '.join(failures) or 'none listed'}); "
        "repair or move them away, or start again with --fresh --overwrite"
    )


def _restore(checkpoint, path, new_iterator=None):
    if not hasattr(checkpoint, "iterator"):
        checkpoint.restore(path).assert_existing_objects_matched()
        return
    names = STATE_CHILDREN + tuple(n for n in ("random", "float8") if hasattr(checkpoint, n))
    state_only = tf.train.Checkpoint(**{n: getattr(checkpoint, n) for n in names})
    saved = {name.split("/")[0] for name, _ in tf.train.list_variables(path)}
    if "iterator" not in saved:
        logging.warning(
            "%s was saved without the input iterator (by a multi-device run): the input "
            "stream restarts from its beginning",
            path,
        )
        state_only.restore(path).assert_existing_objects_matched()
        return
    try:
        checkpoint.restore(path).assert_existing_objects_matched()
    except tf.errors.NotFoundError as e:
        # The iterator's state was read whole but names datasets this pipeline
        # does not have: it was saved by another input pipeline (e.g. an older
        # version of this one). Damaged bytes fail differently (DataLossError...)
        # and fall back to an older checkpoint, whose input position is exact.
        if new_iterator is None or "DeserializeIterator" not in str(e):
            raise
        try:
            state_only.restore(path).assert_existing_objects_matched()
        except Exception:
            raise e from None
        checkpoint.iterator = new_iterator()
        logging.warning(
            "%s: its input position does not fit this input pipeline (%s); everything "
            "else is restored and the input stream restarts from its beginning",
            path,
            first_line(e),
        )
