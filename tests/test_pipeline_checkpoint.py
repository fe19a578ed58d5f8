"""The training iterator in a checkpoint: small, and resumed at exactly its place."""

import glob
import os

import numpy as np
import pytest
import tensorflow as tf
from conftest import tiny_config
from image_trees import make_folder_tree

from engine import train
from engine.data import data_config
from input_pipeline import create_data, preprocessing, records

MB = 1 << 20


def test_default_sized_shapes_run_writes_a_checkpoint_without_the_data_set(tmp_path):
    # The default data set: 4096 train examples of 32x32x3 float32 are 48 MiB, so a
    # checkpoint that held the data (a cache or shuffle buffer of images) would be
    # far above this bound; the tiny model and its optimizer take a few KB.
    config = tiny_config(image_size=32, train_examples=4096, batch_size=64, train_steps=3)
    assert config.train_examples * 32 * 32 * 3 * 4 > 40 * MB
    train.train_and_evaluate(config, str(tmp_path))
    (data_file,) = glob.glob(str(tmp_path / "checkpoints" / "ckpt-3.data-*"))
    assert os.path.getsize(data_file) < 5 * MB


def _resumed_and_uninterrupted(train_fn, tmp_path, before=3, after=8):
    """Batches `after` batches past a save, from a restored and from the original iterator."""
    iterator = iter(train_fn())
    for _ in range(before):
        next(iterator)
    path = tf.train.Checkpoint(iterator=iterator).save(str(tmp_path / "it"))
    uninterrupted = [next(iterator) for _ in range(after)]
    restored = iter(train_fn())
    next(restored)  # moved on first, so the restore must really set the position
    tf.train.Checkpoint(iterator=restored).restore(path).assert_consumed()
    resumed = [next(restored) for _ in range(after)]
    return resumed, uninterrupted


def _assert_same_batches(a, b):
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(xa.numpy(), xb.numpy())
        np.testing.assert_array_equal(ya.numpy(), yb.numpy())


def test_restored_shapes_iterator_continues_with_the_uninterrupted_batches(tmp_path):
    # 40 examples in batches of 8: the 11 batches cross two epoch boundaries.
    config = tiny_config(train_examples=40, batch_size=8, deterministic=True)
    resumed, uninterrupted = _resumed_and_uninterrupted(
        create_data(data_config(config)).train_fn, tmp_path
    )
    _assert_same_batches(resumed, uninterrupted)


@pytest.mark.parametrize("cache", ["memory", "", "file"])
def test_restored_folder_iterator_continues_with_the_uninterrupted_batches(tmp_path, cache):
    root = make_folder_tree(tmp_path / "data", per_class=4)  # 12 images: 1.5 batches an epoch
    if cache == "file":  # decoded records on disk, read by index
        cache = str(tmp_path) + "/"
    config = tiny_config(
        dataset=f"folder:{root}", batch_size=8, eval_batch_size=8, cache=cache, deterministic=True
    )
    resumed, uninterrupted = _resumed_and_uninterrupted(
        create_data(data_config(config)).train_fn, tmp_path
    )
    _assert_same_batches(resumed, uninterrupted)


def test_each_epoch_is_a_new_permutation_of_every_example():
    config = tiny_config(train_examples=48, batch_size=8, deterministic=True)
    images = np.concatenate(
        [x.numpy() for x, _ in create_data(data_config(config)).train_fn().take(12)]
    )
    rows = [bytes(row) for row in images.reshape(96, -1)]
    first, second = rows[:48], rows[48:]
    assert len(set(first)) == 48  # every example once in epoch 1...
    assert sorted(first) == sorted(second)  # ...and again in epoch 2,
    assert first != second  # in another order.


def test_a_disk_cache_trains_without_decoding_and_reads_each_batch_from_its_file(
    tmp_path, monkeypatch
):
    # --cache=DIR: "no decoding, nothing held in memory". Once the cache is
    # written, a pipeline that could not decode an image still gives the memory
    # cache's batches, and every example it gives is read from the file then.
    root = make_folder_tree(tmp_path / "data", per_class=4)
    (tmp_path / "cache").mkdir()
    config = tiny_config(dataset=f"folder:{root}", batch_size=8, deterministic=True)
    on_disk = config.replace(cache=f"{tmp_path}/cache/")
    create_data(data_config(on_disk)).train_fn()  # writes the cache
    expected = [x.numpy() for x, _ in create_data(data_config(config)).train_fn().take(4)]

    reads = []
    open_records = records.open_records

    class Counted:  # the cache file's records, each read counted
        def __init__(self, source):
            self.source = source

        def __getitem__(self, index):
            reads.append(index)
            return self.source[index]

    def no_decoding(*args):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(records, "open_records", lambda *args: Counted(open_records(*args)))
    monkeypatch.setattr(preprocessing, "decode_and_resize", no_decoding)
    train_fn = create_data(data_config(on_disk)).train_fn
    assert reads == []  # nothing read (or held) before the batches are asked for
    batches = [x.numpy() for x, _ in train_fn().take(4)]
    assert len(reads) >= 4 * 8
    for a, b in zip(batches, expected, strict=True):
        np.testing.assert_array_equal(a, b)


def test_file_cache_is_written_at_start_up_and_gives_the_memory_cache_batches(tmp_path):
    root = make_folder_tree(tmp_path / "data", per_class=4)
    prefix = tmp_path / "cache" / "imgs"
    prefix.parent.mkdir()
    config = tiny_config(dataset=f"folder:{root}", batch_size=8, deterministic=True)

    def batches(cache):
        train_fn = create_data(data_config(config.replace(cache=cache))).train_fn
        return [x.numpy() for x, _ in train_fn().take(4)]

    from_file = batches(str(prefix))
    assert len(list(prefix.parent.glob("imgs-*.array_record"))) == 1  # the train split's
    for a, b in zip(batches(str(prefix)), batches("memory"), strict=True):  # read back
        np.testing.assert_array_equal(a, b)
    for a, b in zip(from_file, batches("memory"), strict=True):
        np.testing.assert_array_equal(a, b)
