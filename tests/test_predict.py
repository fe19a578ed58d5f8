"""The ships command line end to end: train, evaluate, predict a submission CSV; its errors."""

import csv
import logging
import os
import pathlib
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import main_captured, main_in_process, tiny_config
from image_trees import make_folder_tree, make_ships_tree, write_csv

from engine import train
from engine.config import Config, ConfigError
from engine.extras import create_train_step
from engine.loss_scale import NoOpLossScale
from engine.modes import predict
from input_pipeline.preprocessing import DataError
from models import create_model

# Its module fixture runs once: under pytest-xdist, its tests share one worker.
pytestmark = pytest.mark.xdist_group("predict")


def _main(*args):
    """main.py in this process (no new TensorFlow); a traceback would fail the test."""
    return main_captured(*args)


def _one_line_error(proc):
    """The error line: the last on stderr, the only one starting `error:`, no traceback."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:] and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return errors[0]


SMALL = ("--model=tiny", "--image_size=16", "--batch_size=8", "--eval_batch_size=8")


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _predicted_independently(run_dir, root, policy, size=16, checkpoint=None):
    """The submission rows for `root`/test.csv, computed without `predict`.

    The tiny model at `size` px under the Keras dtype `policy`, restored from
    `checkpoint` (default the run's latest), labels each listed image decoded
    here as eval decodes (resized to `size` + 1/8, the crop margin training
    uses, centre-cropped to `size`, scaled to [-1, 1]); category ids are 1 + the
    argmax. All the images in one batch, as predict's --eval_batch_size=8 takes them.
    """
    model = create_model("tiny", 5, size, policy)
    path = checkpoint or tf.train.latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    tf.train.Checkpoint(model=model).restore(path).expect_partial()
    names = [row[0] for row in _read_csv(os.path.join(root, "test.csv"))[1:]]
    pixels = []
    for name in names:
        image = tf.io.decode_image(
            tf.io.read_file(os.path.join(root, "train", "images", name)), channels=3
        )
        image = tf.image.resize(image, [size + size // 8] * 2, antialias=True)
        image = tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
        pixels.append(tf.image.resize_with_crop_or_pad(image, size, size))
    logits = model(tf.cast(tf.stack(pixels), tf.float32) / 127.5 - 1.0, training=False)
    return [[n, str(int(c) + 1)] for n, c in zip(names, np.argmax(logits, -1), strict=True)]


def _main_logged(caplog, *args):
    """main.py run in this process (as `main_in_process`); returns (status, log messages)."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="absl"):
        # --verbosity=0: INFO, as absl's app.run sets it for the command.
        status = main_in_process(*args, "--verbosity=0")
    return status, [r.getMessage() for r in caplog.records]


def test_main_trains_on_ships_then_predicts_a_submission_csv(tmp_path, caplog):
    # In this process: what is proven here is main's work, not its exit (the
    # error tests below run the command as a user does).
    root, _ = make_ships_tree(tmp_path / "ships", num_test=7)
    run_dir = tmp_path / "run"
    common = (*SMALL, f"--dataset=ships:{root}", f"--model_dir={run_dir}", "--precision=mixed")
    status, log = _main_logged(caplog, *common, "--train_steps=3", "--xla", "--class_weighting")
    assert status == 0, log[-5:]
    assert any(m.startswith("done: 3 steps") for m in log), log
    assert any(m.startswith("eval at step 3") for m in log), log
    assert any("per class: Cargo 7, Military 5" in m for m in log), log

    status, log = _main_logged(caplog, *common, "--mode=predict", f"--predict_csv={root}/test.csv")
    assert status == 0, log[-5:]
    rows = _read_csv(run_dir / "predictions.csv")
    assert rows[0] == ["image", "category"]
    assert [r[0] for r in rows[1:]] == [f"test{i}.jpg" for i in range(7)]
    assert rows[1:] == _predicted_independently(run_dir, root, "mixed_float16")


def test_main_unprepared_tfds_is_one_line(tmp_path):
    line = _one_line_error(_main(*SMALL, "--dataset=tfds:mnist", f"--data_dir={tmp_path}"))
    assert "'mnist' is not prepared" in line and "--download" in line


def test_main_bad_ships_csv_is_one_line_and_writes_nothing(tmp_path):
    root, _ = make_ships_tree(tmp_path / "ships")
    write_csv(os.path.join(root, "train", "train.csv"), ("image", "category"), [("../x.jpg", 1)])
    run_dir = tmp_path / "run"
    line = _one_line_error(_main(*SMALL, f"--dataset=ships:{root}", f"--model_dir={run_dir}"))
    assert "image name '../x.jpg' is not a file name inside" in line
    assert not run_dir.exists()


def test_predict_without_a_checkpoint_is_a_config_error(tmp_path):
    root, _ = make_ships_tree(tmp_path / "ships")
    config = tiny_config(
        dataset=f"ships:{root}", mode="predict", predict_csv=f"{root}/test.csv", model_dir="x"
    )
    with pytest.raises(ConfigError, match=r"has no checkpoint in .*train first with --mode=train"):
        predict.predict(config, str(tmp_path / "empty"))


def test_predict_with_another_model_is_a_config_error(tmp_path):
    root, _ = make_ships_tree(tmp_path / "ships")
    run_dir = str(tmp_path / "run")
    trained = tiny_config(dataset=f"ships:{root}", batch_size=8, train_steps=1, eval_batch_size=8)
    train.train_and_evaluate(trained, run_dir)
    config = trained.replace(
        mode="predict", predict_csv=f"{root}/test.csv", model_dir=run_dir, model="resnet50"
    )
    with pytest.raises(
        ConfigError, match=r"--model=resnet50 differs from --model=tiny, which the run in .* drop"
    ):
        predict.predict(config, run_dir)
    # At another resolution the weights would restore: config.json catches it.
    with pytest.raises(ConfigError, match="--image_size=24 differs from --image_size=16"):
        predict.predict(config.replace(model=trained.model, image_size=24), run_dir)
    # Without config.json the flags are taken as given, and the restore still checks.
    os.remove(os.path.join(run_dir, "checkpoints", "config.json"))
    config = config.replace(model="small_resnet")
    with pytest.raises(ConfigError, match="does not fit --model=small_resnet"):
        predict.predict(config, run_dir)
    assert not os.path.exists(os.path.join(run_dir, "predictions.csv"))


def test_main_predicts_with_the_runs_own_model_size_and_precision_from_model_dir_alone(
    tmp_path, caplog
):
    root, _ = make_ships_tree(tmp_path / "ships", num_test=4)
    run_dir = str(tmp_path / "run")
    # Every one of these differs from main.py's default: predict must read them from the run.
    trained = tiny_config(
        dataset=f"ships:{root}", image_size=24, batch_size=8, eval_batch_size=8, train_steps=1
    )
    assert (trained.model, trained.image_size, trained.precision) != ("small_resnet", 32, "mixed")
    train.train_and_evaluate(trained, run_dir)
    status, log = _main_logged(
        caplog, "--mode=predict", f"--model_dir={run_dir}", f"--predict_csv={root}/test.csv"
    )
    assert status == 0, log[-5:]
    taken = (
        f"predict: --model=tiny --image_size=24 --precision=fp32 --preprocessing=scaled "
        f"--dataset=ships:{root}, "
    )
    assert any(m.startswith(taken) for m in log), log
    rows = _read_csv(os.path.join(run_dir, "predictions.csv"))
    assert rows[1:] == _predicted_independently(run_dir, root, "float32", size=24)
    assert len(rows) == 5  # header and four predictions
    # A flag set to neither its default nor the run's value is refused, naming both.
    config = Config(mode="predict", model_dir=run_dir, predict_csv=f"{root}/test.csv")
    with pytest.raises(ConfigError, match=r"^--image_size=40 differs from --image_size=24, "):
        predict.predict(config.replace(image_size=40), run_dir)
    with pytest.raises(ConfigError, match=r"reads a ships test CSV; use --dataset=ships:PATH"):
        predict.predict(config.replace(dataset="synthetic"), run_dir)


def test_predict_falls_back_from_a_damaged_checkpoint(tmp_path, caplog):
    root, _ = make_ships_tree(tmp_path / "ships", num_test=3)
    run_dir = str(tmp_path / "run")
    trained = tiny_config(
        dataset=f"ships:{root}", batch_size=8, train_steps=2, eval_batch_size=8, checkpoint_every=1
    )
    train.train_and_evaluate(trained, run_dir)
    data_file = tmp_path / "run" / "checkpoints" / "ckpt-2.data-00000-of-00001"
    data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])
    config = trained.replace(mode="predict", predict_csv=f"{root}/test.csv", model_dir=run_dir)
    with caplog.at_level("INFO", logger="absl"):
        path = predict.predict(config, run_dir)
    messages = [r.getMessage() for r in caplog.records]
    assert any("ckpt-2 is damaged or unreadable" in m for m in messages), messages
    ckpt_1 = os.path.join(run_dir, "checkpoints", "ckpt-1")
    assert f"restored {ckpt_1}" in messages, messages
    assert _read_csv(path)[1:] == _predicted_independently(
        run_dir, root, "float32", checkpoint=ckpt_1
    )


def test_predict_restores_a_checkpoint_whose_index_file_is_missing(ships_run, tmp_path):
    root, run_dir, config = ships_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "checkpoints" / "checkpoint").unlink()
    path = predict.predict(config.replace(model_dir=str(copy)), str(copy))
    assert _read_csv(path)[1:] == _predicted_independently(run_dir, root, "float32")


@pytest.fixture(scope="module")
def ships_run(tmp_path_factory):
    """(ships root, run dir, the predict config): a tiny model trained on ships, shared."""
    tmp = tmp_path_factory.mktemp("ships_run")
    root, _ = make_ships_tree(tmp / "ships", num_test=3)
    run_dir = str(tmp / "run")
    trained = tiny_config(dataset=f"ships:{root}", batch_size=8, train_steps=1, eval_batch_size=8)
    train.train_and_evaluate(trained, run_dir)
    return (
        root,
        run_dir,
        trained.replace(mode="predict", predict_csv=f"{root}/test.csv", model_dir=run_dir),
    )


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A run dir: the tiny model trained on a 3-class folder: set, shared."""
    tmp = tmp_path_factory.mktemp("folder_run")
    root = make_folder_tree(tmp / "folder")
    run_dir = str(tmp / "run")
    trained = tiny_config(dataset=f"folder:{root}", batch_size=8, train_steps=1, eval_batch_size=8)
    train.train_and_evaluate(trained, run_dir)
    return run_dir


def _file_bytes(folder):
    """{name: bytes} of the files in `folder` (not in its subfolders)."""
    return {p.name: p.read_bytes() for p in pathlib.Path(folder).iterdir() if p.is_file()}


def test_predictions_csv_may_not_replace_the_input_csv(ships_run, tmp_path):
    root, run_dir, config = ships_run
    with open(config.predict_csv, "rb") as f:
        before = f.read()
    os.symlink(config.predict_csv, tmp_path / "link.csv")
    # The same file by its own name, through `..`, and through a symlink.
    for out in (config.predict_csv, f"{root}/train/../test.csv", str(tmp_path / "link.csv")):
        with pytest.raises(ConfigError, match=r"is the input --predict_csv; .* give another file"):
            predict.predict(config.replace(predictions_csv=out), run_dir)
    with open(config.predict_csv, "rb") as f:
        assert f.read() == before


def test_the_default_predictions_csv_of_a_remote_model_dir_is_refused_before_predicting():
    # Written with Python's open() at the very end: refused before anything is read.
    config = tiny_config(
        dataset="ships:x", mode="predict", predict_csv="x/test.csv", model_dir="gs://b/run"
    )
    with pytest.raises(ConfigError, match=r"=gs://b/run/predictions.csv must be a local path"):
        predict.output_path(config, config.model_dir)


def test_a_predict_csv_that_is_a_folder_says_so(ships_run):
    root, run_dir, config = ships_run
    with pytest.raises(DataError, match=r"/train is a folder; expected a CSV with columns image"):
        predict.predict(config.replace(predict_csv=f"{root}/train"), run_dir)


def test_main_predictions_csv_may_not_replace_a_checkpoint(ships_run):
    # The session 6 walkthrough: this replaced the index and destroyed the model.
    root, run_dir, config = ships_run
    checkpoints = os.path.join(run_dir, "checkpoints")
    before = _file_bytes(checkpoints)
    index = os.path.join(checkpoints, "ckpt-1.index")
    line = _one_line_error(
        _main(
            *SMALL,
            f"--dataset=ships:{root}",
            "--mode=predict",
            f"--model_dir={run_dir}",
            f"--predict_csv={config.predict_csv}",
            f"--predictions_csv={index}",
        )
    )
    assert f"is inside the checkpoint folder {checkpoints}" in line
    assert _file_bytes(checkpoints) == before


def test_predictions_csv_may_not_replace_a_file_of_the_run(ships_run):
    root, run_dir, config = ships_run
    before = _file_bytes(run_dir)
    flagfile = os.path.join(run_dir, "flags.txt")
    with pytest.raises(ConfigError, match=r"flags.txt, a file of the run .* give a \.csv path"):
        predict.predict(config.replace(predictions_csv=flagfile), run_dir)
    assert _file_bytes(run_dir) == before
    # A CSV there, like the default predictions.csv of an earlier predict, is replaced.
    stale = os.path.join(run_dir, "predictions.csv")
    with open(stale, "w") as f:
        f.write("image,category\nstale.jpg,9\n")
    assert predict.predict(config, run_dir) == stale
    assert _read_csv(stale)[1:] == _predicted_independently(run_dir, root, "float32")


def test_predict_refuses_a_model_trained_on_another_dataset(ships_run, folder_run, tmp_path):
    root, run_dir, config = ships_run
    with pytest.raises(
        ConfigError,
        match=r"was trained on --dataset=folder:.*use a run trained with --dataset=ships:PATH",
    ):
        predict.predict(config, folder_run)
    assert not os.path.exists(os.path.join(folder_run, "predictions.csv"))
    # Only the kind counts: the ships folder may have moved since training.
    os.symlink(root, tmp_path / "moved")
    moved = config.replace(
        dataset=f"ships:{tmp_path / 'moved'}", predictions_csv=str(tmp_path / "p.csv")
    )
    assert predict.predict(moved, run_dir) == str(tmp_path / "p.csv")


def test_a_checkpoint_that_does_not_fit_is_one_error_without_warnings(
    ships_run, folder_run, tmp_path, caplog
):
    _, _, config = ships_run
    run_dir = str(tmp_path / "run")
    shutil.copytree(folder_run, run_dir)
    os.remove(os.path.join(run_dir, "checkpoints", "config.json"))  # so the restore finds it
    with caplog.at_level("WARNING"), pytest.raises(ConfigError, match=r"fit .*shape \(8, 3\)"):
        predict.predict(config, run_dir)
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "could not be found" in m], messages


def test_a_csv_that_is_not_utf8_is_a_clear_error(tmp_path):
    root, _ = make_ships_tree(tmp_path / "ships")
    (tmp_path / "ships" / "train" / "train.csv").write_bytes(b"image,category\n\xe9t\xe9.jpg,1\n")
    run_dir = tmp_path / "run"
    line = _one_line_error(_main(*SMALL, f"--dataset=ships:{root}", f"--model_dir={run_dir}"))
    assert "train.csv is not UTF-8 text" in line and "save it as UTF-8 CSV" in line
    assert not run_dir.exists()


@pytest.mark.parametrize(
    "changes, expected",
    [
        (dict(mode="predict", dataset="ships:x", model_dir="r"), "needs --predict_csv"),
        (dict(eval_fraction=1.0), "--eval_fraction must be between 0 and 1"),
        (dict(dataset="folder:"), "--dataset=folder: needs a name or path"),
    ],
)
def test_real_data_flags_are_validated(changes, expected):
    with pytest.raises(ConfigError, match=expected):
        Config(**changes)


def test_class_weights_multiply_each_example_loss():
    model = create_model("tiny", 3, 8)
    optimizer = keras.optimizers.SGD(learning_rate=0.0)  # weights never change between calls
    optimizer.build(model.trainable_variables)
    images = tf.random.stateless_uniform([6, 8, 8, 3], [1, 2])
    labels = tf.constant([0, 0, 1, 1, 2, 2])

    def loss(weights):
        step = create_train_step(model, optimizer, NoOpLossScale(), 6, class_weights=weights)
        return float(step(images, labels)["loss"])

    plain = loss(None)
    np.testing.assert_allclose(loss((2.0, 2.0, 2.0)), 2 * plain, rtol=1e-5)
    only_first = loss((1.0, 0.0, 0.0))
    assert 0 < only_first < plain
