"""--export_dir: a float32 SavedModel that a fresh process serves like the trained model."""

import errno
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import ROOT, main_in_process, tiny_config
from image_trees import make_folder_tree

from engine import checkpoints, train
from engine.actions import export
from engine.data import data_config
from engine.precision import get_policy
from input_pipeline import create_data, shapes
from models import create_model

PRECISIONS = ("fp32", "mixed", "mixed_bf16")
# What a fresh process does with an exported model: load it and call the signature.
SERVE = """
import sys, numpy as np, tensorflow as tf
images = np.load(sys.argv[1])
out = {}
for name, path in zip(sys.argv[3::2], sys.argv[4::2]):
    serve = tf.saved_model.load(path).signatures["serving_default"]
    result = serve(images=tf.constant(images))
    assert list(result) == ["probabilities"] and result["probabilities"].dtype == tf.float32
    out[name] = result["probabilities"].numpy()
np.savez(sys.argv[2], **out)
"""


def _trained_probabilities(config, model_dir, images):
    """The trained model, rebuilt and restored from its final checkpoint, as probabilities."""
    policy = get_policy(config.precision).keras_policy
    model = create_model(
        config.model, create_data(data_config(config)).num_classes, config.image_size, policy
    )
    path = tf.train.latest_checkpoint(checkpoints.checkpoint_dir(model_dir))
    tf.train.Checkpoint(model=model).restore(
        path
    ).expect_partial().assert_existing_objects_matched()
    return tf.nn.softmax(tf.cast(model(images, training=False), tf.float32)).numpy()


def test_exported_model_serves_float32_probabilities_like_the_trained_model(tmp_path):
    images = tf.random.stateless_uniform([6, 16, 16, 3], [0, 1]).numpy()
    expected, args = {}, []
    for precision in PRECISIONS:
        export_dir = str(tmp_path / f"export_{precision}")
        model_dir = str(tmp_path / precision)
        config = tiny_config(precision=precision, export_dir=export_dir, train_steps=3)
        train.train_and_evaluate(config, model_dir)
        expected[precision] = _trained_probabilities(config, model_dir, images)
        args += [precision, export_dir]
    np.save(tmp_path / "images.npy", images)
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            SERVE,
            str(tmp_path / "images.npy"),
            str(tmp_path / "out.npz"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    served = np.load(tmp_path / "out.npz")
    for precision in PRECISIONS:
        np.testing.assert_allclose(np.sum(served[precision], axis=-1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(served[precision], expected[precision], rtol=1e-5, atol=1e-6)


def _unit_and_normalised(config):
    """The eval images of `config`'s folder data set as [0, 1] floats and as trained on."""
    from input_pipeline import preprocessing

    paths = sorted(tf.io.gfile.glob(config.dataset.split(":", 1)[1] + "/train/*/*"))
    size = preprocessing.source_size(config.image_size, config.augment)
    pixels = tf.stack(
        [
            preprocessing.centre_crop(
                preprocessing.decode_and_resize(tf.io.read_file(p), size), config.image_size
            )
            for p in paths
        ]
    )
    return (tf.cast(pixels, tf.float32) / 255.0).numpy(), preprocessing.normalise(pixels).numpy()


@pytest.mark.parametrize("dataset", ["folder", "shapes"])
def test_exported_model_normalises_unit_images_as_training_did(tmp_path, dataset):
    # The signature takes [0, 1] images for every data set; the model saw the
    # pipeline's range ([-1, 1] for image files), so the export must rescale.
    if dataset == "folder":
        root = make_folder_tree(tmp_path / "data", per_class=6, classes=("red", "green"))
        config = tiny_config(dataset=f"folder:{root}", batch_size=8, train_steps=8)
    else:
        config = tiny_config(train_steps=8)
    config = config.replace(export_dir=str(tmp_path / "export"))
    train.train_and_evaluate(config, str(tmp_path / "run"))
    if dataset == "folder":
        unit, trained_on = _unit_and_normalised(config)
        assert trained_on.min() < -0.5  # the two ranges differ: the check can fail
    else:
        unit = shapes.render_examples(config.seed, "eval", list(range(8)), config.image_size)[0]
        unit = trained_on = unit.numpy()
    expected = _trained_probabilities(config, str(tmp_path / "run"), trained_on)
    serve = tf.saved_model.load(config.export_dir).signatures["serving_default"]
    served = serve(images=tf.constant(unit))["probabilities"].numpy()
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-6)


def _tiny_model(seed):
    keras.utils.set_random_seed(seed)
    return create_model("tiny", 3, 16, get_policy("fp32").keras_policy)


def _serve(export_dir, images):
    serve = tf.saved_model.load(str(export_dir)).signatures["serving_default"]
    return serve(images=tf.constant(images))["probabilities"].numpy()


def _serve_model(model, images):
    """What an export of `model` serves, computed without one."""
    return (
        export.ServingModule(model, 16, (0.0, 1.0))
        .serve(tf.constant(images))["probabilities"]
        .numpy()
    )


def _stopping(real_save):
    def save_then_stop(module, path, **kwargs):
        real_save(module, path, **kwargs)  # files on disk, the export not yet complete
        raise KeyboardInterrupt

    return save_then_stop


def test_a_stop_during_an_export_leaves_the_previous_export_whole(tmp_path, monkeypatch):
    images = tf.random.stateless_uniform([2, 16, 16, 3], [0, 2]).numpy()
    target = tmp_path / "export"
    export.export_saved_model(_tiny_model(0), 16, (0.0, 1.0), str(target))
    before = _serve(target, images)
    with monkeypatch.context() as patch:
        patch.setattr(tf.saved_model, "save", _stopping(tf.saved_model.save))
        with pytest.raises(KeyboardInterrupt):
            export.export_saved_model(_tiny_model(1), 16, (0.0, 1.0), str(target))
    np.testing.assert_array_equal(_serve(target, images), before)
    # The next export replaces it whole and leaves nothing beside it.
    export.export_saved_model(_tiny_model(1), 16, (0.0, 1.0), str(target))
    assert not np.allclose(_serve(target, images), before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def _beside(folder):
    """The names in `folder`'s parent (an export's temporary folders start with a dot)."""
    return sorted(p.name for p in folder.parent.iterdir())


def test_an_export_stopped_between_its_renames_is_recovered(tmp_path, monkeypatch):
    images = tf.random.stateless_uniform([2, 16, 16, 3], [0, 3]).numpy()
    target = tmp_path / "export"
    export.export_saved_model(_tiny_model(0), 16, (0.0, 1.0), str(target))
    before = _serve(target, images)
    (tmp_path / "export.old").mkdir()  # a user's folder: never taken for the previous export
    real_rename = os.rename

    def stop_at_second_rename(src, dst):
        if ".export-new-" in src:  # the old export is moved aside, the new one not yet in
            raise KeyboardInterrupt
        real_rename(src, dst)

    with monkeypatch.context() as patch:
        patch.setattr(os, "rename", stop_at_second_rename)
        with pytest.raises(KeyboardInterrupt):
            export.export_saved_model(_tiny_model(1), 16, (0.0, 1.0), str(target))
    # Put back as the stop unwound.
    np.testing.assert_array_equal(_serve(target, images), before)
    assert _beside(target) == ["export", "export.old"]
    # A SIGKILL there leaves it moved aside: the next export (stopped too) puts it back.
    aside = tmp_path / ".export.export-old-killed"
    aside.mkdir()
    target.rename(aside / "export")
    with monkeypatch.context() as patch:
        patch.setattr(tf.saved_model, "save", _stopping(tf.saved_model.save))
        with pytest.raises(KeyboardInterrupt):
            export.export_saved_model(_tiny_model(1), 16, (0.0, 1.0), str(target))
    np.testing.assert_array_equal(_serve(target, images), before)
    assert _beside(target) == ["export", "export.old"] and not os.listdir(tmp_path / "export.old")


def test_user_folders_named_like_an_export_s_own_survive_it(tmp_path):
    images = tf.random.stateless_uniform([2, 16, 16, 3], [0, 4]).numpy()
    old, partial, target = tmp_path / "model.old", tmp_path / "model.partial", tmp_path / "model"
    export.export_saved_model(_tiny_model(0), 16, (0.0, 1.0), str(old))  # a user's export
    partial.mkdir()
    (partial / "notes.txt").write_text("mine")
    for model_seed in (1, 2):  # first into an absent folder, then over an export
        export.export_saved_model(_tiny_model(model_seed), 16, (0.0, 1.0), str(target))
    np.testing.assert_array_equal(_serve(old, images), _serve_model(_tiny_model(0), images))
    np.testing.assert_array_equal(_serve(target, images), _serve_model(_tiny_model(2), images))
    assert (partial / "notes.txt").read_text() == "mine" and os.listdir(partial) == ["notes.txt"]
    assert _beside(target) == ["model", "model.old", "model.partial"]


@pytest.mark.parametrize("failing", ["the first rename", "the second rename"])
def test_an_export_that_cannot_be_renamed_is_written_in_place(
    tmp_path, monkeypatch, caplog, failing
):
    images = tf.random.stateless_uniform([2, 16, 16, 3], [0, 5]).numpy()
    target = tmp_path / "export"
    export.export_saved_model(_tiny_model(0), 16, (0.0, 1.0), str(target))
    real_rename = os.rename

    def busy(src, dst):  # as rename(2) answers for a mount point
        moving_the_new_one_in = ".export-new-" in src
        if (failing == "the first rename") != moving_the_new_one_in:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), src, None, dst)
        real_rename(src, dst)  # moving the old export aside, or back

    real_save, saves, real_copy, in_place_onto = tf.saved_model.save, [], shutil.copytree, []

    def save(module, path, **kwargs):
        saves.append(path)
        real_save(module, path, **kwargs)

    def copy(src, dst, *args, **kwargs):  # notes what the in-place copy finds there
        if str(dst) == str(target):  # not copytree's own calls for subfolders
            in_place_onto.append(_serve(target, images))
        return real_copy(src, dst, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(os, "rename", busy)
        patch.setattr(os, "replace", busy)
        patch.setattr(tf.saved_model, "save", save)
        patch.setattr(shutil, "copytree", copy)
        export.export_saved_model(_tiny_model(1), 16, (0.0, 1.0), str(target))
    # Saved once (every worker saves as often), copied into place over the previous
    # export, which was put back (if moved) before the copy began.
    assert len(saves) == 1 and len(in_place_onto) == 1
    np.testing.assert_array_equal(in_place_onto[0], _serve_model(_tiny_model(0), images))
    np.testing.assert_array_equal(_serve(target, images), _serve_model(_tiny_model(1), images))
    assert _beside(target) == ["export"]
    assert "export is written in place, as it cannot be renamed (Device or resource busy)" in (
        caplog.text
    )


def test_an_export_through_a_symbolic_link_is_written_where_it_points(tmp_path, caplog):
    images = tf.random.stateless_uniform([2, 16, 16, 3], [0, 7]).numpy()
    (tmp_path / "models").mkdir()
    target = tmp_path / "export"
    target.symlink_to(tmp_path / "models")
    for model_seed in (0, 1):  # a rename would have replaced the link by a folder
        export.export_saved_model(_tiny_model(model_seed), 16, (0.0, 1.0), str(target))
    assert target.is_symlink() and _beside(target) == ["export", "models"]
    expected = _serve_model(_tiny_model(1), images)
    np.testing.assert_array_equal(_serve(tmp_path / "models", images), expected)
    assert "export is written in place, as it is a symbolic link" in caplog.text


def _why_no_mount(tmp_path):
    """None where `mount --bind` works here, else why not (CI runs as root in a container)."""
    if os.geteuid() != 0:
        return "mounting a folder needs root"
    if not shutil.which("mount"):
        return "no `mount` command"
    probe = tmp_path / "probe"
    probe.mkdir()
    tried = subprocess.run(["mount", "--bind", probe, probe], capture_output=True, text=True)
    if tried.returncode:
        return f"`mount --bind` is not permitted here: {tried.stderr.strip()}"
    subprocess.run(["umount", probe], check=True)
    probe.rmdir()
    return None


@pytest.mark.parametrize(
    "mount, warning",
    [
        # A folder of the same file system: os.path.ismount cannot tell, the rename fails.
        (["--bind", "volume"], "as it cannot be renamed (Device or resource busy)"),
        (["-t", "tmpfs", "tmpfs"], "as it is a mount point"),
    ],
    ids=["bind_mount", "tmpfs"],
)
def test_an_export_onto_a_mount_point_is_written_in_place(tmp_path, caplog, mount, warning):
    if reason := _why_no_mount(tmp_path):
        pytest.skip(reason)
    images = tf.random.stateless_uniform([2, 16, 16, 3], [0, 6]).numpy()
    (tmp_path / "volume").mkdir()
    target = tmp_path / "export"  # as a Docker volume is: a mount point
    target.mkdir()
    subprocess.run(["mount", *mount, target], check=True, cwd=tmp_path)
    try:
        for model_seed in (0, 1):  # into the empty mount point, then over its export
            export.export_saved_model(_tiny_model(model_seed), 16, (0.0, 1.0), str(target))
            expected = _serve_model(_tiny_model(model_seed), images)
            np.testing.assert_array_equal(_serve(target, images), expected)
            assert _beside(target) == ["export", "volume"]
    finally:
        subprocess.run(["umount", target], check=True)
    assert f"{target} is written in place, {warning}" in caplog.text


# What main.py does when the export's folder cannot be written (a full disk, say).
FULL_DISK_MAIN = """
import errno, os, runpy, sys
import tensorflow as tf
def full(module, path, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
tf.saved_model.save = full
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_an_export_that_cannot_be_written_is_one_error_line_and_a_rerun_exports(tmp_path):
    main_py = os.path.join(ROOT, "main.py")
    flags = [
        "--model=tiny",
        "--image_size=16",
        "--batch_size=8",
        "--train_steps=2",
        f"--export_dir={tmp_path / 'export'}",
        f"--model_dir={tmp_path / 'run'}",
    ]
    command = [sys.executable, "-c", FULL_DISK_MAIN, main_py, *flags]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert errors[0].startswith(
        f"error: the SavedModel could not be written to {tmp_path / 'export'}: [Errno 28] "
        "No space left on device: "
    )
    assert errors[0].endswith(
        "; the last step's checkpoint is saved: fix the folder, then rerun the same command "
        "to export"
    )
    assert not (tmp_path / "export").exists() and _beside(tmp_path / "export") == ["run"]
    assert main_in_process(*flags) == 0  # the rerun, in this process: no new TensorFlow
    assert (tmp_path / "export" / "saved_model.pb").exists()


def test_an_export_among_other_files_keeps_them(tmp_path, caplog):
    target = tmp_path / "export"
    target.mkdir()
    (target / "README.txt").write_text("mine")
    export.export_saved_model(_tiny_model(0), 16, (0.0, 1.0), str(target))
    assert (target / "README.txt").read_text() == "mine" and (target / "saved_model.pb").exists()
    assert "holds files that are not a SavedModel's" in caplog.text
