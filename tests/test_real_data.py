"""Real data: tfds (mocked, and a set prepared here), folder and ships trees generated here."""

import functools
import logging
import math
import os
import re
import shutil
import subprocess
import sys
from typing import ClassVar
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf
from conftest import ROOT, read_scalars, tiny_config
from image_trees import (
    COLOURS,
    corrupt,
    make_folder_tree,
    make_ships_tree,
    truncate,
    write_csv,
    write_image,
)

from engine import train
from engine.data import data_config
from input_pipeline import DataError, create_data, folder, preprocessing


def _eval_arrays(data):
    pairs = [(x.numpy(), y.numpy()) for x, y in data.eval_fn()]
    return np.concatenate([x for x, _ in pairs]), np.concatenate([y for _, y in pairs])


def _colour_class(images):
    """Index into COLOURS of the colour nearest each image's mean (images in [-1, 1])."""
    mean = (images.mean(axis=(1, 2)) + 1.0) * 127.5
    distances = np.linalg.norm(mean[:, None, :] - np.array(COLOURS)[None], axis=-1)
    return distances.argmin(-1)


def _real_config(dataset, **overrides):
    return tiny_config(dataset=dataset, batch_size=8, eval_batch_size=8, **overrides)


# --- tfds -----------------------------------------------------------------


def test_tfds_reads_through_tfds_and_the_shared_preprocessing(tmp_path):
    import tensorflow_datasets as tfds

    # mock_data replaces only TFDS' reading and preparation; tfds.builder, tfds.load,
    # the split and decoder handling and our pipeline run for real. download=True
    # because a mocked data set is never "prepared" on disk (mock_data makes
    # download_and_prepare a no-op, so nothing touches the network).
    config = _real_config("tfds:mnist", data_dir=str(tmp_path), download=True)
    with tfds.testing.mock_data(num_examples=24):
        data = create_data(data_config(config))
        batch, labels = next(iter(data.train_fn()))
        images, eval_labels = _eval_arrays(data)
    assert data.num_classes == 10 and data.class_names[:2] == ("0", "1")
    assert data.train_size == 24 and data.eval_size == 24
    assert batch.shape == (8, 16, 16, 3) and batch.dtype == tf.float32
    assert labels.dtype == tf.int32
    assert images.shape == (24, 16, 16, 3) and len(eval_labels) == 24
    assert images.min() >= -1.0 and images.max() <= 1.0
    # mnist is grayscale: after the RGB conversion all three channels are equal.
    np.testing.assert_array_equal(images[..., 0], images[..., 2])


class _CountingSource:
    """A `tfds.data_source` that counts the records read through it."""

    reads = 0
    indices: ClassVar[list] = []  # of every record read, in order

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        _CountingSource.reads += 1
        _CountingSource.indices.append(index)
        return self.source[index]


def _counting_data_source():
    """Patches `tfds.data_source` so that every record read goes through `_CountingSource`."""
    import tensorflow_datasets as tfds

    real = tfds.data_source
    return mock.patch.object(tfds, "data_source", lambda *a, **k: _CountingSource(real(*a, **k)))


def _first_batches(data, n=3):
    batches = iter(data.train_fn())
    return [tuple(t.numpy() for t in next(batches)) for _ in range(n)]


def test_tfds_array_record_set_streams_by_index_through_tfds_data_source(tmp_path):
    import tensorflow_datasets as tfds
    import tfds_sets

    sizes = tfds_sets.prepare(tmp_path)
    config = _real_config(f"tfds:{tfds_sets.NAME}", data_dir=str(tmp_path), cache="")
    with (
        mock.patch.object(tfds, "load", side_effect=AssertionError("tfds.load")),
        _counting_data_source(),
    ):
        start = _CountingSource.reads
        data = create_data(data_config(config))
        label_reads = _CountingSource.reads - start
        start = _CountingSource.reads
        streamed = _first_batches(data, 6)  # 48 examples, more than the 34 of an epoch
        stream_reads = _CountingSource.reads - start
        images, labels = _eval_arrays(data)
        memory = _first_batches(create_data(data_config(config.replace(cache="memory"))), 6)
    assert (data.train_size, data.eval_size) == (sizes["train"], sizes["test"])
    assert data.class_names == tfds_sets.CLASSES
    assert label_reads == sizes["train"] + sizes["test"]
    # Only indices are held: every batch reads its 8 records again, past the first epoch too.
    assert stream_reads >= 6 * 8
    for (images_s, labels_s), (images_m, labels_m) in zip(streamed, memory, strict=True):
        np.testing.assert_array_equal(_colour_class(images_s), labels_s)
        np.testing.assert_array_equal(images_s, images_m)
        np.testing.assert_array_equal(labels_s, labels_m)
    assert images.shape == (sizes["test"], 16, 16, 3)
    np.testing.assert_array_equal(_colour_class(images), labels)


def test_tfds_data_source_labels_are_read_once_until_the_set_is_rebuilt(tmp_path):
    import tfds_sets

    sizes = tfds_sets.prepare(tmp_path)
    config = _real_config(f"tfds:{tfds_sets.NAME}", data_dir=str(tmp_path), cache="")
    reads = []
    with _counting_data_source():
        for rebuild in (False, False, True):
            if rebuild:  # the files written again: new modification times
                shutil.rmtree(tmp_path / tfds_sets.NAME)
                tfds_sets.prepare(tmp_path)
            before = _CountingSource.reads
            create_data(data_config(config))
            reads.append(_CountingSource.reads - before)
    every_record = sizes["train"] + sizes["test"]
    assert reads == [every_record, 0, every_record]


def test_start_up_jobs_log_count_rate_and_eta(tmp_path, monkeypatch, caplog):
    import tfds_sets

    from input_pipeline import tfds_source

    tfds_sets.prepare(tmp_path / "tfds")
    root = make_folder_tree(tmp_path / "images", per_class=4)
    every_call = functools.partial(preprocessing.Progress, every=0)
    monkeypatch.setattr(preprocessing, "Progress", every_call)
    monkeypatch.setattr(tfds_source, "Progress", every_call)
    tfds_config = _real_config(f"tfds:{tfds_sets.NAME}", data_dir=str(tmp_path / "tfds"))
    with caplog.at_level(logging.INFO, logger="absl"):
        create_data(data_config(tfds_config))
        create_data(data_config(_real_config(f"folder:{root}", cache="memory"))).train_fn()
    line = r": {n} of {n}, \d+/s, ETA 0:00:00"
    assert re.search(
        f"reading the labels of tfds:{tfds_sets.NAME} train" + line.format(n=34), caplog.text
    )
    assert re.search(r"checking folder:\S+ train" + line.format(n=9), caplog.text)
    assert re.search("decoding images into memory" + line.format(n=9), caplog.text)


def test_tfds_data_source_each_input_pipeline_reads_only_its_shard(tmp_path):
    import tfds_sets

    tfds_sets.prepare(tmp_path)
    config = _real_config(f"tfds:{tfds_sets.NAME}", data_dir=str(tmp_path), cache="")
    read = {}
    with _counting_data_source():
        data = create_data(data_config(config))
        for i in range(2):
            _CountingSource.indices = []
            list(data.train_fn(tf.distribute.InputContext(2, i, 2)).take(4))
            read[i] = set(_CountingSource.indices)
    assert read[0] and read[1]
    assert {index % 2 for index in read[0]} == {0} and {index % 2 for index in read[1]} == {1}


def test_a_script_holding_a_data_source_iterator_in_a_cycle_still_exits(tmp_path):
    import tfds_sets

    tfds_sets.prepare(tmp_path)
    # The iterator's pipeline calls Python; kept alive by a cycle until the
    # interpreter exits, it would deadlock the exit without records' atexit.
    script = f"""
import sys
sys.path.insert(0, {ROOT!r})
from engine.config import Config
from engine.data import data_config
from input_pipeline import create_data
config = Config(model="tiny", image_size=16, batch_size=8, cache="",
                dataset="tfds:{tfds_sets.NAME}", data_dir={str(tmp_path)!r})
def first_batch():  # leaves its iterator to the garbage collector
    holder = {{"iterator": iter(create_data(data_config(config)).train_fn())}}
    holder["self"] = holder
    return next(holder["iterator"])[0]
print(first_batch().shape)
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "(8, 16, 16, 3)" in proc.stdout, proc.stderr[-2000:]


def test_tfds_download_prepares_an_array_record_set(tmp_path):
    import tfds_sets  # its builder generates the examples: nothing is fetched

    config = _real_config(f"tfds:{tfds_sets.NAME}", data_dir=str(tmp_path), download=True)
    data = create_data(data_config(config))
    assert data.train_size == sum(tfds_sets.COUNTS["train"])
    assert list(tmp_path.glob(f"{tfds_sets.NAME}/*/*train.array_record*"))
    assert not list(tmp_path.glob(f"{tfds_sets.NAME}/*/*.tfrecord*"))


def test_tfds_tfrecord_set_is_read_by_tfds_load_into_the_same_batches(tmp_path, caplog):
    import tfds_sets

    tfds_sets.prepare(tmp_path / "ar")
    tfds_sets.prepare(tmp_path / "tfr", file_format="tfrecord")
    batches = {}
    for kind in ("ar", "tfr"):
        config = _real_config(f"tfds:{tfds_sets.NAME}", data_dir=str(tmp_path / kind), cache="")
        with caplog.at_level(logging.INFO, logger="absl"):
            batches[kind] = _first_batches(create_data(data_config(config)))
    assert "prepared as tfrecord, which has no random access" in caplog.text
    for (images_a, labels_a), (images_t, labels_t) in zip(*batches.values(), strict=True):
        np.testing.assert_array_equal(images_a, images_t)
        np.testing.assert_array_equal(labels_a, labels_t)


def test_tfds_file_cache_is_per_data_set_version(tmp_path):
    import tensorflow_datasets as tfds

    from input_pipeline import tfds_source

    prefix = tmp_path / "cache" / "imgs"
    prefix.parent.mkdir()
    config = _real_config("tfds:mnist", data_dir=str(tmp_path), download=True, cache=str(prefix))
    real_open = tfds_source.open_builder

    def newer_version(name, cfg):  # as after a TFDS upgrade: same name, new default version
        builder, image_key, class_names = real_open(name, cfg)
        info = mock.Mock(full_name="mnist/9.9.9")
        return mock.Mock(wraps=builder, info=info), image_key, class_names

    with tfds.testing.mock_data(num_examples=8):
        create_data(data_config(config)).train_fn()
        with mock.patch.object(tfds_source, "open_builder", newer_version):
            create_data(data_config(config)).train_fn()
    assert len(list(prefix.parent.glob("imgs-*.array_record"))) == 2  # the train caches


def test_tfds_unprepared_without_download_says_how_to_prepare_and_never_downloads(tmp_path):
    import tensorflow_datasets as tfds

    config = _real_config("tfds:mnist", data_dir=str(tmp_path))
    with (
        mock.patch.object(
            tfds.core.DatasetBuilder, "download_and_prepare", side_effect=AssertionError("net")
        ) as download,
        pytest.raises(DataError, match=r"'mnist' is not prepared in .*tfds build mnist"),
    ):
        create_data(data_config(config))
    download.assert_not_called()


def test_tfds_unknown_name_is_a_data_error():
    with pytest.raises(DataError, match="TFDS has no data set called 'no_such_set_xyz'"):
        create_data(data_config(_real_config("tfds:no_such_set_xyz")))


# --- folder ---------------------------------------------------------------


def test_folder_tree_with_an_eval_folder_keeps_every_label(tmp_path):
    root = make_folder_tree(tmp_path, splits=("train", "val"), per_class=4)
    data = create_data(data_config(_real_config(f"folder:{root}", augment=False)))
    assert data.class_names == ("green", "grey", "red")  # sorted folder names
    assert (data.train_size, data.eval_size) == (12, 12)
    images, labels = _eval_arrays(data)
    colour_of_label = np.array([1, 4, 0])  # green, grey, red
    np.testing.assert_array_equal(_colour_class(images), colour_of_label[labels])


def test_folder_without_eval_folder_gets_a_deterministic_stratified_holdout(tmp_path):
    root = make_folder_tree(tmp_path, per_class=10)
    config = _real_config(f"folder:{root}", eval_fraction=0.2)
    first, second = (
        _eval_arrays(create_data(data_config(config))),
        _eval_arrays(create_data(data_config(config))),
    )
    np.testing.assert_array_equal(first[1], second[1])
    np.testing.assert_array_equal(first[0], second[0])
    assert np.bincount(first[1]).tolist() == [2, 2, 2]  # 20% of each class
    assert create_data(data_config(config)).train_size == 24


def test_an_unlabelled_test_folder_is_not_taken_for_the_eval_split(tmp_path, caplog):
    # A contest layout: train/<class>/*, and test/* with no labels at all.
    root = make_folder_tree(tmp_path, per_class=10)
    os.makedirs(os.path.join(root, "test"))
    for i in range(3):
        write_image(os.path.join(root, "test", f"unlabelled_{i}.png"), 0, i)
    with caplog.at_level(logging.WARNING):
        data = create_data(data_config(_real_config(f"folder:{root}", eval_fraction=0.2)))
    assert (data.train_size, data.eval_size) == (24, 6)  # the hold-out, as without test/
    assert any(
        "test has no class folders (unlabelled images?)" in r.getMessage() for r in caplog.records
    )
    # Named explicitly, it is still an error.
    with pytest.raises(DataError, match="test has no class folders"):
        create_data(data_config(_real_config(f"folder:{root}", eval_split="test")))


def test_training_batches_are_augmented_and_repeatable_with_deterministic(tmp_path):
    root = make_folder_tree(tmp_path, per_class=6)
    config = _real_config(f"folder:{root}", deterministic=True)

    def batches(cfg):
        return [x.numpy() for x, _ in create_data(data_config(cfg)).train_fn().take(3)]

    a, b, c = batches(config), batches(config), batches(config.replace(seed=1))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    assert a[0].shape == (8, 16, 16, 3)


def test_per_replica_sharding_halves_the_batch(tmp_path):
    root = make_folder_tree(tmp_path, per_class=6)
    data = create_data(data_config(_real_config(f"folder:{root}")))
    contexts = [tf.distribute.InputContext(2, i, 2) for i in range(2)]
    assert data.train_fn(contexts[1]).element_spec[0].shape == (4, 16, 16, 3)
    shards = [np.concatenate([x.numpy() for x, _ in data.eval_fn(c)]) for c in contexts]
    assert len(shards[0]) + len(shards[1]) == data.eval_size == 3
    assert not any(np.array_equal(a, b) for a in shards[0] for b in shards[1])


def test_file_cache_is_written_under_the_given_prefix(tmp_path):
    root = make_folder_tree(tmp_path / "data", per_class=4)
    prefix = tmp_path / "cache" / "imgs"
    prefix.parent.mkdir()
    data = create_data(data_config(_real_config(f"folder:{root}", cache=str(prefix))))
    list(data.eval_fn())
    assert [p.name for p in prefix.parent.glob("imgs-*.index")]


@pytest.mark.parametrize("trailing_separator", [False, True])
def test_file_cache_given_a_folder_is_written_inside_it(tmp_path, trailing_separator):
    root = make_folder_tree(tmp_path / "data", per_class=4)
    folder_path = tmp_path / "cache"
    folder_path.mkdir()
    cache = str(folder_path) + (os.sep if trailing_separator else "")
    data = create_data(data_config(_real_config(f"folder:{root}", cache=cache)))
    data.train_fn()
    list(data.eval_fn())
    assert len(list(folder_path.glob("cache-*.array_record"))) == 1  # train, decoded records
    assert len(list(folder_path.glob("cache-*.index"))) == 1  # eval, TF's cache
    assert not list(tmp_path.glob("cache-*"))  # nothing beside the folder


def test_file_cache_is_not_read_back_after_images_are_overwritten_in_place(tmp_path):
    root = make_folder_tree(tmp_path / "data", splits=("train", "val"), per_class=4)
    prefix = tmp_path / "cache" / "imgs"
    prefix.parent.mkdir()
    config = _real_config(f"folder:{root}", cache=str(prefix), augment=False)
    images, labels = _eval_arrays(create_data(data_config(config)))  # writes the eval cache
    red = create_data(data_config(config)).class_names.index("red")
    assert set(_colour_class(images[labels == red]).tolist()) == {0}
    # Same names, other content: every red eval image becomes blue.
    for i, path in enumerate(sorted((tmp_path / "data" / "val" / "red").iterdir())):
        write_image(str(path), 2, i, fmt="PNG" if path.suffix == ".png" else "JPEG")
    images, labels = _eval_arrays(create_data(data_config(config)))
    assert set(_colour_class(images[labels == red]).tolist()) == {2}


@pytest.mark.parametrize("damage", ["stale_lock", "truncated", "missing"])
@pytest.mark.parametrize("cache", ["imgs", ""], ids=["prefix", "folder"])
def test_a_locked_or_damaged_eval_cache_is_a_clear_error(tmp_path, damage, cache):
    root = make_folder_tree(tmp_path / "data", per_class=4)
    folder_path = tmp_path / "cache"
    folder_path.mkdir()
    cache = str(folder_path / cache)  # cache/imgs-<hash>*, or cache/cache-<hash>*
    config = _real_config(f"folder:{root}", cache=cache)
    list(create_data(data_config(config)).eval_fn())  # writes the eval images' cache
    (index,) = folder_path.glob("*.index")
    stem = index.name[: -len(".index")]
    lock = folder_path / f"{stem}_0.lockfile"
    if damage == "stale_lock":  # what a run killed while writing the cache leaves
        for f in folder_path.glob(f"{stem}*"):
            f.unlink()
        lock.write_text("")
        expected = (
            rf"--cache={re.escape(cache)}: {re.escape(str(lock))} locks its cache file; .* delete "
        )
    else:
        _damage(folder_path, stem, damage)
        # The advice names this cache's files alone, not other data sets' under the prefix.
        expected = rf"--cache={re.escape(cache)}: the cache files are damaged .*; delete "
    with pytest.raises(DataError, match=expected + re.escape(f"{folder_path / stem}* ")):
        create_data(data_config(config)).eval_fn()


def test_a_damaged_training_cache_is_a_clear_error_and_a_missing_one_is_written(tmp_path):
    root = make_folder_tree(tmp_path / "data", per_class=4)
    prefix = tmp_path / "cache" / "imgs"
    prefix.parent.mkdir()
    config = _real_config(f"folder:{root}", cache=str(prefix), deterministic=True)
    first = _first_batches(create_data(data_config(config)))
    (records,) = prefix.parent.glob("imgs-*.array_record")
    records.unlink()  # written again, to the same batches
    for a, b in zip(first, _first_batches(create_data(data_config(config))), strict=True):
        np.testing.assert_array_equal(a[0], b[0])
    records.write_bytes(records.read_bytes()[: records.stat().st_size // 2])
    with pytest.raises(DataError, match=rf"the cache file {re.escape(str(records))} is damaged"):
        create_data(data_config(config)).train_fn()


def test_a_failed_cache_write_is_one_line_and_leaves_no_file(tmp_path, monkeypatch):
    from input_pipeline import records

    root = make_folder_tree(tmp_path / "data", per_class=4)
    (tmp_path / "cache").mkdir()
    config = _real_config(f"folder:{root}", cache=str(tmp_path / "cache") + "/")
    real = records._array_record("array_record_module")

    class FullDisk:  # the real writer, failing as ArrayRecord does when the disk fills up
        def __init__(self, path, options):
            self.writer, self.count = real.ArrayRecordWriter(path, options), 0

        def write(self, record):
            self.count += 1
            if self.count > 3:
                raise RuntimeError("write() failed: No space left on device")
            self.writer.write(record)

        def close(self):
            self.writer.close()

    monkeypatch.setattr(records, "_array_record", lambda _: mock.Mock(ArrayRecordWriter=FullDisk))
    with pytest.raises(DataError, match=r"cannot write .*: write\(\) failed: No space left"):
        create_data(data_config(config)).train_fn()
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_training_cache_without_room_on_disk_is_refused_before_writing(tmp_path, monkeypatch):
    root = make_folder_tree(tmp_path / "data", per_class=4)
    config = _real_config(f"folder:{root}", cache=str(tmp_path) + "/")
    # 9 training images of 18 px: 8,748 bytes of pixels.
    monkeypatch.setattr(shutil, "disk_usage", lambda _: mock.Mock(free=8_000))
    with pytest.raises(DataError, match=r"need 0.00 GB and .* has 0.00 GB free; free some space"):
        create_data(data_config(config)).train_fn()
    assert not list(tmp_path.glob("cache-*"))


def _damage(folder, stem, how):
    """Truncates a cache's data files to half, or deletes them (keeping the index)."""
    for f in folder.glob(f"{stem}.data-*"):
        if how == "missing":
            f.unlink()
        else:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _cache_indexes(folder):
    return {p.name for p in folder.glob("imgs-*.index")}


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_damaged_eval_cache_stops_the_run_before_it_writes_anything(tmp_path, damage):
    root = make_folder_tree(tmp_path / "data", per_class=4)
    prefix = tmp_path / "cache" / "imgs"
    prefix.parent.mkdir()
    config = _real_config(f"folder:{root}", cache=str(prefix), train_steps=2, steps_per_loop=1)
    data = create_data(data_config(config))
    data.train_fn()
    train_index = _cache_indexes(prefix.parent)
    eval_ds = data.eval_fn()
    # A new eval cache is written by the first eval, not when the dataset is
    # made: a stop signal during start-up must not leave a half-written cache.
    assert _cache_indexes(prefix.parent) == train_index
    list(eval_ds)
    (eval_index,) = _cache_indexes(prefix.parent) - train_index
    _damage(prefix.parent, eval_index[: -len(".index")], damage)
    model_dir = tmp_path / "run"
    # Found at start-up, not at the first eval after training.
    with pytest.raises(DataError, match=r"--cache=.*imgs: the cache files are damaged"):
        train.train_and_evaluate(config, str(model_dir))
    assert not model_dir.exists()


def test_each_input_pipeline_caches_its_own_shard(tmp_path):
    root = make_folder_tree(tmp_path / "data", per_class=6)
    prefix = tmp_path / "cache" / "imgs"
    prefix.parent.mkdir()
    contexts = [tf.distribute.InputContext(2, i, 2) for i in range(2)]
    in_memory = create_data(data_config(_real_config(f"folder:{root}", deterministic=True)))
    on_disk = create_data(
        data_config(_real_config(f"folder:{root}", deterministic=True, cache=str(prefix)))
    )

    def images(data, context):
        evals = [x.numpy() for x, _ in data.eval_fn(context)]
        return np.concatenate(evals + [x.numpy() for x, _ in data.train_fn(context).take(2)])

    for _ in range(2):  # the second pass reads the cache files back
        for context in contexts:
            np.testing.assert_array_equal(images(on_disk, context), images(in_memory, context))
    assert len(_cache_indexes(prefix.parent)) == 2  # eval, per pipeline
    assert len(list(prefix.parent.glob("imgs-*.array_record"))) == 2  # train, per pipeline


def test_empty_class_folder_is_an_error_naming_it(tmp_path):
    root = make_folder_tree(tmp_path, per_class=3)
    os.makedirs(tmp_path / "train" / "blue")
    with pytest.raises(DataError, match=r"class folder .*train/blue has no .jpg/.jpeg/.png"):
        create_data(data_config(_real_config(f"folder:{root}")))


def test_dot_files_are_not_images(tmp_path):
    root = make_folder_tree(tmp_path, per_class=4)
    (tmp_path / "train" / "red" / "._img0_0.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    with mock.patch.object(folder.logging, "warning") as warning:
        data = create_data(data_config(_real_config(f"folder:{root}")))
    assert data.train_size + data.eval_size == 12
    warning.assert_any_call("ignored %d non-image file(s) under %s", 1, str(tmp_path / "train"))


def test_images_in_subfolders_of_a_class_folder_are_read(tmp_path):
    # As Keras' image_dataset_from_directory reads them: train/<class>/2019/x.jpg.
    root = make_folder_tree(tmp_path, splits=("train", "val"), per_class=2, classes=("red",))
    for split, depth in (("train", ("2019",)), ("val", ("2020", "deep"))):
        nested = tmp_path / split / "blue" / os.path.join(*depth)  # blue: subfolders only
        os.makedirs(nested)
        for i in range(3):
            write_image(str(nested / f"b{i}.jpg"), 2, i)
    os.makedirs(tmp_path / "train" / "red" / "2019")  # beside red's own images
    write_image(str(tmp_path / "train" / "red" / "2019" / "r9.jpg"), 0, 9)
    data = create_data(data_config(_real_config(f"folder:{root}", augment=False)))
    assert data.class_names == ("blue", "red")
    assert (data.train_size, data.eval_size) == (6, 5)
    images, labels = _eval_arrays(data)
    np.testing.assert_array_equal(_colour_class(images), np.array([2, 0])[labels])


def test_subfolders_are_listed_in_sorted_order_without_dot_folders(tmp_path):
    red = tmp_path / "train" / "red"
    names = ("b/x.jpg", "a.jpg", "a/z/y.png", "c.jpg", ".thumbs/t.jpg", "a/._y.jpg", "a/n.txt")
    for name in (*names, "../../store/s.jpg"):
        os.makedirs(red / os.path.dirname(name), exist_ok=True)
        (red / name).write_bytes(b"")
    os.symlink(tmp_path / "store", red / "linked")  # followed, like a linked class folder
    os.symlink(red, red / "b" / "loop")  # a loop is walked once
    with mock.patch.object(folder.logging, "warning") as warning:
        paths, labels = folder.list_split(str(tmp_path / "train"), ("red",))
    relative = [os.path.relpath(p, red) for p in paths]
    assert relative == ["a.jpg", "a/z/y.png", "b/x.jpg", "c.jpg", "linked/s.jpg"]
    assert labels == [0] * 5
    # The dot-file and the text file; no folder is counted, the dot-folder not at all.
    warning.assert_called_once_with(
        "ignored %d non-image file(s) under %s", 2, str(tmp_path / "train")
    )


def test_empty_split_is_an_error(tmp_path):
    os.makedirs(tmp_path / "train")
    with pytest.raises(DataError, match=r"train has no class folders"):
        create_data(data_config(_real_config(f"folder:{tmp_path}")))


def test_missing_train_split_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"train is not a folder"):
        create_data(data_config(_real_config(f"folder:{tmp_path}")))


@pytest.mark.parametrize("damage", [corrupt, truncate], ids=["corrupt", "truncated"])
def test_undecodable_image_stops_the_run_naming_the_file(tmp_path, damage):
    root = make_folder_tree(tmp_path, per_class=4)
    bad = tmp_path / "train" / "red" / "img0_0.jpg"
    damage(str(bad))
    with pytest.raises(DataError, match=f"cannot decode image {bad}.*--skip_bad_images"):
        create_data(data_config(_real_config(f"folder:{root}")))


def test_skip_bad_images_counts_and_logs_the_skips(tmp_path):
    root = make_folder_tree(tmp_path / "data", per_class=6)
    corrupt(str(tmp_path / "data" / "train" / "red" / "img0_0.jpg"))
    truncate(str(tmp_path / "data" / "train" / "grey" / "img0_3.jpg"))
    config = _real_config(f"folder:{root}", skip_bad_images=True, train_steps=2)
    result = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert result.steps == 2
    assert read_scalars(tmp_path / "run")["data/skipped_images"] == [(0, 2.0)]
    assert (
        create_data(data_config(config)).train_size + create_data(data_config(config)).eval_size
        == 16
    )


def test_skip_bad_images_that_empty_a_class_is_an_error_naming_it(tmp_path):
    root = make_folder_tree(tmp_path, per_class=4)
    for path in (tmp_path / "train" / "grey").iterdir():
        corrupt(str(path))
    with pytest.raises(DataError, match=r"class grey has no training image left: all its"):
        create_data(data_config(_real_config(f"folder:{root}", skip_bad_images=True)))


def test_one_image_per_class_says_a_hold_out_needs_two(tmp_path):
    root = make_folder_tree(tmp_path, per_class=1)
    with pytest.raises(DataError, match=r"eval split has no images; .* class with at least 2"):
        create_data(data_config(_real_config(f"folder:{root}")))


# --- ships ----------------------------------------------------------------


def test_ships_layout_maps_categories_to_labels_and_splits_by_class(tmp_path):
    root, rows = make_ships_tree(tmp_path)
    data = create_data(
        data_config(_real_config(f"ships:{root}", augment=False, eval_fraction=0.25))
    )
    assert data.class_names == ("Cargo", "Military", "Carrier", "Cruise", "Tankers")
    assert data.train_size + data.eval_size == len(rows) == 30
    images, labels = _eval_arrays(data)
    assert sorted(set(labels.tolist())) == [0, 1, 2, 3, 4]  # every class held out
    np.testing.assert_array_equal(_colour_class(images), labels)  # category i+1 has colour i


def test_class_weighting_gives_rare_classes_larger_weights(tmp_path):
    root, _ = make_ships_tree(tmp_path, per_class=(12, 4, 4, 4, 4))
    data = create_data(data_config(_real_config(f"ships:{root}", class_weighting=True)))
    weights = np.array(data.class_weights)
    assert weights.shape == (5,) and weights[0] < 1.0 < weights[1]
    np.testing.assert_allclose(weights[1:], weights[1])
    assert create_data(data_config(_real_config(f"ships:{root}"))).class_weights is None


def _ships_error(tmp_path, rows, header=("image", "category")):
    root, _ = make_ships_tree(tmp_path)
    write_csv(os.path.join(root, "train", "train.csv"), header, rows)
    with pytest.raises(DataError) as info:
        create_data(data_config(_real_config(f"ships:{root}")))
    return str(info.value)


@pytest.mark.parametrize(
    "rows, expected",
    [
        ([("0.jpg", 1), ("missing.jpg", 2)], r"line 3: image 'missing.jpg' does not exist"),
        ([("../x.jpg", 1)], r"line 2: image name '../x.jpg' is not a file name inside"),
        ([("/etc/passwd", 1)], r"line 2: image name '/etc/passwd' is not a file name inside"),
        ([("a/../../x.jpg", 1)], r"line 2: image name 'a/../../x.jpg' is not a file name"),
        ([("0.jpg", 7)], r"line 2: unknown category '7'; categories are 1 = Cargo"),
        ([("0.jpg", 0)], r"unknown category '0'"),
        ([("0.jpg", "ship")], r"unknown category 'ship'"),
        ([("0.jpg", 1), ("0.jpg", 2)], r"line 3: image '0.jpg' is listed twice"),
        ([], r"train.csv has no rows; the train split is empty"),
    ],
    ids=[
        "missing",
        "dotdot",
        "absolute",
        "inner_dotdot",
        "category7",
        "category0",
        "text",
        "twice",
        "empty",
    ],
)
def test_bad_ships_csv_rows_are_errors_naming_the_line(tmp_path, rows, expected):
    message = _ships_error(tmp_path, rows)
    assert "\n" not in message
    assert re.search(expected, message), message


def _link_images_into_a_store(root, store):
    """Moves every image into `store` and leaves a symlink in its place (as `cp -rs` does)."""
    images = os.path.join(root, "train", "images")
    os.makedirs(store)
    for name in os.listdir(images):
        os.replace(os.path.join(images, name), os.path.join(store, name))
        os.symlink(os.path.join(store, name), os.path.join(images, name))


def test_ships_images_may_be_symlinks_into_a_store_elsewhere(tmp_path):
    root, rows = make_ships_tree(tmp_path / "data")
    _link_images_into_a_store(root, tmp_path / "store")
    data = create_data(data_config(_real_config(f"ships:{root}", augment=False)))
    assert data.train_size + data.eval_size == len(rows)
    images, labels = _eval_arrays(data)
    np.testing.assert_array_equal(_colour_class(images), labels)


def test_ships_dangling_symlink_is_a_missing_image(tmp_path):
    root, _ = make_ships_tree(tmp_path / "data")
    _link_images_into_a_store(root, tmp_path / "store")
    os.unlink(tmp_path / "store" / "0.jpg")
    with pytest.raises(DataError, match=r"line 2: image '0.jpg' does not exist in"):
        create_data(data_config(_real_config(f"ships:{root}")))


def test_ships_csv_with_a_missing_column_is_an_error(tmp_path):
    message = _ships_error(tmp_path, [("0.jpg",)], header=("image",))
    assert "lacks column(s) category" in message and "image,category" in message


def test_class_names_and_counts_are_logged(tmp_path):
    root, _ = make_ships_tree(tmp_path, per_class=(8, 6, 5, 4, 7))
    with mock.patch.object(preprocessing.logging, "info") as info:
        create_data(data_config(_real_config(f"ships:{root}")))
    lines = [call.args[0] % call.args[1:] for call in info.call_args_list]
    train_line = next(line for line in lines if " train: " in line)
    assert "Cargo 7, Military 5, Carrier 4, Cruise 3, Tankers 6" in train_line


# --- start-up at scale: the image check remembered, the cache chosen --------


def test_the_image_check_is_remembered_until_a_file_changes(tmp_path, monkeypatch):
    root = make_folder_tree(tmp_path / "data", per_class=4)
    bad = tmp_path / "data" / "train" / "red" / "img0_0.jpg"
    corrupt(str(bad))
    config = _real_config(f"folder:{root}", skip_bad_images=True)
    decoded = []
    decode_all = preprocessing._decode_all
    monkeypatch.setattr(
        preprocessing,
        "_decode_all",
        lambda paths, what: decoded.append(len(paths)) or decode_all(paths, what),
    )
    first = create_data(data_config(config))
    assert first.skipped_images == 1 and len(decoded) == 2  # train and eval checked
    # A second run (or a resume) over the same files decodes none to check them,
    # and still knows the bad one.
    again = create_data(data_config(config))
    assert again.skipped_images == 1 and len(decoded) == 2
    with pytest.raises(DataError, match=f"cannot decode image {bad}"):
        create_data(data_config(config.replace(skip_bad_images=False)))
    # A file rewritten (its size or time changes) is checked again with its split.
    os.utime(bad, ns=(1, 1))
    create_data(data_config(config))
    assert len(decoded) == 3


def test_each_image_file_is_stamped_once_at_start_up(tmp_path, monkeypatch):
    # The remembered check and the cache key both need the files' sizes and times:
    # one stat per file serves both (on a remote store each stat is a request).
    root = make_folder_tree(tmp_path, per_class=6)
    stamped, stamp = [], preprocessing.file_stamps
    monkeypatch.setattr(
        preprocessing, "file_stamps", lambda paths: stamped.extend(paths) or stamp(paths)
    )
    create_data(data_config(_real_config(f"folder:{root}", cache="")))
    assert len(stamped) == 18 and len(set(stamped)) == 18, stamped


def test_cache_auto_streams_what_does_not_fit_and_memory_is_refused(tmp_path, monkeypatch, caplog):
    root = make_folder_tree(tmp_path, per_class=6)  # 18 images of 18 px (16 + a crop margin)
    config = _real_config(f"folder:{root}", cache="auto", deterministic=True)
    in_memory = create_data(data_config(config))
    held = [x.numpy() for x, _ in in_memory.train_fn().take(2)]
    # 18 * 18 * 18 * 3 bytes decoded, LOAD_PEAK times that while loading.
    peak = math.ceil(preprocessing.LOAD_PEAK * 18 * 18 * 18 * 3)
    monkeypatch.setattr(preprocessing, "available_memory", lambda: 2 * peak - 2)
    with caplog.at_level(logging.INFO, logger="absl"):
        streamed = create_data(data_config(config))
    assert "streamed from the files" in caplog.text and "0.00 GB" in caplog.text
    for x, y in zip(held, [x.numpy() for x, _ in streamed.train_fn().take(2)], strict=True):
        np.testing.assert_array_equal(x, y)  # the same batches, decoded at every step
    with pytest.raises(DataError, match=r"--cache=memory for .*--cache=auto"):
        create_data(data_config(config.replace(cache="memory")))
    (tmp_path / "cache").mkdir()  # a file cache holds nothing in memory: not refused
    create_data(data_config(config.replace(cache=str(tmp_path / "cache") + "/"))).train_fn()
    monkeypatch.setattr(preprocessing, "available_memory", lambda: 2 * peak)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="absl"):
        create_data(data_config(config))
    assert "held in memory" in caplog.text


def test_an_image_that_breaks_mid_run_is_named_and_the_checkpoints_stay(tmp_path, monkeypatch):
    root = make_folder_tree(tmp_path / "data", per_class=6)
    config = _real_config(f"folder:{root}", cache="", train_steps=6, checkpoint_every=2)
    run = str(tmp_path / "run")
    train.train_and_evaluate(config.replace(train_steps=2), run)
    # The file breaks after the start-up check passed it (as if between check and read).
    bad = tmp_path / "data" / "train" / "red" / "img0_0.jpg"
    corrupt(str(bad))
    monkeypatch.setattr(preprocessing, "find_undecodable", lambda paths, what="", stamps=None: [])
    with pytest.raises(DataError, match=f"image {bad} can no longer be read or decoded"):
        train.train_and_evaluate(config, run)
    assert os.path.exists(os.path.join(run, "checkpoints", "ckpt-2.index"))  # the first run's
