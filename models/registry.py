"""Name -> Keras model. Every model ends in a float32 classifier head (logits)."""

import contextlib
import functools

import keras

from models import batch_norm, inputs, resnet, vit

_CONSTRUCTORS = {
    "tiny": resnet.create_tiny,
    "small_resnet": resnet.create_small_resnet,
    "resnet50": resnet.create_resnet50,
    **{name: functools.partial(vit.create_vit, name) for name in vit.SIZES},
}
MODEL_NAMES = tuple(_CONSTRUCTORS)


@contextlib.contextmanager
def _dtype_policy(name):
    """Builds layers under a Keras dtype policy, then restores the previous one."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def create_model(
    name,
    num_classes,
    image_size,
    dtype="float32",
    fused_batch_norm=True,
    preprocessing="scaled",
    pixel_range=(-1.0, 1.0),
    patch_size=0,
    stochastic_depth=0.0,
):
    """Builds model `name` for `image_size`² RGB inputs.

    Args:
      name: one of `MODEL_NAMES`.
      num_classes: width of the logits.
      image_size: input height and width.
      dtype: a Keras dtype-policy name ("float32", "mixed_float16", "mixed_bfloat16").
      fused_batch_norm: BatchNorm on TensorFlow's fused kernels (see
        `batch_norm`): faster on TensorFlow's own kernels, slower under XLA, so
        pass False for a model whose step XLA compiles.
      preprocessing: what the model does to its input first (`inputs.PREPROCESSINGS`).
      pixel_range: the range of the pixels the model is fed (what "caffe" maps from).
      patch_size: a ViT's patch side (0: `vit.default_patch_size`); ResNets take none.
      stochastic_depth: a ViT's last-block drop rate (see `vit`); ResNets take none.

    Returns:
      A built `keras.Model` mapping float32 images to float32 logits.
    """
    if name not in _CONSTRUCTORS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    with _dtype_policy(dtype):
        preprocess = inputs.input_layer(preprocessing, pixel_range)
        options = {}
        if name in vit.SIZES:
            options = {"patch_size": patch_size, "stochastic_depth": stochastic_depth}
        model = _CONSTRUCTORS[name](num_classes, image_size, preprocess=preprocess, **options)
    return batch_norm.fuse_batch_norm(model) if fused_batch_norm else model
