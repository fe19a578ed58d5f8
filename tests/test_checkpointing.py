"""Checkpoints: every piece of state round-trips, damaged ones fall back, resume rules hold."""

import contextlib
import glob
import json
import logging
import os
import subprocess

import numpy as np
import pytest
import tensorflow as tf
from conftest import read_scalars, tiny_config

from engine import checkpoints, train, train_run
from engine.config import ConfigError
from engine.data import data_config
from input_pipeline import batching, create_data


def _state_and_iterator(config):
    strategy = tf.distribute.get_strategy()
    data = create_data(data_config(config))
    state = train_run.build_state(config, data, strategy)
    iterator = iter(strategy.distribute_datasets_from_function(data.train_fn))
    return state, iterator


def _resumable(config, model_dir):
    """A new run's state, its root checkpoint (iterator included) and a manager on model_dir."""
    state, iterator = _state_and_iterator(config)
    checkpoint = checkpoints.create_checkpoint(state, iterator)
    return state, checkpoint, checkpoints.create_manager(checkpoint, str(model_dir))


def test_loss_scale_and_counters_survive_a_save_restore_round_trip(tmp_path):
    config = tiny_config(precision="mixed", growth_interval=100)
    state, iterator = _state_and_iterator(config)
    # Non-default values everywhere, so a field that is not saved cannot pass.
    state.loss_scale._scale.assign(1234.5)
    state.loss_scale.good_steps.assign(37)
    state.step.assign(11)
    state.skipped_steps.assign(3)
    state.consecutive_skips.assign(2)
    state.optimizer.iterations.assign(8)
    state.optimizer.variables[-1].assign(tf.fill(state.optimizer.variables[-1].shape, 0.25))
    next(iterator)
    manager = checkpoints.create_manager(
        checkpoints.create_checkpoint(state, iterator), str(tmp_path)
    )
    path = manager.save(checkpoint_number=11)
    expected_batch = next(iterator)[0].numpy()

    fresh, fresh_checkpoint, fresh_manager = _resumable(config, tmp_path)
    assert float(fresh.loss_scale.value) == 2.0**15  # the default, before restoring
    assert checkpoints.restore_latest(fresh_checkpoint, fresh_manager) == path
    assert float(fresh.loss_scale.value) == 1234.5
    assert int(fresh.loss_scale.good_steps) == 37
    assert int(fresh.step) == 11 and int(fresh.skipped_steps) == 3
    assert int(fresh.consecutive_skips) == 2
    assert int(fresh.optimizer.iterations) == 8
    np.testing.assert_array_equal(fresh.optimizer.variables[-1].numpy(), 0.25)
    for a, b in zip(state.model.weights, fresh.model.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(next(fresh_checkpoint.iterator)[0].numpy(), expected_batch)


def _train(tmp_path, **overrides):
    config = tiny_config(model_dir=str(tmp_path), checkpoint_every=2, **overrides)
    return train.train_and_evaluate(config, str(tmp_path))


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_checkpoint_is_reported_and_the_previous_one_is_used(tmp_path, caplog, damage):
    _train(tmp_path, train_steps=4)
    data_file = tmp_path / "checkpoints" / "ckpt-4.data-00000-of-00001"
    if damage == "truncate":
        data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])
    else:
        data_file.unlink()
    with caplog.at_level(logging.INFO, logger="absl"):  # absl's own level may be higher
        result = _train(tmp_path, train_steps=6)
    messages = [r.getMessage() for r in caplog.records]
    assert any("ckpt-4 is damaged or unreadable" in m for m in messages), messages
    assert any(
        m.startswith("resuming from") and m.endswith("ckpt-2 at step 2 (loss scale 1)")
        for m in messages
    ), messages
    assert result.steps == 6
    assert (
        int(
            tf.train.load_checkpoint(str(tmp_path / "checkpoints" / "ckpt-6")).get_tensor(
                "step/.ATTRIBUTES/VARIABLE_VALUE"
            )
        )
        == 6
    )


@pytest.mark.parametrize("damage", ["delete", "garble", "empty"])
def test_good_checkpoints_resume_without_their_index_file(tmp_path, caplog, damage):
    # Not "no checkpoint can be restored (none listed)", with advice to delete them.
    _train(tmp_path, train_steps=4)
    index = tmp_path / "checkpoints" / "checkpoint"
    if damage == "delete":
        index.unlink()
    else:
        index.write_bytes(b"\x00\xff not a checkpoint state" if damage == "garble" else b"")
    with caplog.at_level(logging.INFO, logger="absl"):  # absl's own level may be higher
        result = _train(tmp_path, train_steps=8)
    messages = [r.getMessage() for r in caplog.records]
    assert any("checkpoint is missing or unreadable: rewriting it" in m for m in messages)
    assert any(m.startswith("resuming from") and "ckpt-4 at step 4" in m for m in messages)
    assert result.steps == 8
    # The rewritten index lets the manager rotate the old checkpoints away (keep 3).
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("ckpt-*.index"))
    assert kept == ["ckpt-4.index", "ckpt-6.index", "ckpt-8.index"]
    listed = tf.train.get_checkpoint_state(str(tmp_path / "checkpoints"))
    assert [os.path.basename(p) for p in listed.all_model_checkpoint_paths] == [
        "ckpt-4",
        "ckpt-6",
        "ckpt-8",
    ]


def test_a_garbage_index_with_no_checkpoint_beside_it_starts_a_run(tmp_path):
    index = tmp_path / "checkpoints" / "checkpoint"
    index.parent.mkdir()
    index.write_bytes(b"\xff\xfe not a checkpoint state")
    assert _train(tmp_path, train_steps=2).steps == 2  # was a UnicodeDecodeError traceback
    assert _train(tmp_path, train_steps=4).steps == 4  # and the run resumes


def test_a_reading_worker_lists_checkpoints_without_parsing_a_garbage_index(tmp_path):
    # Another worker may read while the chief rewrites the index: it lists the files.
    _train(tmp_path, train_steps=4)
    (tmp_path / "checkpoints" / "checkpoint").write_bytes(b"\x00\xff garbage")
    found = checkpoints.reader(str(tmp_path))
    assert [os.path.basename(p) for p in found.checkpoints] == ["ckpt-2", "ckpt-4"]


def test_tensorboard_drops_what_a_run_logged_after_the_checkpoint_resumed_from(tmp_path):
    # The first run logs steps 1-4; only its step-2 checkpoint survives, so the
    # second run trains steps 3 and 4 again and logs them again.
    _train(tmp_path, train_steps=4)
    first = read_scalars(tmp_path)
    data_file = tmp_path / "checkpoints" / "ckpt-4.data-00000-of-00001"
    data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])
    _train(tmp_path, train_steps=4)
    shown = read_scalars(tmp_path)  # as TensorBoard's Python loader reads the run
    logged = [tag for tag in shown if tag.startswith(("train/", "eval/"))]
    assert "train/loss" in logged and "eval/loss" in logged
    for tag in logged:
        steps = [s for s, _ in shown[tag]]
        assert steps == sorted(set(steps)), (tag, steps)  # each step once, in order
    # Steps 1 and 2 from the first run, 3 and 4 from the second; the first run's
    # step 4 is dropped, step 2 (the resumed checkpoint's) is kept.
    assert [s for s, _ in first["train/loss"]][-1] == 4
    assert [s for s, _ in shown["train/loss"]] == [1, 2, 3, 4]


def test_a_stop_signal_during_restore_is_not_taken_for_damage(tmp_path, monkeypatch):
    from engine.actions import preemption

    _train(tmp_path, train_steps=4)

    def stopped(*args, **kwargs):
        raise preemption.Terminated()  # what SIGTERM raises outside the training loop

    monkeypatch.setattr(checkpoints, "_restore", stopped)
    # Not "ckpt-4 is damaged", a fall-back to ckpt-2, or advice to delete them.
    with pytest.raises(preemption.Terminated):
        _train(tmp_path, train_steps=6)
    monkeypatch.undo()
    assert _train(tmp_path, train_steps=6).steps == 6


def test_a_run_without_a_loss_scale_resumes_whatever_loss_scale_it_recorded(tmp_path):
    # Runs made before --loss_scale was refused with fp32 recorded it.
    _train(tmp_path, train_steps=2)
    path = tmp_path / "checkpoints" / "config.json"
    path.write_text(path.read_text().replace('"loss_scale": "dynamic"', '"loss_scale": "128"'))
    assert '"loss_scale": "128"' in path.read_text()
    assert _train(tmp_path, train_steps=4).steps == 4


def test_a_run_without_splits_resumes_whatever_split_it_recorded(tmp_path):
    # Runs made before the split flags were refused without tfds:/folder: recorded them.
    _fake_checkpoint(tmp_path / "shapes", tiny_config())
    path = tmp_path / "shapes" / "checkpoints" / "config.json"
    path.write_text(path.read_text().replace('"eval_split": ""', '"eval_split": "val"'))
    assert '"eval_split": "val"' in path.read_text()
    assert checkpoints.prepare_model_dir(tiny_config(), str(tmp_path / "shapes"))
    # A folder: run still pins its splits.
    folder_config = tiny_config(dataset="folder:data")
    _fake_checkpoint(tmp_path / "folder", folder_config)
    with pytest.raises(ConfigError, match=r"^--eval_split=val does not match the checkpoints"):
        checkpoints.prepare_model_dir(
            folder_config.replace(eval_split="val"), str(tmp_path / "folder")
        )


def test_no_readable_checkpoint_is_an_error_not_a_restart(tmp_path):
    _train(tmp_path, train_steps=2)
    for f in (tmp_path / "checkpoints").glob("ckpt-*.data-*"):
        f.unlink()
    with pytest.raises(
        checkpoints.DamagedCheckpoints, match=r"no checkpoint in .* can be restored"
    ):
        _train(tmp_path, train_steps=4)


def _fake_checkpoint(model_dir, config):
    checkpoints.prepare_model_dir(config, str(model_dir))
    (model_dir / "checkpoints" / "ckpt-5.index").write_bytes(b"")


def test_fresh_refuses_a_directory_with_checkpoints(tmp_path):
    config = tiny_config()
    _fake_checkpoint(tmp_path, config)
    with pytest.raises(ConfigError, match=r"--fresh: --model_dir=.* already holds checkpoints"):
        checkpoints.prepare_model_dir(config.replace(fresh=True), str(tmp_path))
    assert (tmp_path / "checkpoints" / "ckpt-5.index").exists()  # nothing was deleted


def test_fresh_with_overwrite_deletes_only_the_checkpoints(tmp_path):
    config = tiny_config()
    _fake_checkpoint(tmp_path, config)
    (tmp_path / "notes.txt").write_text("mine")
    resume = checkpoints.prepare_model_dir(
        config.replace(fresh=True, overwrite=True), str(tmp_path)
    )
    assert resume is False
    assert not (tmp_path / "checkpoints" / "ckpt-5.index").exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_existing_checkpoints_mean_resume(tmp_path):
    config = tiny_config()
    assert checkpoints.prepare_model_dir(config, str(tmp_path)) is False
    (tmp_path / "checkpoints" / "ckpt-5.index").write_bytes(b"")
    # Steps, learning rate and XLA may change on resume.
    assert checkpoints.prepare_model_dir(
        config.replace(train_steps=100, learning_rate=0.1, xla=True), str(tmp_path)
    )


@pytest.mark.parametrize(
    "change",
    [
        dict(precision="mixed"),
        dict(model="small_resnet"),
        dict(batch_size=32),
        dict(eval_fraction=0.5),  # which examples are training data
        dict(lr_schedule="constant"),  # what the optimizer checkpoints
    ],
)
def test_resuming_with_an_incompatible_flag_is_a_clear_error(tmp_path, change):
    _fake_checkpoint(tmp_path, tiny_config())
    ((name, value),) = change.items()
    old = getattr(tiny_config(), name)
    with pytest.raises(ConfigError) as e:
        checkpoints.prepare_model_dir(tiny_config(**change), str(tmp_path))
    assert str(e.value).startswith(f"--{name}={value} does not match the checkpoints in ")
    assert f"resume with --{name}={old}" in str(e.value)


def test_config_json_is_written_next_to_the_checkpoints(tmp_path):
    checkpoints.prepare_model_dir(tiny_config(seed=7), str(tmp_path))
    assert '"seed": 7' in (tmp_path / "checkpoints" / "config.json").read_text()
    assert os.listdir(tmp_path / "checkpoints") == ["config.json"]


def test_a_folder_run_with_renamed_classes_is_refused_before_training(tmp_path):
    from image_trees import make_folder_tree

    root = make_folder_tree(tmp_path / "data", per_class=4)
    run = tmp_path / "run"
    config = dict(dataset=f"folder:{root}", batch_size=8, eval_batch_size=8)
    _train(run, train_steps=2, **config)
    os.rename(tmp_path / "data" / "train" / "red", tmp_path / "data" / "train" / "a_red")
    # Same flags, same number of classes: only the labels' meaning changed.
    with pytest.raises(ConfigError, match=r"other classes .* \(class red is now a_red;"):
        _train(run, train_steps=4, **config)
    assert sorted(p.name for p in (run / "checkpoints").glob("ckpt-*.index")) == ["ckpt-2.index"]
    assert '"red"' in (run / "checkpoints" / "classes.json").read_text()


@pytest.mark.parametrize(
    "classes, what",
    [
        (("green", "grey", "red", "blue"), "added: blue"),
        (("green", "red"), "removed: grey"),
        (("grey", "green", "red"), "same names, different order"),
    ],
)
def test_other_classes_on_resume_are_a_clear_error(tmp_path, classes, what):
    config = tiny_config()
    checkpoints.prepare_model_dir(config, str(tmp_path), ("green", "grey", "red"))
    (tmp_path / "checkpoints" / "ckpt-5.index").write_bytes(b"")
    assert checkpoints.prepare_model_dir(config, str(tmp_path), ("green", "grey", "red"))
    with pytest.raises(ConfigError) as e:
        checkpoints.prepare_model_dir(config, str(tmp_path), classes)
    assert f"({what}; theirs are in " in str(e.value)
    assert str(e.value).endswith(
        "restore the class folders as they were, or train in another --model_dir"
    )
    # A run from before classes.json was written is not checked.
    (tmp_path / "checkpoints" / "classes.json").unlink()
    assert checkpoints.prepare_model_dir(config, str(tmp_path), classes)


def test_an_unreadable_config_json_is_a_clear_error(tmp_path):
    _fake_checkpoint(tmp_path, tiny_config())
    (tmp_path / "checkpoints" / "config.json").write_text('{"model": "tin')
    with pytest.raises(ConfigError, match=r"config.json is unreadable \(.*\); it records"):
        checkpoints.prepare_model_dir(tiny_config(), str(tmp_path))
    assert (tmp_path / "checkpoints" / "ckpt-5.index").exists()


def test_a_model_dir_that_is_a_file_is_a_clear_error(tmp_path):
    path = tmp_path / "afile"
    path.write_text("mine")
    with pytest.raises(ConfigError, match=r"--model_dir=.*afile: cannot create"):
        checkpoints.prepare_model_dir(tiny_config(), str(path))
    assert path.read_text() == "mine"


@contextlib.contextmanager
def _immutable(path):
    """`chattr +i path` for the block: no file can be added to it or deleted, even by root."""
    try:
        done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("chattr is not installed")
    if done.returncode:
        pytest.skip(f"chattr +i {path} failed: {done.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.mark.parametrize("folder", ["checkpoints", "."])
def test_a_folder_that_cannot_be_written_is_refused_before_training(tmp_path, folder):
    # Not a PermissionDeniedError traceback at the first save or summary writer.
    _train(tmp_path, train_steps=2)
    written = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints").iterdir()}
    target = os.path.normpath(tmp_path / folder)
    unwritable = _immutable(target)
    with unwritable, pytest.raises(ConfigError, match=f"cannot write in {target} \\("):
        _train(tmp_path, train_steps=4)
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoints").iterdir()} == written


def test_fresh_overwrite_that_cannot_delete_is_a_clear_error(tmp_path):
    config = tiny_config(fresh=True, overwrite=True)
    _fake_checkpoint(tmp_path, tiny_config())
    expected = r"--fresh --overwrite: cannot delete .*checkpoints \(.*\); some of its files"
    with _immutable(tmp_path / "checkpoints"), pytest.raises(ConfigError, match=expected):
        checkpoints.prepare_model_dir(config, str(tmp_path))
    assert (tmp_path / "checkpoints" / "ckpt-5.index").exists()


@pytest.mark.parametrize(
    "recorded, dataset, resumes",
    [
        ("folder:data/imgs", "folder:/elsewhere/project/data/imgs", True),  # flags.txt's
        ("folder:data/imgs", "folder:data/imgs/", True),
        ("folder:data/imgs", "folder:/elsewhere/data/other", False),
        ("folder:data/imgs", "folder:/elsewhere/imgs", False),
        ("folder:data/imgs", "ships:/elsewhere/data/imgs", False),
        # Only `.` and `..`: no folder in particular, so none matches.
        ("folder:.", "folder:/some/other/data", False),
        ("ships:../..", "ships:/tmp", False),
    ],
)
def test_an_older_runs_relative_dataset_path_resumes_under_an_absolute_path_ending_with_it(
    tmp_path, recorded, dataset, resumes
):
    # Runs written before config.json recorded PATH absolute kept it as given;
    # from any folder it named a folder ending with it.
    _fake_checkpoint(tmp_path, tiny_config(dataset=recorded))
    config_json = tmp_path / "checkpoints" / "config.json"
    config_json.write_text(json.dumps({**json.loads(config_json.read_text()), "dataset": recorded}))
    directory = str(tmp_path / "checkpoints")
    if resumes:
        checkpoints.check_compatible(tiny_config(dataset=dataset), directory)
    else:
        with pytest.raises(ConfigError, match=f"resume with --dataset={recorded}"):
            checkpoints.check_compatible(tiny_config(dataset=dataset), directory)


def test_config_json_records_the_data_sets_path_absolute(tmp_path, monkeypatch):
    # Recorded as given, `folder:data` would later match any folder named data.
    monkeypatch.chdir(tmp_path)
    _fake_checkpoint(tmp_path / "run", tiny_config(dataset="folder:data"))
    directory = str(tmp_path / "run" / "checkpoints")
    saved = json.loads((tmp_path / "run" / "checkpoints" / "config.json").read_text())
    assert saved["dataset"] == f"folder:{tmp_path / 'data'}"
    checkpoints.check_compatible(tiny_config(dataset="folder:data"), directory)
    checkpoints.check_compatible(tiny_config(dataset=f"folder:{tmp_path}/data"), directory)
    with pytest.raises(ConfigError, match="does not match the checkpoints"):
        checkpoints.check_compatible(tiny_config(dataset="folder:/elsewhere/data"), directory)


def test_the_flagfile_never_replays_fresh_or_overwrite():
    from engine.run_paths import to_flagfile

    text = to_flagfile(tiny_config(fresh=True, overwrite=True))
    assert "fresh" not in text and "overwrite" not in text
    assert "--model=tiny" in text


def test_a_checkpoint_without_the_iterator_restores_the_rest(tmp_path, caplog):
    # What a multi-device run saves; resuming it on one device must not count it
    # as damaged and silently fall back to an older checkpoint.
    config = tiny_config()
    state, _ = _state_and_iterator(config)
    state.step.assign(9)
    checkpoints.create_manager(checkpoints.create_checkpoint(state), str(tmp_path)).save(9)
    fresh, checkpoint, manager = _resumable(config, tmp_path)
    with caplog.at_level(logging.WARNING):
        assert checkpoints.restore_latest(checkpoint, manager).endswith("ckpt-9")
    assert int(fresh.step) == 9
    for a, b in zip(state.model.weights, fresh.model.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert any("saved without the input iterator" in r.getMessage() for r in caplog.records)


def test_an_iterator_from_another_input_pipeline_restores_the_rest(tmp_path, caplog, monkeypatch):
    # Checkpoints written before the pipeline counted positions with
    # `Dataset.range` hold a `Dataset.counter` iterator, which this one cannot load:
    # the run must resume its weights and step, not call the files damaged.
    config = tiny_config()
    with monkeypatch.context() as patch:
        patch.setattr(batching, "positions", tf.data.Dataset.counter)
        state, old_checkpoint, old_manager = _resumable(config, tmp_path)
        next(old_checkpoint.iterator)
    state.step.assign(9)
    old_manager.save(9)
    fresh, checkpoint, manager = _resumable(config, tmp_path)
    with pytest.raises(checkpoints.DamagedCheckpoints):
        checkpoints.restore_latest(checkpoint, manager)  # no way to replace the iterator
    fresh, checkpoint, manager = _resumable(config, tmp_path)
    replacement = _state_and_iterator(config)[1]
    with caplog.at_level(logging.WARNING):
        path = checkpoints.restore_latest(checkpoint, manager, lambda: replacement)
    assert path.endswith("ckpt-9") and checkpoint.iterator is replacement
    assert int(fresh.step) == 9
    for a, b in zip(state.model.weights, fresh.model.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert any("input position does not fit" in r.getMessage() for r in caplog.records)
    # The stream restarts: the first batch is position 0's.
    images, _ = next(replacement)
    first, _ = next(iter(create_data(data_config(config)).train_fn()))
    np.testing.assert_array_equal(images.numpy(), first.numpy())


def test_a_damaged_iterator_falls_back_to_an_older_checkpoint(tmp_path):
    # Damaged iterator bytes are not an old input pipeline: the older checkpoint
    # resumes exactly, so it wins over dropping the newest one's input position.
    config = tiny_config()
    state, checkpoint, manager = _resumable(config, tmp_path)
    for step in (4, 6):
        next(checkpoint.iterator)
        state.step.assign(step)
        newest = manager.save(step)
    (data,) = glob.glob(newest + ".data-*")
    with open(data, "r+b") as f:  # one flipped bit early in the file: the iterator's bytes
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 1]))
    state_only = {n: getattr(state, n) for n in checkpoints.STATE_CHILDREN}
    tf.train.Checkpoint(**state_only).restore(newest).assert_existing_objects_matched()
    fresh, checkpoint, manager = _resumable(config, tmp_path)
    path = checkpoints.restore_latest(checkpoint, manager, lambda: pytest.fail("replaced"))
    assert path.endswith("ckpt-4") and int(fresh.step) == 4


def test_checkpoints_of_a_differently_built_run_are_not_called_damaged(tmp_path):
    _resumable(tiny_config(), tmp_path)[2].save(3)
    _, checkpoint, manager = _resumable(tiny_config(model="small_resnet"), tmp_path)
    with pytest.raises(checkpoints.DamagedCheckpoints) as e:
        checkpoints.restore_latest(checkpoint, manager)
    assert "written by a differently built run" in str(e.value)
    assert "--fresh --overwrite" not in str(e.value)  # never advise deleting good files


def test_resuming_a_finished_run_keeps_its_final_metrics(tmp_path):
    _train(tmp_path, train_steps=2)
    again = _train(tmp_path, train_steps=2)  # nothing left to train
    assert again.steps == 2
    speeds = read_scalars(tmp_path)["final/examples_per_sec"]
    assert len(speeds) == 1 and speeds[0][1] > 0, speeds  # not overwritten by a zero


def test_a_worker_that_cannot_restore_leaves_no_temporary_folder(tmp_path, monkeypatch):
    import tempfile

    from engine import distribute

    run = tmp_path / "run"
    _train(run, train_steps=2)
    for f in (run / "checkpoints").glob("ckpt-*.data-*"):
        f.unlink()
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.setattr(distribute, "is_chief", lambda strategy: False)  # a non-chief worker
    with pytest.raises(checkpoints.DamagedCheckpoints):
        _train(run, train_steps=4)
    assert list(temp.iterdir()) == []


def test_a_run_resumes_from_a_checkpoint_of_the_older_input_pipeline(tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(batching, "positions", tf.data.Dataset.counter)
        train.train_and_evaluate(tiny_config(train_steps=4), str(tmp_path))
    result = train.train_and_evaluate(tiny_config(train_steps=6), str(tmp_path))
    assert (result.steps, result.trained_steps) == (6, 2)
    assert np.isfinite(result.train_loss)


def test_a_data_set_reached_through_a_symbolic_link_resumes(tmp_path, monkeypatch):
    # Started from a linked folder, abspath records the real one; resumed as typed.
    (tmp_path / "real" / "data").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.chdir(tmp_path / "link")
    _fake_checkpoint(tmp_path / "run", tiny_config(dataset="folder:data"))
    directory = str(tmp_path / "run" / "checkpoints")
    checkpoints.check_compatible(tiny_config(dataset=f"folder:{tmp_path}/link/data"), directory)
    checkpoints.check_compatible(tiny_config(dataset=f"folder:{tmp_path}/real/data"), directory)
    # The comparison is made: another folder is refused.
    (tmp_path / "other").mkdir()
    with pytest.raises(ConfigError, match="--dataset"):
        checkpoints.check_compatible(tiny_config(dataset=f"folder:{tmp_path}/other"), directory)
