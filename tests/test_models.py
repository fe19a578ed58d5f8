"""Models know only their dtype: half compute inside, float32 weights and logits."""

import numpy as np
import pytest
import tensorflow as tf

from models import create_model


@pytest.mark.parametrize(
    "policy, compute",
    [("float32", "float32"), ("mixed_float16", "float16"), ("mixed_bfloat16", "bfloat16")],
)
@pytest.mark.parametrize("name, size", [("tiny", 16), ("small_resnet", 16), ("resnet50", 32)])
def test_policy_sets_compute_dtype_weights_and_logits_stay_float32(name, size, policy, compute):
    model = create_model(name, num_classes=5, image_size=size, dtype=policy)
    logits = model(tf.zeros([2, size, size, 3]), training=False)
    assert logits.shape == (2, 5) and logits.dtype == tf.float32
    assert all(v.dtype == "float32" for v in model.variables)
    convs = [layer for layer in model.layers if "conv" in type(layer).__name__.lower()]
    assert convs and all(layer.compute_dtype == compute for layer in convs)


def test_building_a_model_does_not_change_the_global_policy():
    import keras

    before = keras.config.dtype_policy().name
    create_model("tiny", 3, 16, "mixed_float16")
    assert keras.config.dtype_policy().name == before


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match="tiny, small_resnet, resnet50"):
        create_model("vgg", 3, 16)


def test_resnet50_takes_any_input_size_and_class_count():
    model = create_model("resnet50", num_classes=7, image_size=64)
    assert model.output_shape == (None, 7)
    assert np.isfinite(model(tf.ones([1, 64, 64, 3])).numpy()).all()
