"""What a checkpoint holds and where it lives.

Layout: `<model_dir>/checkpoints/ckpt-<step>.*`, written by `tf.train.CheckpointManager`.
The root object has these children, so any of them can be restored alone
(`tf.train.Checkpoint(model=model).restore(path).expect_partial()`):
  model, optimizer, loss_scale, step, skipped_steps.
"""

import os

import tensorflow as tf


def checkpoint_dir(model_dir):
    return os.path.join(model_dir, "checkpoints")


def create_checkpoint(state):
    """The root `tf.train.Checkpoint` for a `loop.TrainState`."""
    return tf.train.Checkpoint(
        model=state.model,
        optimizer=state.optimizer,
        loss_scale=state.loss_scale,
        step=state.step,
        skipped_steps=state.skipped_steps,
    )


def create_manager(checkpoint, model_dir, max_to_keep=3):
    return tf.train.CheckpointManager(
        checkpoint, checkpoint_dir(model_dir), max_to_keep=max_to_keep, step_counter=None
    )
