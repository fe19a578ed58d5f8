"""`synthetic`: random in-memory images, for measuring step throughput alone."""

import tensorflow as tf

NUM_CLASSES = 10
PIXEL_RANGE = (0.0, 1.0)  # what the images span, and so the model's input


def create_arrays(num_examples, image_size, seed):
    """(images [n, H, W, 3] uniform in `PIXEL_RANGE`, int32 labels [n]), random but seeded."""
    low, high = PIXEL_RANGE
    images = tf.random.stateless_uniform(
        [num_examples, image_size, image_size, 3], [seed, 1], minval=low, maxval=high
    )
    labels = tf.random.stateless_uniform(
        [num_examples], [seed, 2], maxval=NUM_CLASSES, dtype=tf.int32
    )
    return images, labels
