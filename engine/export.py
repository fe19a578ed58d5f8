"""`--export_dir`: a SavedModel that serves float32 images -> float32 class probabilities."""

import tensorflow as tf


class ServingModule(tf.Module):
    """Wraps a trained model whatever its precision: float32 in, float32 out.

    The model's own dtype policy casts the float32 images to its compute dtype;
    the softmax runs on float32 logits, so probabilities never round in float16.
    """

    def __init__(self, model, image_size):
        super().__init__(name="serving")
        self.model = model
        spec = tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name="images")
        self.serve = tf.function(self._serve, input_signature=[spec])

    def _serve(self, images):
        logits = tf.cast(self.model(images, training=False), tf.float32)
        return {"probabilities": tf.nn.softmax(logits)}


def export_saved_model(model, image_size, export_dir):
    """Writes the SavedModel; signature `serving_default(images) -> {"probabilities"}`."""
    module = ServingModule(model, image_size)
    tf.saved_model.save(module, export_dir, signatures={"serving_default": module.serve})
    return module
