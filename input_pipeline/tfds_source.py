"""`tfds:NAME`: a TensorFlow Datasets image classification set.

Offline by default: an unprepared data set is a one-line error saying how to
prepare it, checked on the builder before `tfds.load` could start a download.
`--download` opts in to TFDS' own `download_and_prepare`.

Images are read still encoded (`tfds.decode.SkipDecoding`), so they go through
the same decode, resize and augmentation path as image files.

A set prepared as ArrayRecord (what `--download` prepares; `tfds build NAME
--file_format=array_record`) is read by index through `tfds.data_source`: the
pipelines hold only (index, label) pairs and each index reads its record from
disk, like an image file. A set prepared as TFRecord (`tfds build`'s default)
has no random access: `tfds.load` reads it and its encoded images are held in
memory.
"""

import re

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from input_pipeline import records
from input_pipeline.preprocessing import DataError, Progress, file_stamps, remembered

SPLITS_GUIDE = "https://www.tensorflow.org/datasets/splits"


def _builder(name, data_dir):
    try:
        return tfds.builder(name, data_dir=data_dir or None)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(
            f"--dataset=tfds:{name}: TFDS has no data set called {name!r}; see "
            "https://www.tensorflow.org/datasets/catalog for the names"
        ) from None


def _image_and_label_keys(name, info):
    keys = info.supervised_keys
    if (
        not keys
        or len(keys) != 2
        or not isinstance(info.features[keys[0]], tfds.features.Image)
        or not isinstance(info.features[keys[1]], tfds.features.ClassLabel)
    ):
        raise DataError(
            f"--dataset=tfds:{name} is not an image classification data set "
            f"(its supervised keys are {keys}); choose one with (image, label) pairs"
        )
    return keys


def open_builder(name, config):
    """Returns (builder, (image key, label key), class names) after checking the data is usable.

    With `--download`, an unprepared set is prepared as ArrayRecord (random access).

    Raises:
      DataError: unknown name, not image classification, or not prepared
        without `--download`.
    """
    builder = _builder(name, config.data_dir)
    keys = _image_and_label_keys(name, builder.info)
    if config.download and not builder.is_prepared():
        builder = tfds.builder(name, data_dir=config.data_dir or None, file_format="array_record")
        builder.download_and_prepare()
    elif not builder.is_prepared():
        flag = f" --data_dir={config.data_dir}" if config.data_dir else ""
        raise DataError(
            f"TFDS data set {name!r} is not prepared in {builder.data_dir}; prepare it once "
            f"with `tfds build {name}{flag}` or rerun with --download"
        )
    return builder, keys, tuple(builder.info.features[keys[1]].names)


def _split_flag(split, config):
    """The flag that named `split`, as an error message names it."""
    if split == config.train_split:
        return f"--train_split={split}"
    if config.eval_split:
        return f"--eval_split={split}"
    return f"the default eval split {split!r} (set --eval_split)"


def _split_error(name, split, config, error):
    """The one-line DataError for a split TFDS cannot read.

    TFDS' message is a general line ("Error parsing split ... See format at:
    URL") and then the reason, on a line of its own: the reason alone is kept,
    without the link, which the message gives once.
    """
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = re.sub(r"\s*See format at:? \S+$", "", lines[-1]) if lines else type(error).__name__
    return DataError(
        f"--dataset=tfds:{name}: {_split_flag(split, config)} cannot be read ({reason}); "
        f"see {SPLITS_GUIDE} for how to write one, e.g. train[:90%]"
    )


def _check_split(name, split, config, builder):
    """Refuses, in one line, a split TFDS cannot parse or one that selects no example.

    Checked on the prepared set's split information, before a reader opens it
    (their own errors for an empty split name no split: "Paths sequence can not
    be of 0 length").
    """
    if not builder.info.splits:  # none recorded (as under tfds.testing.mock_data): the reader's
        return
    try:
        examples = builder.info.splits[split].num_examples
    except (ValueError, KeyError) as e:
        raise _split_error(name, split, config, e) from None
    if not examples:
        raise DataError(
            f"--dataset=tfds:{name}: {_split_flag(split, config)} selects no example; "
            "choose a split or a slice that holds some, e.g. train[:90%]"
        )


def random_access(builder):
    """Whether the prepared set can be read by index (`tfds.data_source`): ArrayRecord files."""
    return builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD


def open_source(name, split, keys, config, builder):
    """(dataset of (int64 index, int32 label), labels, read) for `split` through `tfds.data_source`.

    `read(index)` is a tf op giving the encoded image of example `index`, read
    from disk (a Python call into the ArrayRecord reader inside the pipeline).
    """
    image_key, label_key = keys
    _check_split(name, split, config, builder)
    try:
        source = tfds.data_source(
            name,
            split=split,
            data_dir=config.data_dir or None,
            download=False,
            decoders={image_key: tfds.decode.SkipDecoding()},
        )
    except (ValueError, KeyError) as e:  # a split the check could not see (no split info)
        raise _split_error(name, split, config, e) from None
    labels = _remembered_labels(
        builder, split, lambda: _read_labels(source, label_key, f"tfds:{name} {split}")
    )

    read = records.reader(lambda index: source[index][image_key])
    indices = np.arange(labels.size, dtype=np.int64)
    return tf.data.Dataset.from_tensor_slices((indices, labels)), labels, read


def _remembered_labels(builder, split, read_labels):
    """`read_labels()`, remembered beside the image checks per split and files.

    Keyed by the data set's full name, the split's files with each file's size
    and modification time, and the records it takes from them: a resume or a
    second run does not read every record again; a rebuilt set does.
    """
    try:
        files = builder.info.splits[split].file_instructions
        stamps = file_stamps([f.filename for f in files])
    except (KeyError, OSError, tf.errors.OpError):  # nothing to key on (as under mock_data)
        return read_labels()
    key = (builder.info.full_name, [(f.filename, f.skip, f.take) for f in files], stamps)
    labels = remembered("labels", key, lambda: read_labels().tolist(), "the labels")
    return np.asarray(labels, np.int32)


def _read_labels(source, label_key, what):
    """Every example's label, reading the records in order (a progress line every 10 s)."""
    labels = np.empty(len(source), np.int32)
    progress = Progress(f"reading the labels of {what}", labels.size)
    for i in range(labels.size):
        labels[i] = source[i][label_key]
        progress.update(i + 1)
    return labels


def load_split(name, split, image_key, config):
    """(dataset of (encoded image bytes, int32 label), labels as a numpy array) for `split`.

    Through `tfds.load`, for sets without random access: the encoded images are
    held in memory by the pipelines.
    """
    _check_split(name, split, config, _builder(name, config.data_dir))
    try:
        ds = tfds.load(
            name,
            split=split,
            data_dir=config.data_dir or None,
            download=config.download,
            as_supervised=True,
            shuffle_files=False,
            decoders={image_key: tfds.decode.SkipDecoding()},
        )
    except (ValueError, KeyError) as e:  # a split the check could not see (no split info)
        raise _split_error(name, split, config, e) from None
    ds = ds.map(lambda image, label: (image, tf.cast(label, tf.int32)))
    # One pass over the labels only (images stay encoded) for the class counts.
    total = max(int(ds.cardinality()), 0)  # negative when unknown
    labels, progress = [], Progress(f"reading the labels of tfds:{name} {split}", total)
    for label in ds.map(lambda _, label: label).as_numpy_iterator():
        labels.append(label)
        progress.update(len(labels))
    return ds, np.asarray(labels, np.int32)
