"""Path spellings shared by the pipeline and the engine's flag checks (no TensorFlow)."""

import os


def absolute_path(path):
    """A local relative `path` made absolute; "", absolute and `scheme://` paths as given.

    A trailing separator is kept: `--cache=DIR/` means a folder even before it exists.
    """
    if not path or "://" in path or os.path.isabs(path):
        return path
    absolute = os.path.abspath(path)
    return os.path.join(absolute, "") if path.endswith(("/", os.sep)) else absolute


def cache_prefix(cache):
    """What a file `--cache`'s file names start with (`-<hash>` and TF's suffixes follow).

    A folder (existing, or named with a trailing separator) holds the files as
    `cache-<hash>*`; any other value is itself the prefix, so `runs/imgs` gives
    `runs/imgs-<hash>*`.
    """
    if cache.endswith(("/", os.sep)) or os.path.isdir(cache):
        return os.path.join(cache, "cache")
    return cache
