"""Gradient accumulation (`--grad_accum_steps`): several micro-batches, one decision, one update."""

import tensorflow as tf


def create_micro_batches(k, variables):
    """Returns a `TrainStep(micro_batches=)` function that splits each batch into `k`.

    The unscaled gradients, loss shares and correct counts of the micro-batches
    are summed in a `tf.while_loop`; the step then checks, clips and applies the
    sum once, so `k` micro-batches of B/k examples give the update of one batch of B.
    """

    def micro_batches(gradients, images, labels):
        micro_images = tf.reshape(images, [k, -1, *images.shape[1:]])
        micro_labels = tf.reshape(labels, [k, -1])

        def accumulate(i, grads, loss, correct):
            part_grads, part_loss, part_correct = gradients(micro_images[i], micro_labels[i])
            grads = [a + b for a, b in zip(grads, part_grads, strict=True)]
            return i + 1, grads, loss + part_loss, correct + part_correct

        zeros = [tf.zeros_like(v.value) for v in variables]
        _, grads, loss, correct = tf.while_loop(
            lambda i, *_: i < k,
            accumulate,
            (tf.constant(0), zeros, tf.constant(0.0), tf.constant(0)),
        )
        return grads, loss, correct

    return micro_batches
