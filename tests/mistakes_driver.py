"""Runs the mistakes of tests/test_mistakes.py through main.py's own path, many per process.

`python tests/mistakes_driver.py [--tensorflow]` reads batches of jobs from
stdin, one JSON list per line, and answers each with one JSON line on stdout:
for a `main` job, its exit status, what it wrote to stdout and stderr, the
traceback of any exception that escaped main.py, and whether TensorFlow was
loaded once it ended. With `--tensorflow` (the mistakes found after it loads)
TensorFlow is loaded first, once; without, a job that loads it is reported so:
main.py promises to refuse a bad flag or path before it loads. A `tfds` job
prepares the local TFDS set of tests/tfds_sets.py (nothing is downloaded); a
`weights` job writes a model's Keras weights file.

Why this is main.py's path as a user meets it: each job's flags are parsed by
main.py's own parser (`main._parse_flags`, as `app.run` calls it) and handed to
`main.main`, the function `python main.py` runs, with the job's folder as the
working directory. What `app.run` adds around them (absl's log handler, which
is installed here too, and debugger flags) decides no error and prints none.
The exit status is `SystemExit`'s code, as the process's would be; stderr is
captured at file descriptor 2, so TensorFlow's C++ log and Python's are in it
as the user would see them. What differs from a fresh process is what a
process keeps: modules stay loaded, and TensorFlow is loaded once, with two
logical CPU devices (set before its runtime starts) so that
`--strategy=mirrored` has two replicas, as `--num_cpu_devices=2` gives them in
a fresh process. Each job gets fresh flags and its own folder. A few jobs name
a `patch` (`PATCHES`): a condition that cannot be made honestly on this
machine (a full disk, a read-only folder as root, no network) is simulated at
the call that meets it.
"""

import contextlib
import errno
import json
import os
import shutil
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import logging as absl_logging  # noqa: E402

import main  # noqa: E402  (TensorFlow-free, as main.py loads it before a flag is checked)

absl_logging.use_absl_handler()  # as app.run does: absl's log lines on stderr


def start_tensorflow():
    """Loads TensorFlow with two logical CPU devices, before anything starts its runtime."""
    import tensorflow as tf

    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2
    )


@contextlib.contextmanager
def _replaced(owner, name, value):
    previous = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, previous)


def _inside(path, folder):
    folder = os.path.abspath(folder)
    return os.path.commonpath([os.path.abspath(str(path)), folder]) == folder


def full_disk(folder):
    """`shutil.disk_usage` says 8,000 bytes are free under `folder` (a disk without room)."""
    real = shutil.disk_usage
    return _replaced(
        shutil,
        "disk_usage",
        lambda path: real(path)._replace(free=8_000) if _inside(path, folder) else real(path),
    )


def failing_cache_writer(_):
    """The ArrayRecord writer fails after 3 records, as it does when the disk fills up."""
    from input_pipeline import records

    real = records._array_record("array_record_module")

    class FullDisk:
        def __init__(self, path, options):
            self.writer, self.count = real.ArrayRecordWriter(path, options), 0

        def write(self, record):
            self.count += 1
            if self.count > 3:
                raise RuntimeError("write() failed: No space left on device")
            self.writer.write(record)

        def close(self):
            self.writer.close()

    module = type("ArrayRecordModule", (), {"ArrayRecordWriter": FullDisk})
    return _replaced(records, "_array_record", lambda _: module)


def no_array_record(_):
    """The array_record package is missing (as on a platform TFDS does not install it for)."""
    from input_pipeline import records

    def missing(_):
        raise OSError("the array_record package is missing: pip install array_record")

    return _replaced(records, "_array_record", missing)


@contextlib.contextmanager
def read_only(folder):
    """No file can be created in or deleted from `folder`, as on a read-only mount.

    Root ignores permissions (chmod would not stop these tests), and a mount
    needs privileges: the two calls the engine writes and deletes with refuse.
    """
    make, rmtree = tempfile.NamedTemporaryFile, shutil.rmtree

    def no_temp(*args, dir=None, **kwargs):
        if dir is not None and _inside(dir, folder):
            raise OSError(errno.EROFS, "Read-only file system", dir)
        return make(*args, dir=dir, **kwargs)

    def no_rmtree(path, *args, **kwargs):
        if _inside(path, folder):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return rmtree(path, *args, **kwargs)

    with _replaced(tempfile, "NamedTemporaryFile", no_temp), _replaced(shutil, "rmtree", no_rmtree):
        yield


def unlistable(folder):
    """Listing `folder` fails with EACCES, as a folder without read permission does."""
    real = os.scandir

    def scandir(path="."):
        if os.path.abspath(path) == os.path.abspath(folder):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path)

    return _replaced(os, "scandir", scandir)


def passed_at_start_up(_):
    """The start-up image check finds every image good (as if one broke after it ran)."""
    from input_pipeline import preprocessing

    return _replaced(preprocessing, "find_undecodable", lambda paths, what="", stamps=None: [])


def no_network(_):
    """Every download fails as it does without a network (Keras' own message)."""
    import keras

    def fetch(fname, origin, **kwargs):
        raise Exception(
            f"URL fetch failure on {origin}: None -- [Errno -3] Temporary failure in name "
            "resolution"
        )

    return _replaced(keras.utils, "get_file", fetch)


def no_room_for_exports(folder):
    """Saving a SavedModel under `folder` fails as on a full disk."""
    import tensorflow as tf

    def save(obj, export_dir, *args, **kwargs):
        if _inside(export_dir, folder):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, export_dir, *args, **kwargs)

    real = tf.saved_model.save
    return _replaced(tf.saved_model, "save", save)


PATCHES = {
    "full_disk": full_disk,
    "failing_cache_writer": failing_cache_writer,
    "no_array_record": no_array_record,
    "read_only": read_only,
    "unlistable": unlistable,
    "passed_at_start_up": passed_at_start_up,
    "no_network": no_network,
    "no_room_for_exports": no_room_for_exports,
}


@contextlib.contextmanager
def _captured():
    """File descriptors 1 and 2 go to temporary files inside; yields their text, filled at exit."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    files = {fd: tempfile.TemporaryFile() for fd in (1, 2)}  # noqa: SIM115 (closed below)
    for fd, f in files.items():
        os.dup2(f.fileno(), fd)
    text = {}
    try:
        yield text
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, name in ((1, "stdout"), (2, "stderr")):
            os.dup2(saved[fd], fd)
            os.close(saved[fd])
            files[fd].seek(0)
            text[name] = files[fd].read().decode(errors="replace")
            files[fd].close()


@contextlib.contextmanager
def _environment(cwd, env, patch):
    """The job's working directory, environment variables and patch, undone at exit."""
    before, previous = os.getcwd(), dict(os.environ)
    os.chdir(cwd)
    os.environ.update(env)
    try:
        with PATCHES[patch[0]](patch[1]) if patch else contextlib.nullcontext():
            yield
    finally:
        os.chdir(before)
        os.environ.clear()
        os.environ.update(previous)


def run_main(job):
    """main.py's exit status for `job["args"]`, its output, and any escaped traceback."""
    main.FLAGS.unparse_flags()
    result = {"status": None, "traceback": None}
    start = time.perf_counter()
    with _captured() as text, _environment(job["cwd"], job.get("env", {}), job.get("patch")):
        try:
            main.main(main._parse_flags(["main.py", *job["args"]]))
            result["status"] = 0
        except SystemExit as e:
            result["status"] = 0 if e.code is None else e.code
        except BaseException:  # what a user would see as a traceback
            result["traceback"] = traceback.format_exc()
    result.update(text, seconds=round(time.perf_counter() - start, 2))
    result["tensorflow"] = "tensorflow" in sys.modules
    return result


def prepare_tfds(job):
    import tfds_sets

    with _captured() as text:
        tfds_sets.prepare(job["dir"], job["format"])
    return text


def save_weights(job):
    """Writes a Keras weights file of `job["model"]` (3 classes, 16 px) at `job["path"]`."""
    from models import create_model

    with _captured() as text:
        create_model(job["model"], 3, 16).save_weights(job["path"])
    return text


def main_loop():
    if "--tensorflow" in sys.argv:
        start_tensorflow()
    # Answers go to the original stdout; each job's own output is captured.
    answers = os.fdopen(os.dup(1), "w")
    for line in sys.stdin:
        jobs = json.loads(line)
        kinds = {"main": run_main, "tfds": prepare_tfds, "weights": save_weights}
        answers.write(json.dumps([kinds[job["kind"]](job) for job in jobs]) + "\n")
        answers.flush()


if __name__ == "__main__":
    main_loop()
