"""`--export_dir`: a SavedModel that serves float32 images -> float32 class probabilities."""

import os
import shutil
import tempfile

import tensorflow as tf
from absl import logging

from engine.files import first_line

# What `tf.saved_model.save` writes into its folder.
SAVED_MODEL_ENTRIES = frozenset({"saved_model.pb", "fingerprint.pb", "variables", "assets"})
# The folders an export makes beside its own, `.<name>.<kind><random>`: only
# these are ever renamed into place or deleted, never a user's `<name>.old`.
NEW, OLD = "export-new-", "export-old-"
# What a folder that cannot be written raises (TensorFlow's file system: OpErrors).
WRITE_ERRORS = (
    OSError,
    tf.errors.PermissionDeniedError,
    tf.errors.ResourceExhaustedError,
    tf.errors.NotFoundError,
    tf.errors.FailedPreconditionError,
    tf.errors.UnavailableError,
)


class ExportError(Exception):
    """The SavedModel could not be written; the training it exports is saved."""


class ServingModule(tf.Module):
    """Wraps a trained model whatever its precision: [0, 1] float32 in, float32 out.

    The images are mapped onto `pixel_range`, the range the training pipeline
    scaled pixels to (`DataSpec.pixel_range`), so the model sees what it was
    trained on. The model's own dtype policy casts them to its compute dtype;
    the softmax runs on float32 logits, so probabilities never round in float16.
    A float8 model serves its float8 matmuls, as evaluated: `float8_state` (the
    recipe's, `TrainState.float8.state`) holds the delayed scales they read.
    """

    def __init__(self, model, image_size, pixel_range, float8_state=None):
        super().__init__(name="serving")
        self.model = model
        self.float8_state = float8_state
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


def export_saved_model(model, image_size, pixel_range, export_dir, float8_state=None):
    """Writes the SavedModel; signature `serving_default(images) -> {"probabilities"}`.

    `images` are float32 in [0, 1]; `pixel_range` is what the model was trained on.

    Raises:
      ExportError: the folder could not be written (the message says why).
    """
    module = ServingModule(model, image_size, pixel_range, float8_state)
    save = lambda path: tf.saved_model.save(
        module, path, signatures={"serving_default": module.serve}
    )
    try:
        _write(save, export_dir)
    except WRITE_ERRORS as e:
        raise ExportError(
            f"the SavedModel could not be written to {export_dir}: {first_line(e)}"
        ) from e
    return module


def _write(save, export_dir):
    """Saves beside `export_dir` and renames into place, or into it, with a warning, if not.

    Every path saves once: with several workers every one saves (the others
    into a temporary folder), and a second save on the chief alone could wait
    forever for theirs.
    """
    if "://" in export_dir:  # object stores have no rename
        save(export_dir)
        return
    export_dir = os.path.normpath(export_dir)
    os.makedirs(os.path.dirname(export_dir) or os.curdir, exist_ok=True)
    _recover(export_dir)
    reason = _in_place_reason(export_dir)
    if reason:
        _warn_in_place(export_dir, reason)
        save(export_dir)
    else:
        _write_beside(save, export_dir)


def _warn_in_place(export_dir, reason):
    logging.warning(
        "%s is written in place, as %s: a stop during the export can leave it half-written",
        export_dir,
        reason,
    )


def _in_place_reason(export_dir):
    """Why `export_dir` cannot be replaced by a rename, or None."""
    if os.path.exists(export_dir) and not os.path.isdir(export_dir):
        return "it is a file"  # the save then fails: one error line
    if not _replaceable(export_dir):
        return "it holds files that are not a SavedModel's"
    if os.path.islink(export_dir):
        return "it is a symbolic link"  # a rename would replace the link, not its target
    if os.path.ismount(export_dir):
        return "it is a mount point"  # rename(2): EBUSY
    return None


def _replaceable(export_dir):
    """Whether `export_dir` is absent, empty or a SavedModel alone (ours to replace)."""
    if not os.path.isdir(export_dir):
        return not os.path.exists(export_dir)
    return set(os.listdir(export_dir)) <= SAVED_MODEL_ENTRIES


def _write_beside(save, export_dir):
    """Saves into a new folder beside `export_dir`, then renames it into place.

    Where no folder can be made beside it, saves into it instead; where the
    rename fails (the previous export is then where it was), copies the saved
    files into it. Either way with a warning, and nothing left beside it.
    """
    try:
        staging = _make_temp(export_dir, NEW)
    except OSError as e:
        _warn_in_place(export_dir, f"no folder can be made beside it ({e.strerror})")
        save(export_dir)
        return
    try:
        new = os.path.join(staging, os.path.basename(export_dir))
        save(new)  # tf.saved_model.save makes `new` as it makes any folder
        reason = _rename_into_place(new, export_dir)
        if reason:
            _warn_in_place(export_dir, reason)
            shutil.copytree(new, export_dir, dirs_exist_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # a stop or failure leaves nothing


def _rename_into_place(new, export_dir):
    """Moves `new` onto `export_dir`, the previous export aside first, then deleted.

    Returns None, or why a rename failed, with `export_dir` as it was.
    """
    old = None
    try:
        if os.path.isdir(export_dir) and os.listdir(export_dir):
            old = os.path.join(_make_temp(export_dir, OLD), os.path.basename(export_dir))
            os.rename(export_dir, old)
        os.rename(new, export_dir)  # onto an empty folder too
    except BaseException as e:
        # A failed rename, or a stop signal between the two: the previous export
        # goes back. If that fails too, it raises, and the next export's
        # `_recover` finds it.
        if old and os.path.isdir(old) and not os.path.exists(export_dir):
            os.rename(old, export_dir)
        if old:
            shutil.rmtree(os.path.dirname(old), ignore_errors=True)
        if not isinstance(e, OSError):
            raise
        return f"it cannot be renamed ({e.strerror})"
    if old:
        shutil.rmtree(os.path.dirname(old), ignore_errors=True)
    return None


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
