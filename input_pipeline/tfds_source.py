"""`tfds:NAME`: a TensorFlow Datasets image classification set through `tfds.load`.

Offline by default: an unprepared data set is a one-line error saying how to
prepare it, checked on the builder before `tfds.load` could start a download.
`--download` opts in to TFDS' own `download_and_prepare`.

Images are read still encoded (`tfds.decode.SkipDecoding`), so they go through
the same decode, resize and augmentation path as image files.
"""

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from input_pipeline.preprocessing import DataError


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
    """Returns (builder, image key, class names) after checking the data is usable.

    Raises:
      DataError: unknown name, not image classification, or not prepared
        without `--download`.
    """
    builder = _builder(name, config.data_dir)
    image_key, label_key = _image_and_label_keys(name, builder.info)
    if not config.download and not builder.is_prepared():
        flag = f" --data_dir={config.data_dir}" if config.data_dir else ""
        raise DataError(
            f"TFDS data set {name!r} is not prepared in {builder.data_dir}; prepare it once "
            f"with `tfds build {name}{flag}` or rerun with --download"
        )
    return builder, image_key, tuple(builder.info.features[label_key].names)


def load_split(name, split, image_key, config):
    """(dataset of (encoded image bytes, int32 label), labels as a numpy array) for `split`."""
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
    except (ValueError, KeyError) as e:  # an unknown split string
        raise DataError(f"--dataset=tfds:{name}: cannot read split {split!r}: {e}") from None
    ds = ds.map(lambda image, label: (image, tf.cast(label, tf.int32)))
    # One pass over the labels only (images stay encoded) for the class counts.
    labels = np.fromiter(ds.map(lambda _, label: label).as_numpy_iterator(), np.int32)
    return ds, labels
