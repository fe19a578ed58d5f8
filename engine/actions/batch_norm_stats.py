"""Precise BatchNorm: recompute the population statistics the weights imply.

A BatchNorm layer normalises a training batch by the batch's own moments, and
everything that runs in inference mode (eval, `--mode=predict`, the exported
SavedModel) by its moving averages. Those lag the weights: with momentum 0.99
(Keras Applications' default) they still describe weights from about a hundred
steps back, and at a high learning rate that is a different network (measured
on real photos: eval accuracy 0.21 with them, 0.69 with batch statistics).

So before each eval, the last checkpoint and the export, the statistics are
recomputed from a fixed number of training batches with every weight fixed (the
"precise BN" of detectron2 and pycls):

  for each of the first N batches of a fresh training pipeline (same batches
  every time: positions 0.. of the seed's first epoch; the training iterator
  and its position are never touched):
      forward pass in training mode with momentum 0, so that each trainable
      BatchNorm layer's moving statistics become its input's batch statistics
      (per replica: each replica's own batch, as in training)
      add them, averaged over replicas, to the running sums
  moving_mean     = mean over batches of the batch means
  moving_variance = mean over batches of the biased batch variances

The variance is Keras' own definition: both `keras.layers.BatchNormalization`
and `models.batch_norm.FusedBatchNormalization` average the biased batch
variance (the one that normalised the batch), so the result is the fixed point
Keras' moving average would reach with these weights after endless steps. (The
pooled variance of all the activations is larger by the spread of the batch
means, about 1/n of it for n values per channel in a batch: a few hundredths
of a percent at the batch sizes used.)

Everything runs in one `tf.function`: no value reaches the host until the new
statistics are assigned. Fixed weights and the same batches give the same
statistics, so recalibrating a recalibrated model changes nothing.
"""

import contextlib
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from models.layers import all_layers


def batch_norm_layers(model):
    """The BatchNorm layers of `model` (nested ones too) that training updates."""
    # A frozen layer (trainable=False) runs in inference mode even in training:
    # its statistics are not the model's to recompute.
    return [
        layer
        for layer in all_layers(model)
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
    ]


def recalibration_batches(examples, batch_size, train_size):
    """Batches that cover `examples` training examples, capped at one epoch, at least one."""
    return max(min(examples, train_size) // batch_size, 1)


@contextlib.contextmanager
def _momentum_zero(layers):
    """Momentum 0 while the recalibration traces: moving statistics = batch statistics.

    Keras reads `momentum` when a call is traced, so the training step, traced
    outside, keeps the layers' own momentum.
    """
    saved = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum = 0.0
    try:
        yield
    finally:
        for layer, momentum in zip(layers, saved, strict=True):
            layer.momentum = momentum


class Recalibration:
    """Recomputes the BatchNorm statistics of `model` from `num_batches` training batches.

    Args:
      strategy: the run's `tf.distribute` strategy (the model's variables are
        under it).
      model: a built Keras model.
      dataset_fn: `input_context -> tf.data.Dataset` of (images, labels)
        training batches, a fresh pipeline on each call (`DataSpec.train_fn`).
      num_batches: global batches to average over.
      jit_compile: compile each replica's forward pass with XLA.

    Calling it (`recalibrate(step)`) assigns the new statistics to every
    replica and returns whether any value changed.
    """

    def __init__(self, strategy, model, dataset_fn, num_batches, jit_compile=False):
        self.strategy, self.model, self.num_batches = strategy, model, num_batches
        self.jit_compile = jit_compile
        self._trace_for(batch_norm_layers(model))
        # The same batches in the same order on every call, even when training
        # lets its parallel map reorder (no --deterministic): idempotent statistics.
        ordered = tf.data.Options()
        ordered.deterministic = True
        self._dataset = strategy.distribute_datasets_from_function(
            lambda context: (
                dataset_fn(context).take(num_batches * _replicas_fed(context)).with_options(ordered)
            )
        )

    def _trace_for(self, layers):
        """The functions over `layers`' statistics (traced again when they change)."""
        self.layers = layers
        self.statistics = [v for layer in layers for v in _statistics(layer)]
        self._forward = tf.function(self._batch_statistics, jit_compile=self.jit_compile)
        self._recalibrate = tf.function(self._recalibrate_all)

    def __call__(self, step):
        layers = batch_norm_layers(self.model)  # --freeze_steps changes which
        if layers != self.layers:
            self._trace_for(layers)
        if not self.layers:
            return False
        start = time.perf_counter()
        before = [v.numpy() for v in self.statistics]
        with _momentum_zero(self.layers):
            self._recalibrate()
        changed = any(
            not np.array_equal(b, v.numpy()) for b, v in zip(before, self.statistics, strict=True)
        )
        logging.info(
            "BatchNorm statistics of %d layers recomputed from %d batches at step %d in %.2f s",
            len(self.layers),
            self.num_batches,
            step,
            time.perf_counter() - start,
        )
        return changed

    def _batch_statistics(self, images):
        """One replica: every layer's statistics of this batch (float32)."""
        # Zeroed first: a non-finite old value times momentum 0 would still be nan.
        for variable in self.statistics:
            variable.assign(tf.zeros_like(variable.value))
        self.model(images, training=True)
        return [tf.identity(v.value) for v in self.statistics]

    def _replica_batch(self, images):
        # A plain replica function around the compiled one, as the eval loop does,
        # so that XLA reaches each replica's own variables.
        return self._forward(images)

    def _assign(self, values):
        for variable, value in zip(self.statistics, values, strict=True):
            variable.assign(value)

    def _recalibrate_all(self):
        mean = tf.distribute.ReduceOp.MEAN
        # A tuple: autograph would stack a list of loop values into one tensor.
        sums = tuple(tf.zeros_like(v.value) for v in self.statistics)
        count = tf.constant(0.0)
        for images, _ in self._dataset:
            out = self.strategy.run(self._replica_batch, args=(images,))
            # Equal-sized replica batches: their mean is the mean over batches.
            sums = tuple(
                s + self.strategy.reduce(mean, o, axis=None) for s, o in zip(sums, out, strict=True)
            )
            count += 1.0
        averages = [s / tf.maximum(count, 1.0) for s in sums]
        # Every replica gets the same values (Keras keeps a copy per replica).
        self.strategy.run(self._assign, args=(averages,))


class NoRecalibration:
    """`--bn_recalibration_examples=0`: the moving averages stay as training left them."""

    def __call__(self, step):
        return False


def _replicas_fed(input_context):
    # A pipeline yields per-replica batches, one for each replica it feeds.
    return input_context.num_replicas_in_sync // input_context.num_input_pipelines


def _statistics(layer):
    return [layer.moving_mean, layer.moving_variance]


def create_recalibration(strategy, model, data, examples, batch_size, jit_compile):
    """The run's recalibration from `examples` training examples (`--bn_recalibration_examples`;
    0: a no-op twin)."""
    if not examples:
        return NoRecalibration()
    num_batches = recalibration_batches(examples, batch_size, data.train_size)
    return Recalibration(strategy, model, data.train_fn, num_batches, jit_compile=jit_compile)
