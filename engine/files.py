"""Leaf helpers for files and error text, shared by the engine's modules."""

import contextlib
import os
import tempfile


@contextlib.contextmanager
def written_whole(path, newline=None):
    """`open(path, "w")` through a temporary file renamed over `path` once written.

    A stop signal or an error in the middle leaves the previous file (or none).
    """
    partial = f"{path}.partial"
    with open(partial, "w", newline=newline) as f:
        yield f
    os.replace(partial, path)


def write_error(folder):
    """Why no file can be created in `folder`, or None if one can: one is, then removed.

    Asked by writing, not with `os.access`, which says yes to root (these
    machines run as root) and for a read-only mount or an immutable folder.
    """
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        return e.strerror or str(e)
    return None


def one_line(message):
    """`message` on one line: each line stripped, blank ones dropped, the rest joined by "; ".

    A user error is printed as one line, yet its message may quote a library's
    (TFDS', TensorFlow's), which can hold newlines; `str.splitlines` also splits
    at carriage returns and the other breaks a terminal shows as a new line.
    """
    lines = (line.strip() for line in str(message).splitlines())
    return "; ".join(line for line in lines if line)


def first_line(error):
    message = getattr(error, "message", None) or str(error)
    return message.strip().splitlines()[0] if message.strip() else type(error).__name__
