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


# --- BatchNorm on the fused kernels (models/batch_norm.py) -----------------------------


def _keras_and_fused(name, size, policy):
    """Twin models computing the same function: Keras' BatchNorm and the fused one."""
    import keras

    from models.batch_norm import fuse_batch_norm

    def build():
        keras.utils.set_random_seed(0)  # the same initial weights for both
        return create_model(
            name, num_classes=5, image_size=size, dtype=policy, fused_batch_norm=False
        )

    plain, fused = build(), fuse_batch_norm(build())
    for a, b in zip(plain.weights, fused.weights, strict=True):
        np.testing.assert_array_equal(a, b)
    return plain, fused


def _batch_norms(model):
    return [layer for layer in model.layers if "BatchNormalization" in type(layer).__name__]


def _train_pass(model, images, labels):
    import keras

    with tf.GradientTape() as tape:
        logits = model(images, training=True)
        loss = tf.reduce_mean(
            keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        )
    return logits, tape.gradient(loss, model.trainable_variables)


def test_fused_batch_norm_runs_the_fused_kernel_and_keeps_keras_weights():
    from models.batch_norm import FusedBatchNormalization

    plain = create_model("small_resnet", 5, 16, fused_batch_norm=False)
    fused = create_model("small_resnet", 5, 16)  # the default
    assert not any(isinstance(layer, FusedBatchNormalization) for layer in plain.layers)
    norms = _batch_norms(fused)
    assert norms and all(type(layer) is FusedBatchNormalization for layer in norms)
    # Same variables under the same paths: checkpoints move between the two.
    assert [v.path for v in plain.weights] == [v.path for v in fused.weights]
    graph = (
        tf.function(lambda x: fused(x, training=True))
        .get_concrete_function(tf.TensorSpec([2, 16, 16, 3]))
        .graph
    )
    ops = {op.type for op in graph.get_operations()}
    assert "FusedBatchNormV3" in ops and "SquaredDifference" not in ops


def test_fused_batch_norm_matches_keras_in_float32():
    plain, fused = _keras_and_fused("small_resnet", 16, "float32")
    images = tf.random.stateless_uniform([8, 16, 16, 3], [1, 2])
    labels = tf.constant([0, 1, 2, 3, 4, 0, 1, 2])
    start = [layer.get_weights() for layer in _batch_norms(plain)]
    logits_a, grads_a = _train_pass(plain, images, labels)
    stats_a = [layer.get_weights() for layer in _batch_norms(plain)]
    logits_b, grads_b = _train_pass(fused, images, labels)
    stats_b = [layer.get_weights() for layer in _batch_norms(fused)]
    np.testing.assert_allclose(logits_b, logits_a, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_a, grads_b, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    # The moving statistics move exactly as Keras moves them (biased variance).
    assert any(not np.array_equal(s, t) for s, t in zip(start[0], stats_a[0], strict=True))
    for a, b in zip(stats_a, stats_b, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)
    # Inference normalises with those statistics, as Keras does.
    np.testing.assert_allclose(
        fused(images, training=False), plain(images, training=False), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_fused_batch_norm_in_half_precision_is_as_accurate_as_keras(policy):
    # Keras casts half activations up to float32 for BatchNorm; the fused kernel
    # reads them as they are and keeps its statistics in float32. Against the
    # float32 model, its gradients must be no further off than Keras' own.
    reference, _ = _keras_and_fused("small_resnet", 16, "float32")
    plain, fused = _keras_and_fused("small_resnet", 16, policy)
    images = tf.random.stateless_uniform([8, 16, 16, 3], [1, 2])
    labels = tf.constant([0, 1, 2, 3, 4, 0, 1, 2])
    _, exact = _train_pass(reference, images, labels)

    def error(model):
        logits, grads = _train_pass(model, images, labels)
        assert logits.dtype == tf.float32
        assert all(bool(tf.reduce_all(tf.math.is_finite(g))) for g in grads)
        return np.median(
            [float(tf.norm(g - e) / tf.norm(e)) for g, e in zip(grads, exact, strict=True)]
        )

    assert error(fused) <= 1.1 * error(plain)


def test_checkpoints_move_between_keras_and_fused_batch_norm(tmp_path):
    # A run may resume with --xla switched (XLA keeps Keras' BatchNorm).
    plain, _ = _keras_and_fused("tiny", 16, "float32")
    images = tf.random.stateless_uniform([4, 16, 16, 3], [3, 4])
    _train_pass(plain, images, tf.constant([0, 1, 2, 3]))  # moves the moving statistics
    path = tf.train.Checkpoint(model=plain).save(str(tmp_path / "ckpt"))
    fused = create_model("tiny", num_classes=5, image_size=16)
    tf.train.Checkpoint(model=fused).restore(path).assert_existing_objects_matched()
    np.testing.assert_allclose(
        fused(images, training=False), plain(images, training=False), rtol=1e-5, atol=1e-5
    )


def test_a_run_fuses_batch_norm_unless_xla_compiles_its_step():
    from engine import config as config_lib
    from engine.train_run import create_model_for
    from models.batch_norm import FusedBatchNormalization

    for xla in (False, True):
        config = config_lib.Config(model="tiny", image_size=16, precision="fp32", xla=xla)
        norms = _batch_norms(create_model_for(config, num_classes=3))
        assert norms and all(isinstance(n, FusedBatchNormalization) != xla for n in norms)


def test_fusing_keeps_the_model_policy_and_its_graph():
    import keras

    model = create_model("small_resnet", 5, 16, "mixed_float16")
    # Keras' compile() adds loss scaling from the model's own policy.
    assert model.dtype_policy.name == "mixed_float16"
    # Layers still belong to this model's graph: a feature extractor builds from it.
    features = keras.Model(model.input, model.get_layer("stage1_conv1_bn").output)
    assert features(tf.zeros([1, 16, 16, 3])).shape == (1, 8, 8, 64)


def test_fusing_reaches_nested_models_and_leaves_uncovered_dtypes_to_keras():
    import keras

    from models.batch_norm import FusedBatchNormalization, fuse_batch_norm

    inner = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.BatchNormalization()])
    outer = fuse_batch_norm(keras.Sequential([keras.Input((4, 4, 3)), inner]))
    assert type(inner.layers[0]) is FusedBatchNormalization
    x = tf.random.stateless_normal([2, 4, 4, 3], [5, 6])
    assert outer(x, training=True).shape == (2, 4, 4, 3)
    # float64 (and pure float16/bfloat16 weights) are not what the kernel takes.
    for dtype in ("float64", "float16"):
        plain = keras.layers.BatchNormalization(dtype=dtype)
        fused = FusedBatchNormalization(dtype=dtype)
        for training in (True, False):
            np.testing.assert_allclose(
                np.asarray(fused(tf.cast(x, dtype), training=training), np.float64),
                np.asarray(plain(tf.cast(x, dtype), training=training), np.float64),
                rtol=1e-3,
                atol=1e-3,
            )
