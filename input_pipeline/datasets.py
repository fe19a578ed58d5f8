"""Turns `--dataset` into train and eval `tf.data` pipelines.

`shapes` and `synthetic` are generated; `tfds:NAME`, `folder:PATH` and
`ships:PATH` list their examples (modules of the same names) and share
`preprocessing`'s decode/augment pipeline.

Train: index-based (see `batching`): the examples are generated or decoded once
into memory outside the iterator, an epoch-wise permutation of their indices picks
them, batched with `drop_remainder=True` so every batch has the same static shape
(XLA compiles once), prefetched; the checkpointed iterator state is a counter.
Eval: one pass, batched, the last partial batch kept so every example counts.
Both are functions of a `tf.distribute.InputContext`, ready for
`strategy.distribute_datasets_from_function`: each input pipeline reads its own
shard and batches at the per-replica batch size.
"""

import dataclasses
import os
from collections.abc import Callable

import tensorflow as tf
from absl import logging

from input_pipeline import batching, folder, preprocessing, shapes, ships, synthetic
from input_pipeline.paths import absolute_path


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What the engine needs to know about a data set."""

    train_fn: Callable[..., tf.data.Dataset]  # (input_context) -> infinite batches
    eval_fn: Callable[..., tf.data.Dataset]  # (input_context) -> one pass of batches
    num_classes: int
    class_names: tuple
    train_size: int
    eval_size: int
    # The range the pipelines scale pixels to (the source's PIXEL_RANGE): what
    # the model is trained on, and what an export maps its [0, 1] images onto.
    pixel_range: tuple
    class_weights: tuple | None = None  # per-class loss weights (--class_weighting)
    skipped_images: int = 0  # undecodable images dropped by --skip_bad_images
    cache: str | None = None  # real images: where training reads them ("" = from the files)
    # Image files: () -> those that cannot be read and decoded now (for an error met mid-run).
    find_bad_files: Callable[[], list] | None = None


def create_data(config):
    """Returns the `DataSpec` for `config.dataset`.

    Args:
      config: an `input_pipeline.DataConfig`.

    Raises:
      ValueError: the data set is unknown or cannot be read (message names it).
    """
    name = config.dataset
    if name.startswith("tfds:"):
        return _tfds_data(config, name[len("tfds:") :])
    if name.startswith(("folder:", "ships:")):
        kind, root = name.split(":", 1)
        source = folder if kind == "folder" else ships
        class_names, train, evals = source.load(root, config)
        return create_file_data(config, class_names, train, evals, name)
    generated = {"shapes": _shapes, "synthetic": _synthetic}
    if name not in generated:
        raise ValueError(f"--dataset={name!r} is not available in this build")
    _check_generated_size(config)
    return _generated_data(config, *generated[name](config))


def _check_generated_size(config):
    """Refuses a generated training set that would not fit half the available memory.

    It is held as float32 pixels; generating it peaks near twice that (measured:
    4,096 examples at 96 px, 0.45 GB, raised the peak by 0.94 GB), within the
    `LOAD_PEAK` that real images are budgeted with.
    """
    available = preprocessing.available_memory()
    size = config.train_examples * config.image_size**2 * 3 * 4
    peak = preprocessing.LOAD_PEAK * size
    if available is None or peak <= available // 2:
        return
    raise preprocessing.DataError(
        f"--dataset={config.dataset}: {config.train_examples} generated examples at "
        f"{config.image_size} px take {size / 1e9:.2f} GB, generating them peaks near "
        f"{peak / 1e9:.2f} GB; the budget is half of the {available / 1e9:.1f} GB available: "
        "lower --train_examples or --image_size"
    )


def _shapes(config):
    """(train_arrays(indices), make_eval(), class names, pixel range) of `shapes`."""

    def train_arrays(indices):
        return shapes.render_examples(config.seed, "train", indices, config.image_size)

    def make_eval():
        return shapes.create_dataset("eval", config.eval_examples, config.image_size, config.seed)

    return train_arrays, make_eval, shapes.CLASS_NAMES, shapes.PIXEL_RANGE


def _synthetic(config):
    """(train_arrays(indices), make_eval(), class names, pixel range) of `synthetic`."""

    def train_arrays(indices):
        images, labels = synthetic.create_arrays(
            config.train_examples, config.image_size, config.seed
        )
        return tf.gather(images, indices), tf.gather(labels, indices)

    def make_eval():
        arrays = synthetic.create_arrays(config.eval_examples, config.image_size, config.seed + 1)
        return tf.data.Dataset.from_tensor_slices(arrays)

    class_names = tuple(str(i) for i in range(synthetic.NUM_CLASSES))
    return train_arrays, make_eval, class_names, synthetic.PIXEL_RANGE


def _generated_data(config, train_arrays, make_eval, class_names, pixel_range):
    """The `DataSpec` of a generated set: `train_arrays(indices)` gives its examples."""

    @batching.once_per_pipeline
    def load(input_context):
        # Each input pipeline's shard only, held in memory outside the iterator.
        return train_arrays(batching.shard_indices(config.train_examples, input_context))

    def train_fn(input_context=None):
        return batching.gather_train_batches(
            load(input_context), config.batch_size, config.seed, input_context, config.deterministic
        )

    def eval_fn(input_context=None):
        return batching.eval_batches(make_eval(), config.eval_batch_size, input_context)

    return DataSpec(
        train_fn,
        eval_fn,
        len(class_names),
        class_names,
        config.train_examples,
        config.eval_examples,
        pixel_range,
    )


def _finish_spec(config, class_names, train_fn, eval_fn, train_labels, eval_labels, skipped):
    """Logs per-class counts and builds the `DataSpec` (with class weights if asked)."""
    num_classes = len(class_names)
    train_counts = preprocessing.class_counts(train_labels, num_classes)
    eval_counts = preprocessing.class_counts(eval_labels, num_classes)
    preprocessing.log_class_counts(f"{config.dataset} train", train_counts, class_names)
    preprocessing.log_class_counts(f"{config.dataset} eval", eval_counts, class_names)
    weights = None
    if config.class_weighting:
        weights = preprocessing.balanced_class_weights(train_counts)
        logging.info("class weights: %s", ", ".join(f"{w:.3f}" for w in weights))
    return DataSpec(
        train_fn,
        eval_fn,
        num_classes,
        tuple(class_names),
        int(train_counts.sum()),
        int(eval_counts.sum()),
        preprocessing.PIXEL_RANGE,
        class_weights=weights,
        skipped_images=skipped,
        cache=config.cache,
    )


def create_file_data(config, class_names, train, evals, what):
    """A `DataSpec` over image files: `train` and `evals` are (paths, labels).

    Every image is decoded once up front (see `preprocessing.drop_undecodable`).

    Raises:
      preprocessing.DataError: an empty split, or an undecodable image without
        `--skip_bad_images`.
    """
    train_paths, train_labels, skipped_train, train_stamps = _decodable(
        config, class_names, "train", *train, what
    )
    eval_paths, eval_labels, skipped_eval, eval_stamps = _decodable(
        config, class_names, "eval", *evals, what
    )
    skipped = skipped_train + skipped_eval
    cache = preprocessing.choose_cache(config, len(train_paths) + len(eval_paths), what)
    config = config.replace(cache=cache)
    train_key = _files_key(train_paths, train_labels, train_stamps)
    eval_key = _files_key(eval_paths, eval_labels, eval_stamps)

    train_fn = preprocessing.create_train_fn(
        preprocessing.file_examples(train_paths, train_labels),
        config,
        len(train_paths),
        train_key,
        read=tf.io.read_file,
    )

    def eval_fn(input_context=None):
        return preprocessing.create_eval_dataset(
            preprocessing.file_examples(eval_paths, eval_labels),
            config,
            config.eval_batch_size,
            eval_key,
            input_context,
            read=tf.io.read_file,
        )

    spec = _finish_spec(config, class_names, train_fn, eval_fn, train_labels, eval_labels, skipped)
    paths = train_paths + eval_paths
    return dataclasses.replace(
        spec, find_bad_files=lambda: preprocessing.undecodable_now(paths, what)
    )


def _decodable(config, class_names, split, paths, labels, what):
    """(paths, labels, how many were dropped, file stamps) of `split` without its undecodable
    images; the files are stat'ed once, for both the remembered check and the cache key.

    Raises:
      preprocessing.DataError: the split is empty, or becomes empty (or, for
        train, loses a whole class), or an image is undecodable without `--skip_bad_images`.
    """
    if not paths:
        # Only a hold-out leaves eval empty: it takes none from a class of one image.
        advice = (
            "add images: the hold-out gives eval an image only from a class with at least 2"
            if split == "eval"
            else "add images"
        )
        raise preprocessing.DataError(f"{what}: the {split} split has no images; {advice}")
    before = preprocessing.class_counts(labels, len(class_names))
    stamps = preprocessing.file_stamps(paths)
    stamp_of = dict(zip(paths, stamps, strict=True))
    paths, labels, skipped = preprocessing.drop_undecodable(
        paths, labels, config.skip_bad_images, f"{what} {split}", stamps
    )
    if not paths:
        raise preprocessing.DataError(f"{what}: every {split} image was undecodable")
    if split == "train":
        # A class skipped to nothing would train silently without it, like an empty folder.
        after = preprocessing.class_counts(labels, len(class_names))
        for name, had, has in zip(class_names, before, after, strict=True):
            if had and not has:
                raise preprocessing.DataError(
                    f"{what}: class {name} has no training image left: all its images "
                    "were undecodable; fix or replace them, or remove the class"
                )
    return paths, labels, skipped, [stamp_of[p] for p in paths]


def _files_key(paths, labels, stamps):
    """The file cache key of a split: what the cache file name's hash covers.

    Absolute names, so the same files named from another folder (a replayed
    flags.txt) find the same cache; each file's size and time, so an image
    overwritten under the same name is not served from a cache written before.
    """
    names = [os.path.abspath(p) for p in paths]
    return (names, labels.tolist(), stamps)


def _tfds_data(config, name):
    # Imported here: TFDS is slow to import and only this source needs it.
    from input_pipeline import tfds_source

    builder, keys, class_names = tfds_source.open_builder(name, config)
    eval_split = config.eval_split or "test"
    splits = (config.train_split, eval_split)
    if tfds_source.random_access(builder):
        (train_ds, train_labels, read), (eval_ds, eval_labels, eval_read) = (
            tfds_source.open_source(name, split, keys, config, builder) for split in splits
        )
    else:
        logging.info(
            "tfds:%s is prepared as %s, which has no random access: its encoded images are "
            "held in memory (`tfds build %s --file_format=array_record` keeps them on disk)",
            name,
            builder.info.file_format.value,
            name,
        )
        read = eval_read = preprocessing.identity
        (train_ds, train_labels), (eval_ds, eval_labels) = (
            tfds_source.load_split(name, split, keys[0], config) for split in splits
        )
    for split, labels in zip(splits, (train_labels, eval_labels), strict=True):
        if labels.size == 0:
            raise preprocessing.DataError(f"--dataset=tfds:{name}: split {split!r} is empty")
    images = int(train_labels.size + eval_labels.size)
    config = config.replace(cache=preprocessing.choose_cache(config, images, f"tfds:{name}"))
    # full_name ("mnist/3.0.1") pins the version: a bare name follows the installed TFDS.
    # --data_dir absolute, so a replayed flags.txt finds the same cache.
    data_dir = absolute_path(config.data_dir)
    key = (name, builder.info.full_name, data_dir)

    train_fn = preprocessing.create_train_fn(
        train_ds, config, int(train_labels.size), (*key, config.train_split), read
    )

    def eval_fn(input_context=None):
        return preprocessing.create_eval_dataset(
            eval_ds, config, config.eval_batch_size, (*key, eval_split), input_context, eval_read
        )

    return _finish_spec(config, class_names, train_fn, eval_fn, train_labels, eval_labels, 0)
