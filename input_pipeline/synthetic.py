"""`synthetic`: one random batch, repeated, for measuring step throughput alone."""

import tensorflow as tf

NUM_CLASSES = 10


def create_dataset(num_examples, image_size, seed):
    """An unbatched, finite dataset of random images and labels."""
    images = tf.random.stateless_uniform([num_examples, image_size, image_size, 3], [seed, 1])
    labels = tf.random.stateless_uniform(
        [num_examples], [seed, 2], maxval=NUM_CLASSES, dtype=tf.int32
    )
    return tf.data.Dataset.from_tensor_slices((images, labels))
