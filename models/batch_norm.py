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
renormalisation, synchronised statistics; anything but 4-D channels-last
float32, float16 or bfloat16 activations with float32 weights) goes through
Keras' code unchanged.
"""

import keras
import tensorflow as tf

from models.layers import all_layers


@keras.saving.register_keras_serializable(package="models")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization` computed by `FusedBatchNormV3`."""

    def call(self, inputs, training=None, mask=None):
        rank = len(inputs.shape)
        if (
            mask is not None
            or self.renorm
            or self.synchronized
            or rank != 4
            or self.axis % rank != rank - 1
            # The kernel takes float32 statistics and float32/half activations.
            or self.variable_dtype != "float32"
            or inputs.dtype not in (tf.float32, tf.float16, tf.bfloat16)
        ):
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
    """Switches every `BatchNormalization` layer of `model` (nested ones too) to
    `FusedBatchNormalization`, in place, and returns `model`.

    The subclass adds no state and replaces only `call`, so changing a built
    layer's class keeps its weights, variable paths, config and place in the
    graph; a functional model calls each layer's `call` anew on every run. (A
    `clone_model` would rebuild the model outside its dtype policy and leave the
    shared layers pointing into the discarded graph.)
    """
    for layer in all_layers(model):
        if type(layer) is keras.layers.BatchNormalization:
            layer.__class__ = FusedBatchNormalization
    return model
