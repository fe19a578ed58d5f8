"""Where a new run's weights start: random, a Keras weights file, or another run.

  --init_weights=FILE      every layer but the head from a Keras weights file
                           (legacy `.h5`, as Keras Applications publishes them,
                           or Keras 3 `.weights.h5`), matched by name
                           (`models.weights`); the head is new.
  --pretrained=imagenet    the same, from Keras Applications' ImageNet file for
                           the model, fetched once into Keras' cache
                           (`~/.keras/models`, or `$KERAS_HOME/models`).
  --init_from=RUN_DIR      every layer from that run's latest checkpoint; the
                           head too when both have the same number of classes.

Only the model's weights are taken: the optimizer's state, the step and the
loss scale start fresh. A resumed run restores its own checkpoint instead.

`--preprocessing=auto` follows the weights: Keras Applications' files expect
"caffe" input (`models.inputs`), another run's checkpoint that run's input.
"""

import os

import keras
import tensorflow as tf
from absl import logging

from engine import checkpoints
from engine.config import ConfigError
from engine.files import first_line
from models import create_model, weights

# Keras Applications' ImageNet weights without the classifier (keras/src/applications/resnet.py).
PRETRAINED = {
    ("resnet50", "imagenet"): (
        "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "https://storage.googleapis.com/tensorflow/keras-applications/resnet/",
        "4d473c1dd8becc155b73f8504c6f6626",
    ),
}


def resolve_preprocessing(config, model_dir):
    """`config` with `--preprocessing=auto` decided, so config.json records what was used.

    A resumed run keeps what its config.json records; a new one takes the
    weights' ("caffe" for Keras Applications' files, the source run's for
    `--init_from`), else "scaled".
    """
    if config.preprocessing != "auto":
        return config
    choice = "scaled"
    saved = checkpoints.resumed_config(model_dir, config.fresh)
    if saved is not None:
        choice = _concrete(saved.get("preprocessing"))
    elif config.init_from:
        choice = _concrete(_source_config(config.init_from).get("preprocessing"))
    elif config.init_weights or config.pretrained != "none":
        choice = "caffe"
    return config.replace(preprocessing=choice)


def _concrete(recorded):
    """What a recorded `preprocessing` meant: runs that recorded none, or auto, were scaled."""
    return recorded if recorded in ("scaled", "caffe") else "scaled"


def initialize(config, model, num_classes, pixel_range):
    """Sets `model`'s starting weights as `config` asks (nothing for random ones).

    Raises:
      ConfigError: the file or run cannot be read or does not fit the model.
    """
    if config.pretrained != "none":
        path = pretrained_file(config.model, config.pretrained)
        _load_file(model, path, f"--pretrained={config.pretrained} ({path})")
    elif config.init_weights:
        _load_file(model, config.init_weights, f"--init_weights={config.init_weights}")
    elif config.init_from:
        _copy_from_run(config, model, num_classes, pixel_range)


def _load_file(model, path, what):
    try:
        weights.load_weights_file(model, path)
    except weights.WeightsMismatch as e:
        raise ConfigError(f"{what}: {e}; use a file saved from --model's layers") from None
    logging.info("%s: every layer but the head loaded", what)


def pretrained_file(model_name, source):
    """The local path of Keras Applications' weights file, fetched into Keras' cache once.

    Raises:
      ConfigError: no such weights, or the file is not cached and cannot be fetched.
    """
    if (model_name, source) not in PRETRAINED:
        raise ConfigError(
            f"--pretrained={source} has no weights for --model={model_name}; "
            "use --model=resnet50, or --init_weights=FILE"
        )
    name, base, md5 = PRETRAINED[model_name, source]
    # Keras' own cache (`keras.utils.get_file`'s default), named so the message can say where.
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    cached = os.path.join(home, "models", name)
    if os.path.exists(cached):
        return cached
    logging.info("--pretrained=%s: fetching %s%s", source, base, name)
    try:
        return keras.utils.get_file(
            name, base + name, cache_subdir="models", cache_dir=home, file_hash=md5
        )
    except Exception as e:  # no network, a proxy, a bad download: all the same fix
        raise ConfigError(
            f"--pretrained={source}: cannot fetch {name} ({first_line(e)}); download "
            f"{base}{name} and put it in {os.path.dirname(cached)}/, or pass "
            "--init_weights=FILE"
        ) from None


def _source_config(run_dir):
    """The config.json of the run `--init_from` names; ConfigError if it is not a run."""
    directory = checkpoints.checkpoint_dir(run_dir)
    saved = checkpoints.load_config(directory)
    if saved is None or not checkpoints.list_checkpoints(directory):
        raise ConfigError(
            f"--init_from={run_dir} holds no run ({directory} has no checkpoint and "
            "config.json); name a --model_dir that --mode=train wrote"
        )
    return saved


def _copy_from_run(config, model, num_classes, pixel_range):
    """Copies the layers of the latest checkpoint in `--init_from` into `model`."""
    run_dir = config.init_from
    saved = _source_config(run_dir)
    for name in ("model", "image_size", "patch_size"):
        if saved.get(name, 0) != getattr(config, name):
            raise ConfigError(
                f"--init_from={run_dir} was trained with --{name}={saved.get(name)}, not "
                f"--{name}={getattr(config, name)}; start from a run of the same model and size"
            )
    directory = checkpoints.checkpoint_dir(run_dir)
    classes = checkpoints.load_classes(directory)
    source_classes = len(classes) if classes else num_classes
    source = create_model(
        config.model,
        source_classes,
        config.image_size,
        preprocessing=_concrete(saved.get("preprocessing")),
        pixel_range=pixel_range,
        patch_size=config.patch_size,
    )
    latest = checkpoints.list_checkpoints(directory)[-1]
    try:
        status = tf.train.Checkpoint(model=source).restore(latest).expect_partial()
        status.assert_existing_objects_matched()
    # A truncated file fails wherever its reader runs out of bytes (IndexError,
    # DataLossError...), as in `checkpoints.restore_latest`: any error counts.
    except Exception as e:
        raise ConfigError(
            f"--init_from={run_dir}: cannot restore {latest} ({first_line(e)}); "
            "name a run of the same --model"
        ) from None
    new_head = source_classes != num_classes
    weights.copy_layer_weights(source, model, skip=(weights.HEAD,) if new_head else ())
    logging.info(
        "--init_from=%s: restored %s%s",
        run_dir,
        latest,
        f"; the head is new ({source_classes} classes there, {num_classes} here)"
        if new_head
        else ", head included",
    )
