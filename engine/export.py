"""`--export_dir`: a SavedModel that serves float32 images -> float32 class probabilities."""

import os
import shutil

import tensorflow as tf
from absl import logging

# What `tf.saved_model.save` writes into its folder.
SAVED_MODEL_ENTRIES = frozenset({"saved_model.pb", "fingerprint.pb", "variables", "assets"})


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
    partial, old = f"{export_dir}.partial", f"{export_dir}.old"
    if not os.path.exists(export_dir) and os.path.isdir(old):
        os.rename(old, export_dir)  # an export stopped between its two renames
    if not _replaceable(export_dir):
        logging.warning(
            "%s holds files that are not a SavedModel's: the export is written among them, "
            "and a stop during it can leave it half-written",
            export_dir,
        )
        save(export_dir)
        return module
    # Written beside it, then renamed into place: a stop (or a failure) during the
    # export leaves the previous export whole, or no folder at all.
    for leftover in (partial, old):
        shutil.rmtree(leftover, ignore_errors=True)
    save(partial)
    if os.path.isdir(export_dir) and os.listdir(export_dir):
        os.rename(export_dir, old)
    os.replace(partial, export_dir)  # onto an empty folder too
    shutil.rmtree(old, ignore_errors=True)
    return module


def _replaceable(export_dir):
    """Whether `export_dir` is absent, empty or a SavedModel alone (ours to replace)."""
    if not os.path.isdir(export_dir):
        return not os.path.exists(export_dir)
    return set(os.listdir(export_dir)) <= SAVED_MODEL_ENTRIES
