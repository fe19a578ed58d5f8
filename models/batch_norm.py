"""Keras' BatchNormalization on TensorFlow's fused BatchNorm kernels.

Keras 3 computes BatchNorm on the TensorFlow backend from separate ops: it casts
half-precision activations up to float32, takes the moments (`Mean`,
`SquaredDifference`, ...) and normalises with a chain of elementwise ops, and
the backward pass is as many again. Keras 2 had a `fused=True` path; Keras 3
dropped it. `FusedBatchNormV3` does the forward pass in one kernel (and the
backward in one more), reads float16 or bfloat16 activations as they are and
keeps its statistics in float32 inside the kernel.

Measured on this project's 2-core CPU (fp32 ResNet50 at 96 px, batch 32, one
forward and backward pass, no XLA): 544 -> 451 ms; with `mixed_bfloat16`
440 -> 288 ms. Under XLA the fused op is slower (XLA fuses Keras' elementwise
chain itself and expands the fused op less well: 925 -> 1018 ms), so models
that XLA compiles keep Keras' layer (`registry.create_model(fused_batch_norm=)`).

The layer is Keras' own with only `call` replaced: the same weights, names,
config and checkpoints, and the same moving-statistics update (the biased batch
variance, as Keras uses). Anything the fused kernel does not cover (masks,
renormalisation, synchronised statistics, inputs that are not 4-D channels-last)
goes through Keras' code unchanged.
"""

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="models")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization` computed by `FusedBatchNormV3`."""

    def call(self, inputs, training=None, mask=None):
        rank = len(inputs.shape)
        if mask is not None or self.renorm or self.synchronized or rank != 4:
            return super().call(inputs, training=training, mask=mask)
        if self.axis % rank != rank - 1:
            return super().call(inputs, training=training, mask=mask)
        channels = inputs.shape[-1]
        gamma = tf.cast(self.gamma, tf.float32) if self.scale else tf.ones([channels])
        beta = tf.cast(self.beta, tf.float32) if self.center else tf.zeros([channels])
        if training and self.trainable:
            outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                inputs, gamma, beta, epsilon=self.epsilon, is_training=True
            )
            # The kernel returns the unbiased (n - 1) batch variance for running
            # averages; Keras averages the biased one, which normalised the batch.
            n = tf.cast(tf.size(inputs) // channels, tf.float32)
            variance = variance * ((n - 1.0) / n)
            momentum = self.momentum
            self.moving_mean.assign(self.moving_mean * momentum + mean * (1.0 - momentum))
            self.moving_variance.assign(
                self.moving_variance * momentum + variance * (1.0 - momentum)
            )
        else:
            outputs, _, _ = tf.compat.v1.nn.fused_batch_norm(
                inputs,
                gamma,
                beta,
                mean=tf.cast(self.moving_mean, tf.float32),
                variance=tf.cast(self.moving_variance, tf.float32),
                epsilon=self.epsilon,
                is_training=False,
            )
        return tf.cast(outputs, self.compute_dtype)


def fuse_batch_norm(model):
    """A copy of `model` whose `BatchNormalization` layers run on the fused kernels.

    Every other layer (and its weights) is shared with `model`, not copied; each
    new BatchNorm layer gets the old one's config and weights.
    """
    originals = {}

    def replace(layer):
        if type(layer) is not keras.layers.BatchNormalization:
            return layer
        originals[layer.name] = layer
        return FusedBatchNormalization.from_config(layer.get_config())

    fused = keras.models.clone_model(model, clone_function=replace)
    for layer in fused.layers:
        if layer.name in originals:
            layer.set_weights(originals[layer.name].get_weights())
    return fused
