"""The embedded data: deterministic, balanced, learnable shapes; static training batches."""

import numpy as np
import pytest
import tensorflow as tf
from conftest import tiny_config

from engine.data import data_config
from input_pipeline import create_data, shapes


def _arrays(ds):
    images, labels = zip(*[(x.numpy(), int(y)) for x, y in ds], strict=True)
    return np.stack(images), np.array(labels)


def test_shapes_is_deterministic_for_a_seed_and_differs_across_seeds():
    a, la = _arrays(shapes.create_dataset("train", 32, 16, seed=0))
    b, lb = _arrays(shapes.create_dataset("train", 32, 16, seed=0))
    c, _ = _arrays(shapes.create_dataset("train", 32, 16, seed=1))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert not np.array_equal(a, c)


def test_shapes_train_and_eval_never_share_an_example():
    train, _ = _arrays(shapes.create_dataset("train", 64, 16, seed=0))
    evals, _ = _arrays(shapes.create_dataset("eval", 64, 16, seed=0))
    assert not any(np.array_equal(t, e) for t in train for e in evals)


def test_shapes_classes_are_roughly_balanced_and_images_in_range():
    images, labels = _arrays(shapes.create_dataset("train", 1000, 16, seed=0))
    counts = np.bincount(labels, minlength=len(shapes.CLASS_NAMES))
    assert counts.min() > 150, counts
    assert images.min() >= 0.0 and images.max() <= 1.0 and images.dtype == np.float32


def test_shapes_foreground_covers_part_of_the_image():
    images, _ = _arrays(shapes.create_dataset("train", 20, 32, seed=0))
    for image in images:
        spread = image.mean(-1)
        assert spread.max() - spread.min() > 0.3  # a shape stands out from the background


def test_a_generated_set_beyond_the_memory_budget_is_refused_before_it_is_made(monkeypatch):
    from input_pipeline import preprocessing

    config = tiny_config(train_examples=50)  # 50 * 16 * 16 * 3 float32 pixels
    peak = preprocessing.LOAD_PEAK * 50 * 16 * 16 * 3 * 4
    monkeypatch.setattr(preprocessing, "available_memory", lambda: int(2 * peak) - 2)
    for name in ("shapes", "synthetic"):
        with pytest.raises(
            preprocessing.DataError, match=f"--dataset={name}: 50 generated .*16 px"
        ):
            create_data(data_config(config.replace(dataset=name)))
    monkeypatch.setattr(preprocessing, "available_memory", lambda: int(2 * peak))
    assert create_data(data_config(config)).train_size == 50


def test_training_batches_have_a_static_shape_and_eval_keeps_every_example():
    config = tiny_config(train_examples=50, eval_examples=37, batch_size=16, eval_batch_size=16)
    data = create_data(data_config(config))
    train = data.train_fn()
    assert train.element_spec[0].shape == (16, 16, 16, 3)  # drop_remainder=True
    batches = list(train.take(5))
    assert all(x.shape[0] == 16 for x, _ in batches)
    eval_count = sum(int(tf.shape(y)[0]) for _, y in data.eval_fn())
    assert eval_count == 37
