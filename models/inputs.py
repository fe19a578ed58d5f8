"""What a model does to its input pixels before the first layer.

  "scaled": nothing; the pipeline's range (`[-1, 1]` for photos) goes in as it is.
  "caffe":  what Keras Applications' ImageNet ResNet50 weights were trained on,
            Keras' own `keras.applications.resnet50.preprocess_input`: pixels in
            [0, 255], RGB turned BGR, the ImageNet mean subtracted.

The step is a layer at the model's input, so training, eval, `--mode=predict`
and the exported SavedModel (which still takes [0, 1] images) all apply it
alike, and the pipeline stays the same for every model.
"""

import keras

PREPROCESSINGS = ("scaled", "caffe")


@keras.saving.register_keras_serializable(package="models")
class CaffeInput(keras.layers.Layer):
    """Pipeline pixels in `pixel_range` -> Keras' ResNet50 `preprocess_input`, in float32."""

    def __init__(self, pixel_range=(-1.0, 1.0), **kwargs):
        kwargs.setdefault("dtype", "float32")  # exact whatever the policy; the conv casts
        super().__init__(**kwargs)
        self.pixel_range = tuple(float(v) for v in pixel_range)

    def call(self, images):
        low, high = self.pixel_range
        pixels = (images - low) * (255.0 / (high - low))
        return keras.applications.resnet50.preprocess_input(pixels)

    def get_config(self):
        return super().get_config() | {"pixel_range": self.pixel_range}


def input_layer(preprocessing, pixel_range):
    """The layer `preprocessing` puts at a model's input, or None for "scaled"."""
    if preprocessing not in PREPROCESSINGS:
        raise ValueError(f"unknown preprocessing {preprocessing!r}; one of {PREPROCESSINGS}")
    if preprocessing == "scaled":
        return None
    return CaffeInput(pixel_range, name="caffe_preprocessing")
