"""ResNets for image classification: the seed's ResNet50, a CPU-sized one, a tiny one.

Layers take the ambient Keras dtype policy (see `registry.create_model`); only the
head is pinned to float32 so logits, softmax and the loss keep full precision.
Channel counts are multiples of 8, which tensor cores need for float16 matmuls.
"""

import keras
from keras import layers

from models.layers import head, model_inputs


def _conv_bn(x, filters, kernel, strides=1, name=None):
    x = layers.Conv2D(filters, kernel, strides, padding="same", use_bias=False, name=name)(x)
    # momentum 0.9, not 0.99: short CPU runs need moving statistics that converge.
    return layers.BatchNormalization(momentum=0.9, name=f"{name}_bn" if name else None)(x)


def _residual_block(x, filters, strides, name):
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = _conv_bn(x, filters, 1, strides, name=f"{name}_proj")
    y = layers.ReLU()(_conv_bn(x, filters, 3, strides, name=f"{name}_conv1"))
    y = _conv_bn(y, filters, 3, name=f"{name}_conv2")
    return layers.ReLU()(layers.Add()([shortcut, y]))


def create_small_resnet(num_classes, image_size, preprocess=None, widths=(32, 64, 128)):
    """A ResNet with one basic block per stage: trains in minutes on a CPU."""
    inputs, x = model_inputs(image_size, preprocess)
    x = layers.ReLU()(_conv_bn(x, widths[0], 3, name="stem"))
    for stage, width in enumerate(widths):
        x = _residual_block(x, width, strides=1 if stage == 0 else 2, name=f"stage{stage}")
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, head(x, num_classes), name="small_resnet")


def create_tiny(num_classes, image_size, preprocess=None):
    """A few thousand weights with one BatchNorm: for tests."""
    inputs, x = model_inputs(image_size, preprocess)
    x = layers.ReLU()(_conv_bn(x, 8, 3, strides=2, name="conv"))
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, head(x, num_classes), name="tiny")


def create_resnet50(num_classes, image_size, preprocess=None):
    """The seed's ResNet50 (Keras Applications, random init) with a float32 head.

    Its layers keep Keras Applications' names, so Keras' weight files for it
    load by name (`models.weights`).
    """
    if preprocess:
        inputs, x = model_inputs(image_size, preprocess)
        shape = {"input_tensor": x}
    else:
        shape = {"input_shape": (image_size, image_size, 3)}
    backbone = keras.applications.ResNet50(
        include_top=False,
        weights=None,  # never download weights at run time; see engine/initialization.py
        pooling="avg",
        **shape,
    )
    for layer in backbone.layers:
        if isinstance(layer, layers.BatchNormalization):
            # Keras Applications' 0.99 leaves the moving statistics of a short,
            # fast-changing run describing early weights; 0.9 as in the models above.
            layer.momentum = 0.9
    inputs = inputs if preprocess else backbone.input
    return keras.Model(inputs, head(backbone.output, num_classes), name="resnet50")
