"""Optional step machinery, and `create_train_step`, which plugs it into the step.

Each piece but the last is absent from the step unless asked for:
  * class weights (`--class_weighting`): a weighted loss function;
  * fault injection (`--inject_nonfinite`, `inject.py`): a hook on the scaled gradients;
  * float16 range diagnostics (`--precision_diagnostics`, `diagnostics.py`): an observer;
  * gradient accumulation (`--grad_accum_steps`, `accumulate.py`): micro-batches;
  * fused optimizer kernels (`fused_update.py`): the update of stage 7; on by
    default here (`fused_optimizer=True`), where they cover the update.
"""

import tensorflow as tf

from engine.extras import diagnostics, fused_update
from engine.extras.accumulate import create_micro_batches
from engine.extras.inject import create_hook
from engine.step import TrainStep, cross_entropy


def weighted_cross_entropy(class_weights):
    """`cross_entropy` with each example's loss multiplied by its class's weight."""
    weights = tf.constant(class_weights, tf.float32)

    def loss_fn(labels, logits):
        return cross_entropy(labels, logits) * tf.gather(weights, labels)

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
    grad_accum_steps=1,
    fused_optimizer=True,
):
    """Returns a `TrainStep` with the optional machinery the arguments ask for.

    Args:
      model, optimizer, loss_scale, global_batch_size, clip_norm: as `TrainStep`.
      class_weights: optional per-class loss weights (one float per class).
      precision_diagnostics: also return `underflow_fraction` and
        `overflow_fraction` (see `diagnostics.float16_range_fractions`).
      inject: optional parsed `--inject_nonfinite` spec (see `inject.inject_nonfinite`).
      grad_accum_steps: split each replica's batch into this many micro-batches.
      fused_optimizer: apply Adam and SGD on TensorFlow's fused kernels where
        they cover the update (`fused_update`); else Keras' `optimizer.apply`.
    """
    return TrainStep(
        model,
        optimizer,
        loss_scale,
        global_batch_size,
        clip_norm,
        loss_fn=cross_entropy if class_weights is None else weighted_cross_entropy(class_weights),
        apply_gradients=fused_update.apply_gradients if fused_optimizer else None,
        scaled_gradients_hook=create_hook(inject) if inject else None,
        observers=[diagnostics.float16_range_fractions] if precision_diagnostics else [],
        micro_batches=(
            create_micro_batches(grad_accum_steps, model.trainable_variables)
            if grad_accum_steps > 1
            else None
        ),
    )
