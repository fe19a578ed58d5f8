"""Walking a Keras model's layers."""


def all_layers(model):
    """Every layer of `model`, and of the models nested in it, in order."""
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from all_layers(layer)
