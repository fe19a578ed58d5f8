"""Examples read by index from disk inside a `tf.data` pipeline: ArrayRecord files.

Two sources use it: a TFDS set prepared as ArrayRecord (`tfds_source`, through
`tfds.data_source`) and the decoded-image cache that a file `--cache` writes
(`preprocessing`): one record per image, its uint8 pixels, so a training step
reads its batch's records instead of decoding JPEGs, and nothing is held in
memory. TF has no op for ArrayRecord: `reader` calls the Python reader from the
pipeline (`tf.numpy_function`), which measured as fast as reading image files
(BUILD_NOTES "Data at scale").
"""

import atexit
import functools
import gc
import importlib
import os
import socket

import tensorflow as tf

# One record per chunk, uncompressed: a read touches its record alone, and pixels
# (or JPEG bytes) gain little from compression.
WRITE_OPTIONS = "group_size:1,uncompressed"


def reader(lookup):
    """A tf function `read(index)` -> the scalar string `lookup(int(index))` gives."""
    _collect_at_exit()

    def fetch(index):
        return lookup(int(index))

    def read(index):
        return tf.ensure_shape(tf.numpy_function(fetch, [index], tf.string, stateful=False), [])

    return read


@functools.cache
def _collect_at_exit():
    # A training iterator whose pipeline calls Python, still alive when the
    # interpreter exits because a reference cycle holds it (as in a script of
    # one's own), deadlocks the exit; a collection while everything still runs
    # frees it first. Registered once, by the first pipeline that calls Python.
    atexit.register(gc.collect)


def write(arrays, path, progress):
    """Writes each numpy array of `arrays` (in order) as one record at `path`.

    Written to a temporary file renamed at the end, so a run killed while writing
    leaves no file at `path` (the next run writes it again), and two runs writing
    the same cache do not mix their records.

    Raises:
      OSError: the file cannot be written (no room, no permission, no
        array_record); the temporary file is removed.
    """
    array_record_module = _array_record("array_record_module")
    partial = f"{path}.partial-{socket.gethostname()}-{os.getpid()}"
    try:
        writer = array_record_module.ArrayRecordWriter(partial, WRITE_OPTIONS)
        try:
            for count, array in enumerate(arrays, 1):
                writer.write(array.tobytes())
                progress.update(count)
        finally:
            writer.close()
        os.replace(partial, path)
    except BaseException as e:  # a stop signal or an unreadable image too: no partial file left
        if os.path.exists(partial):
            os.remove(partial)
        if isinstance(e, RuntimeError | OSError):  # the writer's: RuntimeError("write() failed")
            reason = str(e).splitlines()[0] if str(e) else repr(e)
            raise OSError(f"cannot write {path}: {reason}") from None
        raise


def _array_record(module):
    """`array_record.python.<module>`: installed with TFDS on Linux; elsewhere by hand."""
    try:
        return importlib.import_module(f"array_record.python.{module}")
    except ImportError:
        raise OSError("the array_record package is missing: pip install array_record") from None


def open_records(path, expected):
    """A random-access source of `path`'s records (`source[i]` -> bytes).

    Raises:
      ValueError: the file cannot be read as ArrayRecord, or holds a number of
        records other than `expected`.
      OSError: no array_record package.
    """
    array_record_data_source = _array_record("array_record_data_source")
    try:
        source = array_record_data_source.ArrayRecordDataSource([path])
    except RuntimeError as e:  # truncated or not ArrayRecord: its footer cannot be read
        raise ValueError(f"unreadable ({str(e) or 'no footer'})") from None  # often empty
    if len(source) != expected:
        raise ValueError(f"{len(source)} records, {expected} expected")
    return source
