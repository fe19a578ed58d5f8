"""What every model shares: its input, its float32 head, and walking its layers."""

import keras


def model_inputs(image_size, preprocess=None):
    """(model input, what the first layer sees): `preprocess` (a layer or None) between."""
    inputs = keras.Input((image_size, image_size, 3), name="images")
    return inputs, preprocess(inputs) if preprocess else inputs


def head(features, num_classes):
    """The classifier: float32, as a float16 softmax/cross-entropy loses precision and overflows."""
    return keras.layers.Dense(num_classes, dtype="float32", name="logits")(features)


def all_layers(model):
    """Every layer of `model`, and of the models nested in it, in order."""
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from all_layers(layer)
