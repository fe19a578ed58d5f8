"""`--export_dir`: a SavedModel that serves float32 images -> float32 class probabilities."""

import tensorflow as tf


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
    tf.saved_model.save(module, export_dir, signatures={"serving_default": module.serve})
    return module
