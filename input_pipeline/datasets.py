"""Turns `--dataset` into train and eval `tf.data` pipelines.

Train: cached, shuffled, repeated forever, batched with `drop_remainder=True` so
every batch has the same static shape (XLA compiles once), prefetched.
Eval: one pass, batched, the last partial batch kept so every example counts.
Both are functions of a `tf.distribute.InputContext`, ready for
`strategy.distribute_datasets_from_function`: each input pipeline reads its own
shard and batches at the per-replica batch size.
"""

import dataclasses
from collections.abc import Callable

import tensorflow as tf

from input_pipeline import shapes, synthetic


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What the engine needs to know about a data set."""

    train_fn: Callable[..., tf.data.Dataset]  # (input_context) -> infinite batches
    eval_fn: Callable[..., tf.data.Dataset]  # (input_context) -> one pass of batches
    num_classes: int
    class_names: tuple
    train_size: int
    eval_size: int


def _shard(ds, input_context):
    if input_context is not None and input_context.num_input_pipelines > 1:
        ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    return ds


def _per_replica(batch_size, input_context):
    if input_context is None:
        return batch_size
    return input_context.get_per_replica_batch_size(batch_size)


def finish_train(ds, batch_size, seed, shuffle_buffer, input_context=None):
    """Shards, caches, shuffles, repeats, batches (static shape) and prefetches."""
    ds = _shard(ds, input_context).cache()
    ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
    ds = ds.batch(_per_replica(batch_size, input_context), drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def finish_eval(ds, batch_size, input_context=None):
    """Shards, caches, batches (keeping the remainder) and prefetches."""
    ds = _shard(ds, input_context).cache()
    return ds.batch(_per_replica(batch_size, input_context)).prefetch(tf.data.AUTOTUNE)


def create_data(config):
    """Returns the `DataSpec` for `config.dataset`.

    Raises:
      ValueError: the data set is unknown or cannot be read (message names it).
    """
    name = config.dataset
    if name == "shapes":

        def make(split, n):
            return shapes.create_dataset(split, n, config.image_size, config.seed)

        num_classes, class_names = len(shapes.CLASS_NAMES), shapes.CLASS_NAMES
    elif name == "synthetic":

        def make(split, n):
            return synthetic.create_dataset(n, config.image_size, config.seed + (split == "eval"))

        num_classes = synthetic.NUM_CLASSES
        class_names = tuple(str(i) for i in range(num_classes))
    else:
        raise ValueError(f"--dataset={name!r} is not available in this build")

    def train_fn(input_context=None):
        ds = make("train", config.train_examples)
        return finish_train(
            ds, config.batch_size, config.seed, config.train_examples, input_context
        )

    def eval_fn(input_context=None):
        return finish_eval(
            make("eval", config.eval_examples), config.eval_batch_size, input_context
        )

    return DataSpec(
        train_fn, eval_fn, num_classes, class_names, config.train_examples, config.eval_examples
    )
