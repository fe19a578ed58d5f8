"""Optional step machinery, and `create_train_step`, which plugs it into the step.

Each piece but the last is absent from the step unless asked for:
  * class weights (`--class_weighting`) and label smoothing: another loss function;
  * fault injection (`--inject_nonfinite`, `inject.py`): a hook on the scaled gradients;
  * float16 range diagnostics (`--precision_diagnostics`, `diagnostics.py`): an observer;
  * gradient accumulation (`--grad_accum_steps`, `accumulate.py`): micro-batches;
  * fused optimizer kernels (`fused_update.py`): the update of stage 7; on by
    default here (`fused_optimizer=True`), where they cover the update.
"""

import keras
import tensorflow as tf

from engine.extras import diagnostics, fused_update
from engine.extras.accumulate import create_micro_batches
from engine.extras.inject import create_hook
from engine.step import TrainStep, cross_entropy


def create_loss_fn(class_weights=None, label_smoothing=0.0):
    """`cross_entropy`, or a variant: smoothed targets, each example weighted by its class."""
    if class_weights is None and not label_smoothing:
        return cross_entropy

    def loss_fn(labels, logits):
        if label_smoothing:
            targets = tf.one_hot(labels, tf.shape(logits)[-1], dtype=tf.float32)
            loss = keras.losses.categorical_crossentropy(
                targets, logits, from_logits=True, label_smoothing=label_smoothing
            )
        else:
            loss = cross_entropy(labels, logits)
        if class_weights is not None:
            loss *= tf.gather(tf.constant(class_weights, tf.float32), labels)
        return loss

    return loss_fn


def create_train_step(
    model,
    optimizer,
    loss_scale,
    global_batch_size,
    clip_norm=0.0,
    class_weights=None,
    precision_diagnostics=False,
    inject=None,
    step_counter=None,
    grad_accum_steps=1,
    fused_optimizer=True,
    label_smoothing=0.0,
    float8=None,
):
    """Returns a `TrainStep` with the optional machinery the arguments ask for.

    Args:
      model, optimizer, loss_scale, global_batch_size, clip_norm: as `TrainStep`.
      class_weights: optional per-class loss weights (one float per class).
      label_smoothing: mix this much of a uniform distribution into the targets.
      precision_diagnostics: also return `underflow_fraction` and
        `overflow_fraction` (see `diagnostics.float16_range_fractions`).
      inject: optional parsed `--inject_nonfinite` spec (see `inject.inject_nonfinite`).
      step_counter: with `inject`, the run's global step variable (`TrainState.step`).
      grad_accum_steps: split each replica's batch into this many micro-batches.
      fused_optimizer: apply Adam and SGD on TensorFlow's fused kernels where
        they cover the update (`fused_update`); else Keras' `optimizer.apply`.
      float8: the model's float8 recipe (`engine.float8`), or None: as `TrainStep`.
    """
    return TrainStep(
        model,
        optimizer,
        loss_scale,
        global_batch_size,
        clip_norm,
        loss_fn=create_loss_fn(class_weights, label_smoothing),
        apply_gradients=fused_update.apply_gradients if fused_optimizer else None,
        scaled_gradients_hook=(
            create_hook(inject, model.trainable_variables, step_counter) if inject else None
        ),
        observers=[diagnostics.float16_range_fractions] if precision_diagnostics else [],
        micro_batches=(
            create_micro_batches(grad_accum_steps, model.trainable_variables)
            if grad_accum_steps > 1
            else None
        ),
        float8=float8,
    )
