"""The one preprocessing path for every image source (tfds, folder, ships).

Each source yields `(path or encoded image bytes, int32 label)`; from there on all
sources share this module:

  decode (JPEG/PNG; grayscale and RGBA become RGB) -> resize to the cached size
  -> cache (uint8) -> [train: shuffle, repeat, random crop + flip] or
  [eval: centre crop] -> normalise to [-1, 1] -> batch -> prefetch.

With `--augment` the cached size is `image_size * 9/8`, so training crops a
random `image_size` window and eval crops the centre one: both see the same
scale. Augmentation uses stateless random ops seeded by (seed, element index),
so a batch is a pure function of the seed and its position: `--deterministic`
then only has to keep tf.data's parallel map in order.
"""

import hashlib
import os

import numpy as np
import tensorflow as tf
from absl import logging

AUTOTUNE = tf.data.AUTOTUNE
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
MAX_SHUFFLE_BUFFER = 16384


class DataError(ValueError):
    """The data cannot be used as given; the message names the file and the fix."""


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


def normalise(image):
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return tf.cast(image, tf.float32) / 127.5 - 1.0


def augment(image, image_size, seed):
    """Random `image_size` crop and random horizontal flip, stateless in `seed` ([2] int)."""
    image = tf.image.stateless_random_crop(image, [image_size, image_size, 3], seed=seed)
    return tf.image.stateless_random_flip_left_right(image, seed=seed + 1)


def centre_crop(image, image_size):
    return tf.image.resize_with_crop_or_pad(image, image_size, image_size)


def file_examples(paths, labels):
    """A dataset of `(path, int32 label)`; pass `read=tf.io.read_file` to the pipelines."""
    return tf.data.Dataset.from_tensor_slices((list(paths), np.asarray(labels, np.int32)))


def _identity(x):
    return x


def shard(ds, input_context):
    """Each input pipeline reads its own shard, before anything is decoded."""
    if input_context is not None and input_context.num_input_pipelines > 1:
        ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    return ds


def per_replica_batch_size(batch_size, input_context):
    if input_context is None:
        return batch_size
    return input_context.get_per_replica_batch_size(batch_size)


def _cache(ds, cache, key):
    """`cache` is "" (off), "memory", or a file-path prefix.

    The file name carries a hash of `key` (the file list, labels and image
    size), so a cache written for other data is never read back by mistake.
    """
    if not cache:
        return ds
    if cache == "memory":
        return ds.cache()
    digest = hashlib.sha1(repr(key).encode()).hexdigest()[:12]
    return ds.cache(f"{cache}-{digest}")


def _options(deterministic):
    options = tf.data.Options()
    options.deterministic = deterministic
    return options


def create_train_dataset(
    examples, config, num_examples, cache_key, input_context=None, read=_identity
):
    """Infinite, shuffled, augmented, normalised batches of static shape.

    Args:
      examples: unbatched dataset of `(x, int32 label)`, where `read(x)` gives
        the encoded image bytes (x is a path for files, the bytes for tfds).
      config: the run's `Config` (image_size, augment, cache, batch_size,
        seed, deterministic).
      num_examples: examples in `examples` (sizes the shuffle buffer).
      cache_key: anything identifying the examples, for the cache file name.
      input_context: a `tf.distribute.InputContext`, or None.
      read: maps an element's `x` to encoded bytes (`tf.io.read_file` for paths).
    """
    size = source_size(config.image_size, config.augment)
    ds = shard(examples, input_context)  # before reading: each pipeline reads only its files
    ds = ds.map(lambda x, y: (decode_and_resize(read(x), size), y), num_parallel_calls=AUTOTUNE)
    ds = _cache(ds, config.cache, ("train", size, cache_key))
    # The cached images are small uint8 squares, so the buffer holds a whole
    # contest-sized split; capped so a large TFDS set does not fill the memory.
    buffer = min(max(num_examples, 1), MAX_SHUFFLE_BUFFER)
    ds = ds.shuffle(buffer, seed=config.seed, reshuffle_each_iteration=True)
    ds = ds.repeat().enumerate()

    def finish(index, example):
        image, label = example
        if config.augment:
            seed = tf.stack([tf.cast(config.seed, tf.int64), index])
            image = augment(image, config.image_size, seed)
        return normalise(image), label

    ds = ds.map(finish, num_parallel_calls=AUTOTUNE)
    ds = ds.batch(per_replica_batch_size(config.batch_size, input_context), drop_remainder=True)
    return ds.prefetch(AUTOTUNE).with_options(_options(config.deterministic))


def create_eval_dataset(
    examples, config, batch_size, cache_key, input_context=None, read=_identity
):
    """One pass of centre-cropped, normalised batches; the last partial batch is kept."""
    size = source_size(config.image_size, config.augment)
    ds = shard(examples, input_context)
    ds = ds.map(lambda x, y: (decode_and_resize(read(x), size), y), num_parallel_calls=AUTOTUNE)
    ds = _cache(ds, config.cache, ("eval", size, cache_key))
    ds = ds.map(
        lambda x, y: (normalise(centre_crop(x, config.image_size)), y),
        num_parallel_calls=AUTOTUNE,
    )
    ds = ds.batch(per_replica_batch_size(batch_size, input_context))
    # Eval keeps its order whatever --deterministic says: predictions are matched to rows.
    return ds.prefetch(AUTOTUNE)


def find_undecodable(paths):
    """Decodes every file once; returns the paths that cannot be decoded, in order.

    A cheap pass before training, so a corrupt or truncated file is named up
    front instead of failing (or hanging a parallel map) mid-run.
    """
    paths = list(paths)
    if not paths:
        return []
    ds = tf.data.Dataset.from_tensor_slices((np.arange(len(paths)), paths))
    ds = ds.map(
        lambda i, p: (i, tf.shape(decode_rgb(tf.io.read_file(p)))),
        num_parallel_calls=AUTOTUNE,
    )
    decoded = set()
    for index, _ in ds.ignore_errors().as_numpy_iterator():
        decoded.add(int(index))
    return [p for i, p in enumerate(paths) if i not in decoded]


def drop_undecodable(paths, labels, skip_bad_images, what):
    """Checks every image of a split; returns (paths, labels, skipped count).

    Raises:
      DataError: an image cannot be decoded and `skip_bad_images` is off.
    """
    bad = find_undecodable(paths)
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
