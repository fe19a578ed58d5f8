"""Starting weights: Keras weights files, another run's checkpoint, and the input they expect."""

import csv
import inspect
import os

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import tiny_config
from image_trees import make_ships_tree
from keras.src.legacy.saving import legacy_h5_format

from engine import checkpoints, initialization, run, train_run
from engine.config import Config, ConfigError
from engine.modes import predict
from input_pipeline import preprocessing, ships
from models import create_model, weights
from models.inputs import CaffeInput

# Its module fixture runs once: under pytest-xdist, its tests share one worker.
pytestmark = pytest.mark.xdist_group("initialization")

HEAD = weights.HEAD


def _backbone(seed=1, image_size=32):
    """Keras Applications' ResNet50 without its top, every value moved off its initial one."""
    keras.utils.set_random_seed(seed)
    backbone = keras.applications.ResNet50(
        include_top=False, weights=None, input_shape=(image_size, image_size, 3), pooling="avg"
    )
    for i, v in enumerate(backbone.weights):
        noise = tf.random.stateless_normal(v.shape, [seed, i], stddev=0.05)
        # BatchNorm's statistics too; variances stay positive.
        v.assign(tf.abs(v + noise) if "variance" in v.path else v + noise)
    return backbone


@pytest.fixture(scope="module")
def resnet50_files(tmp_path_factory):
    """The same backbone as Keras writes it: legacy HDF5 (Keras Applications' files) and Keras 3."""
    folder = tmp_path_factory.mktemp("weights")
    backbone = _backbone()
    legacy, keras3 = str(folder / "notop.h5"), str(folder / "notop.weights.h5")
    with h5py.File(legacy, "w") as f:  # the layout of resnet50_..._notop.h5
        legacy_h5_format.save_weights_to_hdf5_group(f, backbone)
    backbone.save_weights(keras3)
    values = {v.path: v.numpy() for v in backbone.weights}
    return {"legacy": legacy, "keras3": keras3}, values


def _assert_backbone_equals(model, values):
    checked = 0
    for v in model.weights:
        if v.path.startswith(HEAD + "/"):
            continue
        np.testing.assert_array_equal(v.numpy(), values[v.path], err_msg=v.path)
        checked += 1
    assert checked == len(values) == 318  # every backbone variable, BatchNorm's statistics too


@pytest.mark.parametrize("fmt", ["legacy", "keras3"])
@pytest.mark.parametrize("precision,xla", [("fp32", False), ("mixed", True)])
def test_keras_weights_files_load_bit_exactly(resnet50_files, fmt, precision, xla):
    files, values = resnet50_files
    config = Config(
        model="resnet50", image_size=32, init_weights=files[fmt], precision=precision, xla=xla
    )
    keras.utils.set_random_seed(0)
    model = train_run.create_model_for(config, 5)
    head = [v.numpy() for v in model.get_layer(HEAD).weights]
    initialization.initialize(config, model, 5, preprocessing.PIXEL_RANGE)
    _assert_backbone_equals(model, values)
    for new, before in zip(model.get_layer(HEAD).weights, head, strict=True):
        np.testing.assert_array_equal(new.numpy(), before)  # the head stays new


def test_a_run_from_a_weights_file_keeps_its_kernels_up_to_its_updates(resnet50_files, tmp_path):
    files, values = resnet50_files
    config = Config(
        model="resnet50",
        image_size=32,
        dataset="synthetic",
        init_weights=files["legacy"],
        train_steps=2,
        learning_rate=1e-4,
        precision="fp32",
        batch_size=8,
        steps_per_loop=2,
        train_examples=32,
        eval_examples=8,
        eval_batch_size=8,
        bn_recalibration_examples=0,
    )
    result = run.run(config, str(tmp_path / "run"))
    assert result.steps == 2 and result.skipped_steps == 0
    # --preprocessing=auto took Keras Applications' input step with the file.
    model = train_run.create_model_for(config.replace(preprocessing="caffe"), 10)
    path = tf.train.latest_checkpoint(checkpoints.checkpoint_dir(result.model_dir))
    tf.train.Checkpoint(model=model).restore(path).expect_partial()
    kernels = [v for v in model.weights if v.path.endswith("/kernel") and HEAD not in v.path]
    moved = [float(np.max(np.abs(v.numpy() - values[v.path]))) for v in kernels]
    # Two Adam steps at 1e-4 move a weight by at most about 2e-4; the file's
    # values differ from a random start by far more (stddev 0.05 noise alone).
    assert max(moved) < 5e-4 and max(moved) > 0


def test_a_file_that_does_not_fit_is_one_line(resnet50_files, tmp_path):
    files, _ = resnet50_files
    config = tiny_config(init_weights=files["legacy"])
    with pytest.raises(run.UserError) as e:
        run.run(config, str(tmp_path / "run"))
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"--init_weights={files['legacy']}: ")
    assert "missing conv" in message and "unexpected conv1_conv" in message
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "checkpoint")
    not_h5 = tmp_path / "weights.h5"
    not_h5.write_text("not HDF5")
    with pytest.raises(run.UserError, match=r"cannot read .* as a Keras weights file"):
        run.run(tiny_config(init_weights=str(not_h5)), str(tmp_path / "run2"))


def test_keras3_file_with_another_shape_names_the_layer(tmp_path):
    keras.utils.set_random_seed(0)
    create_model("tiny", 3, 16).save_weights(str(tmp_path / "tiny.weights.h5"))
    wider = create_model("small_resnet", 3, 16)
    with pytest.raises(weights.WeightsMismatch, match=r"shape conv2d \[\(3, 3, 3, 8\)\]"):
        weights.load_weights_file(wider, str(tmp_path / "tiny.weights.h5"))


def _restored(config, model_dir, num_classes):
    model = train_run.create_model_for(config, num_classes)
    path = tf.train.latest_checkpoint(checkpoints.checkpoint_dir(model_dir))
    tf.train.Checkpoint(model=model).restore(path).expect_partial()
    return {v.path: v.numpy() for v in model.weights}


def test_init_from_another_run_takes_the_backbone_and_a_head_that_fits(tmp_path):
    source_dir = str(tmp_path / "source")  # synthetic: 10 classes
    run.run(tiny_config(dataset="synthetic", train_steps=2, seed=3), source_dir)
    source = _restored(tiny_config(), source_dir, 10)
    for dataset, classes in (("shapes", 5), ("synthetic", 10)):
        config = tiny_config(dataset=dataset, init_from=source_dir)
        keras.utils.set_random_seed(0)
        model = train_run.create_model_for(config, classes)
        fresh = {v.path: v.numpy() for v in model.weights}
        initialization.initialize(config, model, classes, (0.0, 1.0))
        for v in model.weights:
            if v.path.startswith(HEAD + "/") and classes != 10:
                np.testing.assert_array_equal(v.numpy(), fresh[v.path])  # re-initialised
            else:
                np.testing.assert_array_equal(v.numpy(), source[v.path], err_msg=v.path)
    # Through the command's path: training starts at step 0 with a fresh optimizer.
    result = run.run(tiny_config(init_from=source_dir), str(tmp_path / "target"))
    assert result.trained_steps == result.steps == 4
    with pytest.raises(run.UserError, match=r"--init_from=.* was trained with --image_size=16"):
        run.run(tiny_config(init_from=source_dir, image_size=24), str(tmp_path / "t2"))
    with pytest.raises(run.UserError, match=r"--init_from=.*: no such folder"):
        run.run(tiny_config(init_from=str(tmp_path / "nothing")), str(tmp_path / "t3"))


def test_pretrained_reads_keras_cache_and_says_where_to_put_the_file(
    resnet50_files, tmp_path, monkeypatch
):
    files, _ = resnet50_files
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))

    def no_network(*args, **kwargs):
        raise OSError("URL fetch failure: no network")

    monkeypatch.setattr(keras.utils, "get_file", no_network)
    with pytest.raises(ConfigError) as e:
        initialization.pretrained_file("resnet50", "imagenet")
    name = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    assert "\n" not in str(e.value)
    assert f"download {initialization.PRETRAINED['resnet50', 'imagenet'][1]}{name}" in str(e.value)
    assert f"put it in {tmp_path}/models/" in str(e.value)
    os.makedirs(tmp_path / "models")
    os.link(files["legacy"], tmp_path / "models" / name)
    assert initialization.pretrained_file("resnet50", "imagenet") == str(tmp_path / "models" / name)


@pytest.mark.parametrize(
    "flags,message",
    [
        ({"init_weights": "a.h5", "init_from": "run"}, "--init_weights and --init_from each"),
        ({"pretrained": "imagenet"}, "--pretrained=imagenet has weights for --model=resnet50"),
        ({"mode": "benchmark", "preprocessing": "caffe"}, "--preprocessing does not apply"),
    ],
)
def test_starting_weight_flags_are_checked(flags, message):
    with pytest.raises(ConfigError, match=message):
        Config(**flags)


def test_auto_preprocessing_follows_the_weights_and_the_run(tmp_path):
    resolve = initialization.resolve_preprocessing
    empty = str(tmp_path / "new")
    assert resolve(Config(), empty).preprocessing == "scaled"
    assert resolve(Config(model="resnet50", pretrained="imagenet"), empty).preprocessing == "caffe"
    assert resolve(Config(init_weights="w.h5"), empty).preprocessing == "caffe"
    assert resolve(Config(preprocessing="scaled", init_weights="w.h5"), empty).preprocessing == (
        "scaled"
    )


def test_caffe_preprocessing_is_the_models_in_training_eval_predict_and_export(tmp_path):
    """One input step for every path: the layer at the model's input, traced into each."""
    root, _ = make_ships_tree(tmp_path / "ships")
    traced = []
    call = CaffeInput.call

    def recording_call(self, images):
        # Which of the engine's functions builds the model's graph here.
        traced.extend(f.function for f in inspect.stack() if "engine" in f.filename)
        return call(self, images)

    config = tiny_config(
        dataset=f"ships:{root}",
        batch_size=8,
        eval_batch_size=8,
        train_steps=4,
        preprocessing="caffe",
        export_dir=str(tmp_path / "export"),
        bn_recalibration_examples=8,
    )
    model_dir = str(tmp_path / "run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CaffeInput, "call", recording_call)
        run.run(config, model_dir)
    # Traced into the training step's gradients, eval and the export (predict: below).
    assert {"gradients", "eval_step", "export_saved_model"} <= set(traced)
    saved = checkpoints.load_config(checkpoints.checkpoint_dir(model_dir))
    assert saved["preprocessing"] == "caffe"
    # Predict takes the run's input step from config.json, without the flag.
    predict_config = tiny_config(
        dataset=f"ships:{root}",
        mode="predict",
        predict_csv=os.path.join(root, "test.csv"),
        model_dir=model_dir,
    )
    predict_config = predict.with_run_settings(predict_config, model_dir)
    assert predict_config.preprocessing == "caffe"
    model = predict.restore_model(predict_config, model_dir, 5)
    assert isinstance(model.layers[1], CaffeInput)
    csv_path = run.run(predict_config, model_dir)
    # The same weights without the layer, fed Keras' preprocess_input by hand.
    plain = create_model("tiny", 5, 16, preprocessing="scaled")
    weights.copy_layer_weights(model, plain, skip=())
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    images = [os.path.join(root, "train", "images", row["image"]) for row in rows]
    size = preprocessing.source_size(16, config.augment)
    pixels = tf.stack(
        [
            preprocessing.centre_crop(preprocessing.decode_and_resize(tf.io.read_file(p), size), 16)
            for p in images
        ]
    )
    by_hand = tf.nn.softmax(
        plain(keras.applications.resnet50.preprocess_input(tf.cast(pixels, tf.float32)))
    ).numpy()
    served = tf.saved_model.load(config.export_dir).signatures["serving_default"](
        images=tf.cast(pixels, tf.float32) / 255.0
    )["probabilities"]
    np.testing.assert_allclose(served.numpy(), by_hand, rtol=1e-4, atol=1e-5)
    predicted = [int(row["category"]) for row in rows]
    assert predicted == [int(ships.CATEGORIES[i]) for i in np.argmax(by_hand, axis=-1)]


def _checkpoint_values(config, model_dir, step, num_classes=5):
    model = train_run.create_model_for(config, num_classes)
    path = os.path.join(checkpoints.checkpoint_dir(model_dir), f"ckpt-{step}")
    tf.train.Checkpoint(model=model).restore(path).expect_partial()
    return {v.path: v.numpy() for v in model.weights}


def _saved_values(model_dir, step):
    """{key: value} of every value checkpoint ckpt-`step` holds, the input position aside."""
    path = os.path.join(checkpoints.checkpoint_dir(model_dir), f"ckpt-{step}")
    reader = tf.train.load_checkpoint(path)
    # The iterator's state is a variant numpy cannot hold: the step moves it on anyway.
    keys = {
        key
        for key in reader.get_variable_to_shape_map()
        if key != "_CHECKPOINTABLE_OBJECT_GRAPH" and not key.endswith("ITERATOR_STATE")
    }
    return {key: reader.get_tensor(key) for key in keys}


def _equal(a, b):
    return np.asarray(a).shape == np.asarray(b).shape and np.array_equal(a, b)


def test_freeze_steps_train_only_the_head_then_every_layer(tmp_path, monkeypatch):
    steps_built = []
    create = train_run.create_train_step

    def recording(model, *args, **kwargs):
        steps_built.append([v.path for v in model.trainable_variables])
        return create(model, *args, **kwargs)

    monkeypatch.setattr(train_run, "create_train_step", recording)
    # Step 3 has nan gradients: a skipped frozen step changes nothing either.
    config = tiny_config(
        precision="mixed",
        freeze_steps=4,
        train_steps=8,
        checkpoint_every=1,
        keep_checkpoints=10,
        inject_nonfinite="3",
        deterministic=True,
        lr_schedule="constant",  # so a run of 2 steps is the first 2 of a run of 8
    )
    model_dir = str(tmp_path / "run")
    result = run.run(config, model_dir)
    assert result.skipped_steps == 1
    # Every value saved after the skipped step 3 as after step 2 (weights, BatchNorm
    # statistics, Adam's slots and iterations) but the counters and the loss scale.
    before, after = _saved_values(model_dir, 2), _saved_values(model_dir, 3)
    assert before.keys() == after.keys()
    changed = {
        key.split("/.ATTRIBUTES")[0] for key in before if not _equal(before[key], after[key])
    }
    assert changed == {
        "step",
        "skipped_steps",
        "consecutive_skips",
        "loss_scale/_scale",
        "loss_scale/good_steps",
        "save_counter",
    }
    assert after["loss_scale/_scale/.ATTRIBUTES/VARIABLE_VALUE"] == 2.0**14
    assert len(before) > 20  # the model's and the optimizer's values are among them
    # The frozen step's variables are the head's alone: nothing else is updated,
    # checked for finiteness or counted in the gradient norm.
    assert steps_built[0] == [f"{HEAD}/kernel", f"{HEAD}/bias"]
    assert len(steps_built) == 2 and len(steps_built[1]) > 2
    at = {step: _checkpoint_values(config, model_dir, step) for step in (2, 4, 6)}
    for path, value in at[4].items():
        if path.startswith(HEAD + "/"):
            assert not np.array_equal(value, at[2][path]), path  # the head trains
        else:  # kernels, BatchNorm's scale and offset and its statistics
            np.testing.assert_array_equal(value, at[2][path], err_msg=path)
    moved = [p for p in at[6] if not p.startswith(HEAD) and not np.array_equal(at[6][p], at[4][p])]
    assert "conv/kernel" in moved and "conv_bn/moving_mean" in moved  # then every layer
    # Stopped inside the frozen phase and resumed: frozen again, then unfrozen,
    # to the same weights as the run above.
    split_dir = str(tmp_path / "split")
    run.run(config.replace(train_steps=2), split_dir)
    resumed = run.run(config, split_dir)
    assert resumed.trained_steps == 6 and resumed.weights_digest == result.weights_digest
    assert [len(paths) for paths in steps_built[2:]] == [2, 2, len(steps_built[1])]
