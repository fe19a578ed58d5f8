"""engine.actions.batch_norm_stats.py: BatchNorm statistics recomputed from training batches."""

import hashlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import MIRRORED, mirrored_check, tiny_config

from engine import train, train_run
from engine.actions import batch_norm_stats
from engine.actions.batch_norm_stats import Recalibration
from engine.data import data_config
from engine.modes import predict
from input_pipeline import create_data
from models import create_model

# (Keras dtype policy, fused BatchNorm kernels, XLA): the layer variants a run can build.
VARIANTS = [
    ("float32", True, False),
    ("float32", False, True),
    ("mixed_float16", True, False),
    ("mixed_float16", False, True),
    ("mixed_bfloat16", True, False),
    ("mixed_bfloat16", False, True),
]
BATCH, BATCHES = 16, 4


def _images():
    # Far from mean 0, variance 1 (BatchNorm's initial statistics), so any
    # recalibration that does nothing is seen.
    images = 3.0 * tf.random.stateless_uniform([BATCH * BATCHES, 16, 16, 3], [0, 1]) + 2.0
    labels = tf.random.stateless_uniform([BATCH * BATCHES], [0, 2], maxval=3, dtype=tf.int32)
    return images, labels


def _dataset_fn(input_context=None):
    return tf.data.Dataset.from_tensor_slices(_images()).batch(BATCH)


def _tiny(policy, fused):
    keras.utils.set_random_seed(0)
    return create_model("tiny", 3, 16, policy, fused_batch_norm=fused)


def _recalibration(model, jit):
    strategy = tf.distribute.get_strategy()
    return Recalibration(strategy, model, _dataset_fn, BATCHES, jit_compile=jit)


@pytest.mark.parametrize("policy, fused, jit", VARIANTS)
def test_recalibration_changes_only_the_moving_statistics(policy, fused, jit):
    model = _tiny(policy, fused)
    optimizer = keras.optimizers.Adam(0.1)
    optimizer.build(model.trainable_variables)
    # Non-zero slots and a moved iteration count, so they could visibly change.
    optimizer.apply([tf.ones_like(v) for v in model.trainable_variables], model.trainable_variables)
    recalibrate = _recalibration(model, jit)
    moving = {id(v) for v in recalibrate.statistics}
    fixed = [v for v in model.variables if id(v) not in moving] + optimizer.variables
    before_fixed = [v.numpy().copy() for v in fixed]
    before_moving = [v.numpy().copy() for v in recalibrate.statistics]
    assert recalibrate(step=1)
    for variable, value in zip(fixed, before_fixed, strict=True):
        assert np.array_equal(variable.numpy(), value), variable.path
    for variable, value in zip(recalibrate.statistics, before_moving, strict=True):
        assert not np.array_equal(variable.numpy(), value), variable.path
    assert {layer.momentum for layer in recalibrate.layers} == {0.9}  # put back


@pytest.mark.parametrize("policy, fused, jit", VARIANTS)
def test_recalibrated_statistics_are_the_mean_of_the_batches_statistics(policy, fused, jit):
    model = _tiny(policy, fused)
    recalibrate = _recalibration(model, jit)
    assert [layer.name for layer in recalibrate.layers] == ["conv_bn"]
    features = keras.Model(model.inputs, model.get_layer("conv").output)
    means, variances = [], []
    for images, _ in _dataset_fn():
        x = tf.cast(features(images), tf.float64).numpy()
        means.append(x.mean(axis=(0, 1, 2)))
        variances.append(x.var(axis=(0, 1, 2)))  # biased, as Keras' moving update
    recalibrate(step=1)
    layer = recalibrate.layers[0]
    tolerance = 1e-5 if policy == "float32" else 1e-3  # the statistics of half activations
    np.testing.assert_allclose(layer.moving_mean.numpy(), np.mean(means, 0), rtol=tolerance)
    np.testing.assert_allclose(layer.moving_variance.numpy(), np.mean(variances, 0), rtol=tolerance)
    # Idempotent: the same weights and batches give the same statistics, bit for bit.
    before = [v.numpy().copy() for v in recalibrate.statistics]
    assert not recalibrate(step=2)
    assert all(
        np.array_equal(v.numpy(), b) for v, b in zip(recalibrate.statistics, before, strict=True)
    )


def test_a_frozen_batch_norm_layer_keeps_its_statistics():
    model = _tiny("float32", True)
    model.get_layer("conv_bn").trainable = False
    before = [v.numpy().copy() for v in model.non_trainable_variables]
    assert not _recalibration(model, jit=False)(step=1)
    assert all(
        np.array_equal(v.numpy(), b)
        for v, b in zip(model.non_trainable_variables, before, strict=True)
    )


@pytest.mark.parametrize("examples, batches", [(2048, 128), (100, 6), (8, 1), (10**6, 256)])
def test_recalibration_batches_cover_the_examples_capped_at_one_epoch(examples, batches):
    assert batch_norm_stats.recalibration_batches(examples, 16, train_size=4096) == batches


def test_off_is_a_no_op():
    recalibrate = batch_norm_stats.create_recalibration(None, None, None, 0, 16, False)
    assert isinstance(recalibrate, batch_norm_stats.NoRecalibration)
    assert recalibrate(step=1) is False


def _trainable_digest(model):
    digest = hashlib.sha256()
    for variable in model.trainable_variables:
        digest.update(np.ascontiguousarray(variable.numpy()).tobytes())
    return digest.hexdigest()[:16]


def _accuracy(predict_fn, data):
    correct = count = 0
    for images, labels in data.eval_fn():
        predictions = np.argmax(predict_fn(images), -1)
        correct += int(np.sum(predictions == labels.numpy()))
        count += len(labels)
    return correct / count


def test_lagging_statistics_are_mended_in_eval_checkpoint_and_export(tmp_path, monkeypatch):
    # The seed's defect (BatchNorm statistics behind the weights) on generated
    # data: a short, fast run (high learning rate) with Keras Applications'
    # momentum 0.99. Its ResNet50 takes minutes on two
    # cores; the small ResNet with the same momentum shows the same lag in seconds.
    create_model_for = train_run.create_model_for

    def slow_momentum(config, num_classes, *args):
        model = create_model_for(config, num_classes, *args)
        for layer in batch_norm_stats.batch_norm_layers(model):
            layer.momentum = 0.99
        return model

    monkeypatch.setattr(train_run, "create_model_for", slow_momentum)
    runs = {}
    for examples in (0, 1024):
        config = tiny_config(
            model="small_resnet",
            train_steps=60,
            steps_per_loop=60,
            learning_rate=0.01,
            lr_schedule="constant",
            batch_size=32,
            train_examples=2048,
            eval_examples=256,
            eval_batch_size=128,
            deterministic=True,
            bn_recalibration_examples=examples,
            export_dir=str(tmp_path / f"export{examples}") if examples else "",
        )
        model_dir = str(tmp_path / f"run{examples}")
        result = train.train_and_evaluate(config, model_dir)
        data = create_data(data_config(config))
        # The checkpoint --mode=predict restores.
        model = predict.restore_model(config, model_dir, data.num_classes)
        moving = _accuracy(lambda x, m=model: m(x, training=False), data)
        batch = _accuracy(lambda x, m=model: m(x, training=True), data)
        runs[examples] = (result, moving, batch, _trainable_digest(model))
    lagging, mended = runs[0], runs[1024]
    assert lagging[3] == mended[3]  # the same trained weights: only the statistics differ
    assert lagging[0].eval_accuracy == lagging[1]
    assert lagging[0].eval_accuracy < lagging[2] - 0.2  # measured: 0.20 against 0.55
    result, moving, batch, _ = mended
    assert abs(result.eval_accuracy - batch) <= 0.05  # measured: 0.56 against 0.55
    assert moving == result.eval_accuracy  # the checkpoint holds what eval used
    low, high = data.pixel_range
    serve = tf.saved_model.load(str(tmp_path / "export1024")).signatures["serving_default"]
    exported = _accuracy(lambda x: serve(images=(x - low) / (high - low))["probabilities"], data)
    assert abs(exported - result.eval_accuracy) <= 1 / 256  # float32 export of the same model


@MIRRORED
@pytest.mark.parametrize("xla", ["noxla", "xla"])
def test_mirrored_replicas_hold_identical_statistics_of_both_replicas_batches(xla):
    result = mirrored_check("bn_recalibration", xla)
    assert result["replicas"] == 2
    assert result["identical_across_replicas"]
    assert result["max_relative_error"] < 1e-5
