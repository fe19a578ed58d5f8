"""Keras optimizers and learning-rate schedules from the config."""

import keras
import tensorflow as tf


def create_learning_rate(config, total_steps):
    """A constant rate, or linear warm-up then cosine decay to zero.

    The schedule is a function of `optimizer.iterations`, which counts applied
    updates only: a skipped step does not move it.
    """
    if config.lr_schedule == "constant":
        return config.learning_rate
    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else config.learning_rate,
        decay_steps=max(total_steps - warmup, 1),
        warmup_target=config.learning_rate if warmup else None,
        warmup_steps=warmup,
    )


def create_optimizer(config, total_steps):
    """Returns an unbuilt Keras optimizer named by `config.optimizer`."""
    lr = create_learning_rate(config, total_steps)
    wd = config.weight_decay or None
    if config.optimizer == "sgd":
        return keras.optimizers.SGD(lr, weight_decay=wd)
    if config.optimizer == "momentum":
        return keras.optimizers.SGD(lr, momentum=0.9, nesterov=True, weight_decay=wd)
    if config.optimizer == "adamw":
        optimizer = keras.optimizers.AdamW(
            lr, beta_2=config.beta_2, weight_decay=config.weight_decay or 1e-4
        )
        # Decay the kernels only, as is usual: not biases, norms' scales and
        # offsets, or position embeddings.
        optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta", "embedding"])
        return optimizer
    return keras.optimizers.Adam(lr, beta_2=config.beta_2, weight_decay=wd)


def current_learning_rate(optimizer):
    """The rate the next applied update will use, as a Python float."""
    return float(tf.convert_to_tensor(optimizer.learning_rate))
