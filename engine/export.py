"""`--export_dir`: a SavedModel that serves float32 images -> float32 class probabilities."""

import os
import shutil
import tempfile

import tensorflow as tf
from absl import logging

# What `tf.saved_model.save` writes into its folder.
SAVED_MODEL_ENTRIES = frozenset({"saved_model.pb", "fingerprint.pb", "variables", "assets"})
# The folders an export makes beside its own, `.<name>.<kind><random>`: only
# these are ever renamed into place or deleted, never a user's `<name>.old`.
NEW, OLD = "export-new-", "export-old-"


class ServingModule(tf.Module):
    """Wraps a trained model whatever its precision: [0, 1] float32 in, float32 out.

    The images are mapped onto `pixel_range`, the range the training pipeline
    scaled pixels to (`DataSpec.pixel_range`), so the model sees what it was
    trained on. The model's own dtype policy casts them to its compute dtype;
    the softmax runs on float32 logits, so probabilities never round in float16.
    """

    def __init__(self, model, image_size, pixel_range):
        super().__init__(name="serving")
        self.model = model
        self.pixel_range = tuple(float(v) for v in pixel_range)
        spec = tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name="images")
        self.serve = tf.function(self._serve, input_signature=[spec])

    def _serve(self, images):
        low, high = self.pixel_range
        if (low, high) != (0.0, 1.0):
            # Scaling by 2 is exact: [0, 1] images of uint8 / 255 become, bit for
            # bit, what `preprocessing.normalise` gives the same pixels.
            images = images * (high - low) + low
        logits = tf.cast(self.model(images, training=False), tf.float32)
        return {"probabilities": tf.nn.softmax(logits)}


def export_saved_model(model, image_size, pixel_range, export_dir):
    """Writes the SavedModel; signature `serving_default(images) -> {"probabilities"}`.

    `images` are float32 in [0, 1]; `pixel_range` is what the model was trained on.
    """
    module = ServingModule(model, image_size, pixel_range)
    save = lambda path: tf.saved_model.save(
        module, path, signatures={"serving_default": module.serve}
    )
    if "://" in export_dir:  # object stores have no rename
        save(export_dir)
        return module
    export_dir = os.path.normpath(export_dir)
    os.makedirs(os.path.dirname(export_dir) or os.curdir, exist_ok=True)
    _recover(export_dir)
    if not _replaceable(export_dir):
        logging.warning(
            "%s holds files that are not a SavedModel's: the export is written among them, "
            "and a stop during it can leave it half-written",
            export_dir,
        )
        save(export_dir)
        return module
    _write_beside(save, export_dir)
    return module


def _replaceable(export_dir):
    """Whether `export_dir` is absent, empty or a SavedModel alone (ours to replace)."""
    if not os.path.isdir(export_dir):
        return not os.path.exists(export_dir)
    return set(os.listdir(export_dir)) <= SAVED_MODEL_ENTRIES


def _write_beside(save, export_dir):
    """Saves into a new folder beside `export_dir`, then renames it into place.

    A stop (or a failure) during the export leaves the previous export whole,
    or no folder at all.
    """
    staging = _make_temp(export_dir, NEW)
    try:
        new = os.path.join(staging, os.path.basename(export_dir))
        save(new)  # tf.saved_model.save makes `new` as it makes any folder
        _rename_into_place(new, export_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # a stop or failure leaves nothing


def _rename_into_place(new, export_dir):
    """Moves `new` onto `export_dir`, the previous export aside first, then deleted."""
    old = None
    if os.path.isdir(export_dir) and os.listdir(export_dir):
        old = os.path.join(_make_temp(export_dir, OLD), os.path.basename(export_dir))
        os.rename(export_dir, old)
    os.rename(new, export_dir)  # onto an empty folder too
    if old:
        shutil.rmtree(os.path.dirname(old), ignore_errors=True)


def _make_temp(export_dir, kind):
    """A new, empty folder beside `export_dir`, named `.<name>.<kind><random>`."""
    parent, name = os.path.split(export_dir)
    return tempfile.mkdtemp(dir=parent or os.curdir, prefix=f".{name}.{kind}")


def _ours(export_dir, kind):
    """The folders beside `export_dir` that `_make_temp(export_dir, kind)` made."""
    parent, name = os.path.split(export_dir)
    prefix = f".{name}.{kind}"
    found = [os.path.join(parent, e) for e in os.listdir(parent or os.curdir)]
    return [p for p in found if os.path.basename(p).startswith(prefix) and os.path.isdir(p)]


def _recover(export_dir):
    """Puts back an export stopped between its two renames; deletes what stops left beside it."""
    if not os.path.lexists(export_dir):
        moved = [os.path.join(d, os.path.basename(export_dir)) for d in _ours(export_dir, OLD)]
        moved = [p for p in moved if os.path.isdir(p)]
        if moved:  # one, unless several exports stopped there in a row: the newest
            os.rename(max(moved, key=os.path.getmtime), export_dir)
    for leftover in _ours(export_dir, NEW) + _ours(export_dir, OLD):
        shutil.rmtree(leftover, ignore_errors=True)
