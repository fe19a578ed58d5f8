"""Sharding, batching and the index-based training stream shared by every data set.

Training is index-based so that a checkpoint of the training iterator stays
tiny: what the examples are made from (decoded images, or file paths and record
indices read at every step) lives OUTSIDE the iterator (tensors captured by the
map function), and the iterator itself is only a position counter,

  range -> position p -> example index = index_shuffle(p mod n, (seed, epoch))
          -> example_fn(index, p) -> batch (static shape) -> prefetch

(or, for a plain gather, the positions are batched first and gathered at once).

`index_shuffle` is a stateless permutation of [0, n), new every epoch, so there
is no shuffle buffer: the checkpointed state is the counter plus the few batches
in flight (map and prefetch buffers), ~2 MB for the default `shapes` run instead
of the ~100 MB a cache and a shuffle buffer of images took
(tests/test_pipeline_checkpoint.py pins it).
"""

import os

import numpy as np
import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE
_PAD_SEED = 498247692  # what index_shuffle prepends to a [2] seed
_POSITIONS = 2**63 - 1
# Training input: one parallel call per core decodes and augments, and two batches
# wait ready for the step (see `train_batches`).
_PARALLEL_CALLS = os.cpu_count() or 1
_PREFETCH_BATCHES = 2  # endless in practice: 450,000 years of 10,000 batches of 64 a second


def shard(ds, input_context):
    """Each input pipeline keeps every k-th element from its id: its own shard."""
    if input_context is not None and input_context.num_input_pipelines > 1:
        ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    return ds


def shard_indices(num_examples, input_context):
    """The example indices `shard` keeps for this input pipeline, as numpy int64."""
    indices = np.arange(num_examples, dtype=np.int64)
    if input_context is not None and input_context.num_input_pipelines > 1:
        k, i = input_context.num_input_pipelines, input_context.input_pipeline_id
        indices = indices[i::k]
    return indices


def per_replica_batch_size(batch_size, input_context):
    if input_context is None:
        return batch_size
    return input_context.get_per_replica_batch_size(batch_size)


def once_per_pipeline(load):
    """Memoises `load(input_context)` per input pipeline.

    The engine builds the training dataset more than once (the run-start image
    batch, then the training iterator): the examples are decoded or rendered once.
    """
    loaded = {}

    def wrapped(input_context=None):
        key = (1, 0)
        if input_context is not None:
            key = (input_context.num_input_pipelines, input_context.input_pipeline_id)
        if key not in loaded:
            loaded[key] = load(input_context)
        return loaded[key]

    return wrapped


def gather_all(ds, num_examples):
    """Every element of a finite dataset of at most `num_examples`, stacked into tensors."""
    return ds.batch(max(num_examples, 1)).get_single_element()


def _shuffled(positions, num_examples, seed):
    """Example index at each stream position: epoch e is permutation (seed, e) of [0, n).

    The raw op, because `tf.random.experimental.index_shuffle` pads a batch of
    [n, 2] seeds along the wrong axis; the 3-wide seed is the one it builds for
    a single [2] seed, so a batch gets the same indices as its examples one by one.
    """
    epochs = positions // num_examples
    pad, seed = (tf.fill(tf.shape(positions), tf.constant(v, tf.int64)) for v in (_PAD_SEED, seed))
    seeds = tf.stack([pad, seed, epochs], -1)
    return tf.raw_ops.RandomIndexShuffle(
        index=positions % num_examples, seed=seeds, max_index=num_examples - 1, rounds=4
    )


def positions():
    """The stream positions 0, 1, 2, ... as an endless dataset.

    `Dataset.range`, not `Dataset.counter`: that one is a `scan` over a repeated
    one-element dataset and builds an iterator for every position, ~1.4 ms of
    CPU a batch of 64 on this project's 2-core CPU, 1.8-3.2% of the small
    model's training throughput (BUILD_NOTES "Data"). Checkpoints written with
    `counter` restore everything but the input position (see
    `engine.checkpoints.restore_latest`).
    """
    return tf.data.Dataset.range(_POSITIONS)


def train_batches(
    num_examples, example_fn, batch_size, seed, input_context, deterministic, batched=False
):
    """Infinite, shuffled batches of static shape whose iterator state is a counter.

    Args:
      num_examples: examples of this input pipeline (already sharded).
      example_fn: (index, position) -> example; `index` int64 in
        [0, num_examples), `position` the int64 place in this pipeline's
        stream (a seed for augmentation). Must be a pure function of both.
      batch_size: the global batch size; each pipeline batches its share.
      seed: the run's seed; the permutation of epoch e depends on (seed, e).
      input_context: a `tf.distribute.InputContext`, or None.
      deterministic: keep the parallel map's order (same batches every run).
      batched: `example_fn` takes a batch of indices and positions and returns
        a batch (one gather per batch instead of one map call per example:
        less input work on CPUs shared with the training step).
    """
    n = tf.constant(max(num_examples, 1), tf.int64)
    seed = tf.constant(seed, tf.int64)
    per_replica = per_replica_batch_size(batch_size, input_context)

    def at(positions):
        return example_fn(_shuffled(positions, n, seed), positions)

    ds = positions()
    if batched:  # a gather per batch is cheap: no parallel calls, no in-flight batches
        ds = ds.batch(per_replica, drop_remainder=True).map(at)
    else:
        ds = ds.map(at, num_parallel_calls=_PARALLEL_CALLS)
        ds = ds.batch(per_replica, drop_remainder=True)
    options = tf.data.Options()
    options.deterministic = deterministic
    # Fixed parallelism and prefetch, no autotuning: destroying an iterator waits
    # for its autotuning thread's current pass, which took 3 to 40 s at the end
    # of a run on a busy 2-core machine (the process could not end). The cost,
    # paired against autotuning on shared cores (BUILD_NOTES "Data pipeline"):
    # 0.88-0.99x of its streamed images/s, still ~8x what the step consumes.
    options.autotune.enabled = False
    # Not `experimental_symbolic_checkpoint`: it would also drop the few batches
    # in flight from the checkpoint, but it cut the end-to-end throughput of the
    # real-image pipeline by ~10% (engine.modes.input_benchmark, 2 CPU cores).
    return ds.prefetch(_PREFETCH_BATCHES).with_options(options)


def gather_train_batches(tensors, batch_size, seed, input_context, deterministic, finish=None):
    """`train_batches` over in-memory `tensors` (sharded already), gathered by index.

    `finish(example, position)`, if given, turns each gathered example into the
    training example (augmentation seeded by position, normalisation); without
    it whole batches are gathered at once.
    """
    num_examples = int(tf.nest.flatten(tensors)[0].shape[0])

    def example_fn(index, position):
        example = tf.nest.map_structure(lambda t: tf.gather(t, index), tensors)
        return finish(example, position) if finish else example

    return train_batches(
        num_examples,
        example_fn,
        batch_size,
        seed,
        input_context,
        deterministic,
        batched=finish is None,
    )


def eval_batches(ds, batch_size, input_context=None, cache=True):
    """One pass: shards, optionally caches, batches (keeping the remainder), prefetches.

    Eval iterators are never checkpointed, so a cache here costs no checkpoint space.
    """
    ds = shard(ds, input_context)
    if cache:
        ds = ds.cache()
    return ds.batch(per_replica_batch_size(batch_size, input_context)).prefetch(AUTOTUNE)
