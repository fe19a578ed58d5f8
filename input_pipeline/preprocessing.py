"""The one preprocessing path for every image source (tfds, folder, ships).

Each source yields `(path or encoded image bytes, int32 label)`; from there on all
sources share this module:

  decode (JPEG/PNG; grayscale and RGBA become RGB) -> resize to the cached size
  -> cache (uint8) -> [train: pick by shuffled index, random crop + flip] or
  [eval: centre crop] -> normalise to [-1, 1] -> batch -> prefetch.

Training is index-based (`batching.train_batches`): what the examples are made
from (decoded uint8 images in memory, or paths, TFDS record indices or decoded-
cache record indices, each read at every step) is held outside the iterator, so
a checkpoint of the train iterator does not contain it.

With `--augment` the cached size is `image_size * 9/8`, so training crops a
random `image_size` window and eval crops the centre one: both see the same
scale. Augmentation uses stateless random ops seeded by (seed, stream position),
so a batch is a pure function of the seed and its position: `--deterministic`
then only has to keep tf.data's parallel map in order.
"""

import contextlib
import hashlib
import json
import os
import shutil
import time

import numpy as np
import tensorflow as tf
from absl import logging

from input_pipeline import batching, records
from input_pipeline.paths import cache_prefix

AUTOTUNE = tf.data.AUTOTUNE
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


class DataError(ValueError):
    """The data cannot be used as given; the message names the file and the fix.

    One line by construction, as the engine's user errors (`engine.files.one_line`,
    which the pipeline does not import): messages quote TFDS' and TensorFlow's
    text, which may hold newlines.
    """

    def __init__(self, message):
        lines = (line.strip() for line in str(message).splitlines())
        super().__init__("; ".join(line for line in lines if line))


def source_size(image_size, augment):
    """Side of the cached square image: a margin for the random crop when augmenting."""
    return image_size + image_size // 8 if augment else image_size


def decode_rgb(encoded):
    """Encoded JPEG/PNG bytes -> uint8 [H, W, 3]; TF converts grayscale and RGBA to RGB."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def decode_and_resize(encoded, size):
    """Decodes and resizes to `size`² (aspect ratio not kept); uint8 so the cache stays small."""
    image = tf.image.resize(decode_rgb(encoded), [size, size], antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


# What `normalise` maps pixels to, so the model's input range: an exported
# model maps its [0, 1] input onto it (see `DataSpec.pixel_range`).
PIXEL_RANGE = (-1.0, 1.0)


def normalise(image):
    """uint8 [0, 255] -> float32 `PIXEL_RANGE` ([-1, 1])."""
    low, high = PIXEL_RANGE
    return tf.cast(image, tf.float32) / (255.0 / (high - low)) + low


def augment(image, image_size, seed):
    """Random `image_size` crop and random horizontal flip, stateless in `seed` ([2] int)."""
    image = tf.image.stateless_random_crop(image, [image_size, image_size, 3], seed=seed)
    return tf.image.stateless_random_flip_left_right(image, seed=seed + 1)


def centre_crop(image, image_size):
    return tf.image.resize_with_crop_or_pad(image, image_size, image_size)


def file_examples(paths, labels):
    """A dataset of `(path, int32 label)`; pass `read=tf.io.read_file` to the pipelines."""
    return tf.data.Dataset.from_tensor_slices((list(paths), np.asarray(labels, np.int32)))


def file_stamps(paths):
    """(size, mtime in ns) of each file, for a cache key: content rewritten in place changes it.

    One `stat` per file (a symlink's target), taken once at start-up; through
    `tf.io.gfile` for a remote (`scheme://`) file, as its `stat` of a local file
    keeps whole seconds only.
    """
    return [_stamp(path) for path in paths]


def _stamp(path):
    if "://" in path:
        stat = tf.io.gfile.stat(path)
        return stat.length, stat.mtime_nsec
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


def identity(x):
    return x


# Decoding a split into memory raises the process's peak (and, as the allocator
# keeps it, its resident size) by nearly 3 times the decoded size: measured on
# 1,000 JPEGs decoded at 504 px (0.69 GB), +1.87 GB, 2.7x; the array they are
# written into, its copy into a tensor, the full-size JPEGs in flight. Rounded up.
LOAD_PEAK = 3.0


def available_memory():
    """Bytes the kernel estimates a new process can use (Linux's MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def choose_cache(config, num_images, what):
    """`config.cache` with "auto" decided: "memory" if the decoded images fit, else "".

    The budget is half the available memory (the rest is for the model, its
    activations and everything else running), against `LOAD_PEAK` times the
    decoded size. `--cache=memory` is refused beyond it, with the figures,
    before anything is decoded. File caches hold nothing in memory.

    Raises:
      DataError: `--cache=memory` that does not fit.
    """
    available = available_memory()
    if config.cache not in ("auto", "memory") or available is None:
        return "memory" if config.cache == "auto" else config.cache
    size = source_size(config.image_size, config.augment)
    decoded = num_images * size * size * 3
    budget = available // 2
    fits = LOAD_PEAK * decoded <= budget
    figures = (
        f"{num_images} images decoded at {size} px take {decoded / 1e9:.2f} GB, loading them "
        f"peaks near {LOAD_PEAK * decoded / 1e9:.2f} GB; the budget is half of the "
        f"{available / 1e9:.1f} GB available"
    )
    if config.cache == "auto":
        how = "held in memory" if fits else "streamed from the files, decoded at every step"
        logging.info("--cache=auto for %s: %s: %s", what, figures, how)
        return "memory" if fits else ""
    if not fits:
        raise DataError(
            f"--cache=memory for {what}: {figures}; use --cache=auto or --cache= to stream the "
            "images from their files, or --cache=DIR to decode them once into a cache on disk"
        )
    return config.cache


def _cache(ds, cache, key):
    """`cache` is "" (off), "memory", a folder, or a file-path prefix (`cache_prefix`).

    The file name carries a hash of `key` (the file list, labels, each file's
    size and modification time, and the image size), so a cache written for
    other data, or for files since overwritten, is never read back by mistake.
    """
    if not cache:
        return ds
    if cache == "memory":
        return ds.cache()
    path = _cache_path(cache, key)
    # TF refuses a cache with a lock next to it (another writer, or one killed
    # mid-write); say so before the run starts instead of failing inside it.
    locks = tf.io.gfile.glob(f"{path}_*.lockfile")
    if locks:
        raise DataError(
            f"--cache={cache}: {locks[0]} locks its cache file; a run killed while writing the "
            f"cache leaves one. If no other run is writing it, delete {path}* (the lock and the "
            "partial cache), or use another --cache"
        )
    return ds.cache(path)


def _cache_path(cache, key):
    """The cache files' path without TF's suffixes: `DIR/cache-<hash>` or `PREFIX-<hash>`."""
    return f"{cache_prefix(cache)}-{hashlib.sha1(repr(key).encode()).hexdigest()[:12]}"


def _written(cache, key):
    """Whether a file cache for `key` is complete on disk (its index is written last)."""
    return tf.io.gfile.exists(_cache_path(cache, key) + ".index")


def _pipeline_key(key, input_context):
    """The cache key of one input pipeline: with several, each caches only its shard."""
    if input_context is None or input_context.num_input_pipelines == 1:
        return key  # the whole data set, under the same file name as without a context
    return (*key, "shard", input_context.input_pipeline_id, input_context.num_input_pipelines)


def _decoded_arrays(ds, config, num_examples, read):
    """Decodes this pipeline's images once into memory: (uint8 [n, s, s, 3], labels)."""
    size = source_size(config.image_size, config.augment)
    ds = ds.map(lambda x, y: (decode_and_resize(read(x), size), y), num_parallel_calls=AUTOTUNE)
    return _gather_with_progress(ds, num_examples, size)


def _record_cache(examples, config, key, read):
    """((indices, labels), decode) of this pipeline's images in a decoded cache on disk.

    The first run decodes every image once into `<cache path>.array_record`, one
    record of uint8 pixels per image; then each step reads its batch's records
    by index (`decode(index)`): no JPEG decoding and nothing held in memory.

    Raises:
      DataError: the cache file is damaged, or the disk has no room for it.
    """
    xs, labels = examples
    n, size = int(labels.shape[0]), source_size(config.image_size, config.augment)
    path = _cache_path(config.cache, key) + ".array_record"
    if not os.path.exists(path):
        _check_room(config.cache, path, n * size * size * 3)
        images = tf.data.Dataset.from_tensor_slices(xs).map(
            lambda x: decode_and_resize(read(x), size), num_parallel_calls=AUTOTUNE
        )
        progress = Progress(f"writing the decoded cache {path}", n)
        try:
            records.write(images.prefetch(AUTOTUNE).as_numpy_iterator(), path, progress)
        except OSError as e:
            raise DataError(
                f"--cache={config.cache}: {e}; free some space or give another "
                "folder, or use --cache= to decode at every step"
            ) from None
    try:
        source = records.open_records(path, n)
    except ValueError as e:
        raise DataError(
            f"--cache={config.cache}: the cache file {path} is damaged ({e}); delete it to "
            "rebuild it, or use --cache= to decode at every step"
        ) from None
    except OSError as e:
        raise DataError(f"--cache={config.cache}: {e}") from None
    read_record = records.reader(lambda index: source[index])

    def decode(index):
        return tf.reshape(tf.io.decode_raw(read_record(index), tf.uint8), [size, size, 3])

    return (tf.range(n, dtype=tf.int64), labels), decode


def _check_room(cache, path, needed):
    """Raises `DataError` when the disk holding `path` has less than `needed` bytes free."""
    folder = os.path.dirname(os.path.abspath(path))
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise DataError(
            f"--cache={cache}: the decoded images need {needed / 1e9:.2f} GB and "
            f"{folder} has {free / 1e9:.2f} GB free; free some "
            "space, give --cache another folder, or use --cache= to decode at every step"
        )


def _gather_with_progress(ds, num_examples, size):
    """(uint8 [n, size, size, 3], int32 [n]) of a finite dataset of at most
    `num_examples` decoded images, written one by one into a preallocated array
    (a progress line every 10 s)."""
    images = np.empty((num_examples, size, size, 3), np.uint8)
    labels = np.empty(num_examples, np.int32)
    n, progress = 0, Progress("decoding images into memory", num_examples)
    for image, label in ds.prefetch(AUTOTUNE).as_numpy_iterator():
        images[n], labels[n] = image, label
        n += 1
        progress.update(n)
    return tf.constant(images[:n]), tf.constant(labels[:n])


@contextlib.contextmanager
def _damage_is_an_error(cache, key):
    """Turns what reading a damaged file cache raises into the one-line `DataError`.

    Truncated or corrupted files raise the first three errors. A missing file
    (`NotFoundError`) means a damaged cache only when the cache was written
    (complete) before the read: while it is being written, it is a source image
    that went missing.
    """
    errors = (tf.errors.DataLossError, tf.errors.InternalError, tf.errors.OutOfRangeError)
    if _written(cache, key):  # decided before the read, which may write it
        errors = (*errors, tf.errors.NotFoundError)
    try:
        yield
    except errors as e:
        raise DataError(
            f"--cache={cache}: the cache files are damaged ({type(e).__name__}); delete "
            f"{_cache_path(cache, key)}* to rebuild them, or use --cache=memory"
        ) from None


def create_train_fn(examples, config, num_examples, cache_key, read=identity):
    """A `train_fn(input_context=None)`: infinite, shuffled, augmented, normalised batches.

    The iterator state is a counter (see `batching`): with `--cache=memory`,
    each input pipeline's images are decoded once (on its first call) into a
    uint8 tensor held outside the iterator and gathered by index; with a file
    cache they are decoded once into records on disk, which each step reads by
    index; with `--cache=""` only the `x`s are held and each step reads and
    decodes its images again.

    Args:
      examples: unbatched dataset of `(x, int32 label)`, where `read(x)` gives
        the encoded image bytes (x is a path for files, the bytes for a tfds
        split read by `tfds.load`, an index for a `tfds.data_source`).
      config: the run's `Config` (image_size, augment, cache, batch_size,
        seed, deterministic).
      num_examples: examples in `examples`.
      cache_key: anything identifying the examples, for the cache file name.
      read: maps an element's `x` to encoded bytes (`tf.io.read_file` for paths).
    """
    size = source_size(config.image_size, config.augment)

    @batching.once_per_pipeline
    def load(input_context):
        """(tensors gathered by index, decode): what a training example is made from."""
        shard = batching.shard(examples, input_context)  # each pipeline reads only its files
        if config.cache == "memory":
            count = len(batching.shard_indices(num_examples, input_context))
            return _decoded_arrays(shard, config, count, read), identity
        # Paths (or tfds' encoded bytes, or record indices) and labels only.
        held = batching.gather_all(shard, num_examples)
        if config.cache:
            key = _pipeline_key(("train", size, cache_key), input_context)
            return _record_cache(held, config, key, read)
        return held, lambda x: decode_and_resize(read(x), size)

    def train_fn(input_context=None):
        tensors, decode = load(input_context)

        def finish(example, position):
            x, label = example
            image = decode(x)
            if config.augment:
                seed = tf.stack([tf.cast(config.seed, tf.int64), position])
                image = augment(image, config.image_size, seed)
            return normalise(image), label

        return batching.gather_train_batches(
            tensors,
            config.batch_size,
            config.seed,
            input_context,
            config.deterministic,
            finish,
        )

    return train_fn


def create_eval_dataset(examples, config, batch_size, cache_key, input_context=None, read=identity):
    """One pass of centre-cropped, normalised batches; the last partial batch is kept."""
    size = source_size(config.image_size, config.augment)
    ds = batching.shard(examples, input_context)
    ds = ds.map(lambda x, y: (decode_and_resize(read(x), size), y), num_parallel_calls=AUTOTUNE)
    key = _pipeline_key(("eval", size, cache_key), input_context)
    ds = _cache(ds, config.cache, key)
    if config.cache not in ("", "memory") and _written(config.cache, key):
        # An earlier run's cache is read through once now, so a damaged one is
        # this one-line error at start-up, not a failure at the first eval after
        # training. A new one is written by the first eval, where a stop signal
        # lets it finish.
        with _damage_is_an_error(config.cache, key):
            ds.reduce(0, lambda n, _: n + 1).numpy()
    ds = ds.map(
        lambda x, y: (normalise(centre_crop(x, config.image_size)), y),
        num_parallel_calls=AUTOTUNE,
    )
    ds = ds.batch(batching.per_replica_batch_size(batch_size, input_context))
    # Eval keeps its order whatever --deterministic says: predictions are matched to rows.
    return ds.prefetch(AUTOTUNE)


def find_undecodable(paths, what="images", stamps=None):
    """Decodes every file once; returns the paths that cannot be decoded, in order.

    A pass before training, so a corrupt or truncated file is named up front
    instead of failing (or hanging a parallel map) mid-run. Its result is
    remembered (`remembered`): a resume or another run over the same files,
    unchanged in size and modification time (`stamps`: their `file_stamps`, if
    the caller took them already), does not decode them again.
    """
    paths = list(paths)
    if not paths:
        return []
    stamps = file_stamps(paths) if stamps is None else stamps
    key = [(os.path.abspath(p), *stamp) for p, stamp in zip(paths, stamps, strict=True)]
    check = remembered(
        "checked",
        key,
        lambda: {"images": len(paths), "undecodable": _decode_all(paths, what)},
        "the image check",
    )
    return check["undecodable"]


def undecodable_now(paths, what="images"):
    """`find_undecodable` without the remembered result: what fails to decode now."""
    return _decode_all(list(paths), what)


def checked_images_dir():
    """Where checks and labels are kept: $XDG_CACHE_HOME (or ~/.cache)/mixed-precision-engine."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "mixed-precision-engine")


def remembered(kind, key, compute, what):
    """`compute()` (JSON-serialisable), remembered across runs under `key`.

    Kept in `checked_images_dir()/<kind>-<hash of key>.json`: a later call with
    the same key (the files' names, sizes and times) reads it back instead of
    computing it again. A file that cannot be read is computed again; one that
    cannot be written is a warning naming `what`.
    """
    digest = hashlib.sha1(repr(key).encode()).hexdigest()[:16]
    path = os.path.join(checked_images_dir(), f"{kind}-{digest}.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        pass
    value = compute()
    partial = f"{path}.{os.getpid()}.tmp"  # two runs at once each write their own
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(partial, "w") as f:
            json.dump(value, f)
        os.replace(partial, path)
    except OSError as e:
        logging.warning("cannot remember %s in %s (%s)", what, path, e)
    return value


def _decode_all(paths, what):
    """The undecodable `paths`, decoding them in parallel, with a progress line every 10 s."""
    ds = tf.data.Dataset.from_tensor_slices((np.arange(len(paths)), paths))
    ds = ds.map(
        lambda i, p: (i, tf.shape(decode_rgb(tf.io.read_file(p)))),
        num_parallel_calls=AUTOTUNE,
        deterministic=False,
    )
    decoded, progress = set(), Progress(f"checking {what}", len(paths))
    for index, _ in ds.ignore_errors().as_numpy_iterator():
        decoded.add(int(index))
        progress.update(len(decoded))
    logging.info("checked %d images of %s in %.1f s", len(paths), what, progress.seconds())
    return [p for i, p in enumerate(paths) if i not in decoded]


class Progress:
    """Logs `doing`: count of total, rate, ETA, at most every `every` seconds.

    For the long start-up jobs: the image check, decoding into memory, writing
    the decoded cache on disk, reading a TFDS set's labels.
    """

    def __init__(self, doing, total, every=10.0):
        self.doing, self.total, self.every = doing, total, every
        self.start = self.shown = time.monotonic()

    def update(self, done):
        now = time.monotonic()
        if now - self.shown < self.every:
            return
        self.shown = now
        rate = done / max(now - self.start, 1e-9)
        eta = int((self.total - done) / rate) if rate else 0
        logging.info(
            "%s: %d of %d, %.0f/s, ETA %d:%02d:%02d",
            self.doing,
            done,
            self.total,
            rate,
            eta // 3600,
            eta // 60 % 60,
            eta % 60,
        )

    def seconds(self):
        return time.monotonic() - self.start


def drop_undecodable(paths, labels, skip_bad_images, what, stamps=None):
    """Checks every image of a split; returns (paths, labels, skipped count).

    `stamps`: the files' `file_stamps`, if the caller took them already.

    Raises:
      DataError: an image cannot be decoded and `skip_bad_images` is off.
    """
    bad = find_undecodable(paths, what, stamps)
    if not bad:
        return list(paths), np.asarray(labels, np.int32), 0
    if not skip_bad_images:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DataError(
            f"cannot decode image {bad[0]}{more} in {what}: corrupt, truncated or not a "
            "JPEG/PNG; fix or remove it, or pass --skip_bad_images"
        )
    for path in bad:
        logging.warning("skipping undecodable image %s", path)
    logging.warning("skipped %d undecodable image(s) in %s", len(bad), what)
    bad_set = set(bad)
    keep = [i for i, p in enumerate(paths) if p not in bad_set]
    return [paths[i] for i in keep], np.asarray(labels, np.int32)[keep], len(bad)


def stratified_holdout(names, labels, fraction):
    """Deterministic, stratified split of example indices into (train, eval).

    Within each class the examples are ordered by a hash of their name, and the
    first `round(fraction * n)` (at least one when the class has two or more)
    go to eval. The split depends only on the names: not on `--seed`, the file
    system's listing order or the machine, and adding a file moves no other.
    """
    labels = np.asarray(labels)
    train, held = [], []
    for label in np.unique(labels):
        members = sorted(
            np.flatnonzero(labels == label).tolist(),
            key=lambda i: hashlib.sha1(names[i].encode()).hexdigest(),
        )
        # At least one eval and one train example per class when it has two.
        n = len(members)
        n_eval = min(max(round(fraction * n), 1), n - 1) if n >= 2 else 0
        held.extend(members[:n_eval])
        train.extend(members[n_eval:])
    return sorted(train), sorted(held)


def class_counts(labels, num_classes):
    return np.bincount(np.asarray(labels, np.int64), minlength=num_classes)


def log_class_counts(what, counts, class_names):
    logging.info(
        "%s: %d examples; per class: %s",
        what,
        int(counts.sum()),
        ", ".join(f"{n} {int(c)}" for n, c in zip(class_names, counts, strict=True)),
    )


def balanced_class_weights(counts):
    """`n / (num_classes * n_c)`: each class contributes equally to the mean loss."""
    counts = np.asarray(counts, np.float64)
    weights = counts.sum() / (len(counts) * np.maximum(counts, 1.0))
    return tuple(float(w) for w in weights)


def is_image_file(name):
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
