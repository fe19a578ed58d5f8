"""`shapes`: the embedded default data set, generated inside tf.data.

Five classes of filled shapes (circle, square, triangle, plus, ring) at a random
position, size and colour on a noisy background of another colour. Example `i`
of a split is a pure function of (seed, split, i) via stateless random ops, so
the data is identical on every machine and run, needs no disk and no network,
and train and eval never share an example.
"""

import tensorflow as tf

CLASS_NAMES = ("circle", "square", "triangle", "plus", "ring")
_SPLIT_OFFSET = {"train": 0, "eval": 1 << 40}
PIXEL_RANGE = (0.0, 1.0)  # what the images span, and so the model's input


def _masks(image_size, cx, cy, r):
    coords = tf.range(image_size, dtype=tf.float32) + 0.5
    dy, dx = tf.meshgrid(coords - cy, coords - cx, indexing="ij")
    adx, ady = tf.abs(dx), tf.abs(dy)
    dist = tf.sqrt(dx * dx + dy * dy)
    bar = r / 3.0
    return tf.stack(
        [
            dist <= r,
            tf.maximum(adx, ady) <= 0.85 * r,
            (ady <= r) & (adx <= 0.6 * (dy + r)),  # apex up
            ((adx <= bar) & (ady <= r)) | ((ady <= bar) & (adx <= r)),
            (dist <= r) & (dist >= 0.55 * r),
        ]
    )


def render_example(seed, split, index, image_size):
    """Returns (image float32 [H, W, 3] in `PIXEL_RANGE`, label int32) for one example."""
    key = tf.stack([tf.cast(seed, tf.int64), _SPLIT_OFFSET[split] + tf.cast(index, tf.int64)])
    u = tf.random.stateless_uniform([10], seed=key)
    size = float(image_size)
    label = tf.cast(u[0] * len(CLASS_NAMES), tf.int32)
    r = size * (0.18 + 0.14 * u[1])
    cx = r + (size - 2.0 * r) * u[2]
    cy = r + (size - 2.0 * r) * u[3]
    mask = tf.gather(_masks(image_size, cx, cy, r), label)[..., None]
    # Foreground and background are drawn from disjoint brightness bands, then
    # swapped half the time, so colour alone never gives the class away.
    dark, light = 0.45 * u[4:7], 0.55 + 0.45 * u[7:10]
    swap = u[4] > 0.5
    fg, bg = tf.where(swap, dark, light), tf.where(swap, light, dark)
    noise = 0.08 * tf.random.stateless_normal([image_size, image_size, 3], seed=key + 7)
    image = tf.where(mask, fg, bg) + noise
    return tf.clip_by_value(image, *PIXEL_RANGE), label


def create_dataset(split, num_examples, image_size, seed):
    """An unbatched, finite dataset of `num_examples` generated examples."""
    return tf.data.Dataset.range(num_examples).map(
        lambda i: render_example(seed, split, i, image_size),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )


def render_examples(seed, split, indices, image_size):
    """(images [n, H, W, 3], labels [n]) for example `indices` of `split`, rendered in parallel."""
    ds = tf.data.Dataset.from_tensor_slices(tf.constant(indices, tf.int64)).map(
        lambda i: render_example(seed, split, i, image_size),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    return ds.batch(max(len(indices), 1)).get_single_element()
