"""The training and eval steps: only TensorFlow ops, one replica's view.

The numerical order of a mixed-precision step, in one place:

  1. forward under the model's dtype policy; logits and loss in float32
  2. scale the loss (the no-op scale multiplies by one)
  3. gradients of the scaled loss with respect to the float32 weights
  4. all-reduce across replicas, then cast to float32 and unscale
  5. ONE finiteness flag over all the reduced gradients, so every replica
     reaches the same decision
  6. global norm of the unscaled gradients; optional clipping by it
  7. apply the update, or skip it: a skipped step leaves every weight, every
     optimizer slot, the optimizer's iteration count and the BatchNorm moving
     statistics bit-identical
  8. update the loss scale (grow, count or back off), in the graph

What a skipped step does to the counters (and is tested):
  * the engine's global step advances: it counts batches consumed, so the data
    position, summaries and `--train_steps` budget stay tied to the input.
  * `optimizer.iterations` does not advance: it counts applied updates, so the
    learning-rate schedule (a function of it) and Adam's bias correction never
    move on a step that changed nothing.
"""

import keras
import tensorflow as tf

from engine import config as config_lib
from engine import diagnostics


def _sum_over_replicas(grads):
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return grads
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)


def apply_scaled_gradients(
    optimizer, loss_scale, scaled_grads, variables, clip_norm=0.0, on_skip=None
):
    """Steps 4-8 above: unscale, check, clip, apply or skip, update the scale.

    Args:
      optimizer: a built Keras optimizer over `variables`.
      loss_scale: the scale the gradients were multiplied by.
      scaled_grads: gradients of the scaled loss, one per variable (this
        replica's; they are summed over replicas here).
      variables: the variables to update.
      clip_norm: clip to this global norm of the unscaled gradients; 0 disables.
      on_skip: optional callable run (in the graph) when the step is skipped.

    Returns:
      (finite, grad_norm, finite_per_variable): bool scalar, float32 global norm
      of the unscaled gradients before clipping, bool vector with one entry per
      variable (False where that gradient holds an inf or a nan).
    """
    grads = loss_scale.unscale(_sum_over_replicas(scaled_grads))
    # Per-tensor `is_finite`, not "is the global norm finite": a sum of squares
    # can overflow float32 for large but finite gradients and skip a good step.
    finite_per_variable = tf.stack([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
    finite = tf.reduce_all(finite_per_variable)
    grad_norm = tf.linalg.global_norm(grads)
    if clip_norm > 0:
        # Clip the true (unscaled) gradients: clipping scaled ones would make
        # the threshold depend on the current loss scale.
        grads, _ = tf.clip_by_global_norm(grads, clip_norm, use_norm=grad_norm)

    def apply_update():
        optimizer.apply(grads, variables)

    def skip_update():
        if on_skip is not None:
            on_skip()

    tf.cond(finite, apply_update, skip_update)
    loss_scale.update(finite)
    return finite, grad_norm, finite_per_variable


def inject_nonfinite(grads, variables, step, spec):
    """Testing hook: nan gradients at the steps `spec` names, decided in the graph.

    Done on the scaled gradients, so the rest of the step sees exactly what a
    real float16 overflow would give it.

    Args:
      grads: one gradient per variable.
      variables: the variables, matched by their `path` (Keras 3) against the substring.
      step: int64 scalar, the number this step will have once done (the first is 1).
      spec: `config.parse_inject_nonfinite`'s result: (ranges, substring).

    Raises:
      ConfigError: no variable's path contains the substring.
    """
    ranges, substring = spec
    names = [getattr(v, "path", v.name) for v in variables]
    if not any(substring in n for n in names):
        raise config_lib.ConfigError(
            f"--inject_nonfinite: no trainable variable's path contains {substring!r}; "
            f"some paths: {', '.join(names[:4])}"
        )
    step = tf.cast(step, tf.int64)
    hit = tf.constant(False)
    for start, stop in ranges:
        in_range = step >= start if stop is None else (step >= start) & (step < stop)
        hit = hit | in_range
    return [
        tf.where(hit, tf.fill(tf.shape(g), tf.constant(float("nan"), g.dtype)), g)
        if g is not None and substring in name
        else g
        for g, name in zip(grads, names, strict=True)
    ]


def create_train_step(
    model,
    optimizer,
    loss_scale,
    global_batch_size,
    clip_norm=0.0,
    class_weights=None,
    precision_diagnostics=False,
    inject=None,
):
    """Returns `train_step(images, labels, step=None) -> dict of tensors`.

    Args:
      model: a built Keras model producing float32 logits.
      optimizer: a built Keras optimizer over `model.trainable_variables`.
      loss_scale: a `NoOpLossScale`, `StaticLossScale` or `DynamicLossScale`.
      global_batch_size: examples per step over all replicas; the loss is the
        sum over a replica's examples divided by it, so summed replica
        gradients are the gradient of the global mean.
      clip_norm: clip the unscaled gradients to this global norm; 0 disables.
      class_weights: optional per-class loss weights (one float per class); each
        example's loss is multiplied by its class's weight.
      precision_diagnostics: also return `underflow_fraction` and
        `overflow_fraction` (see `diagnostics.float16_range_fractions`).
      inject: optional parsed `--inject_nonfinite` spec (see `inject_nonfinite`);
        the step then needs `step`, its number once done.

    The returned dict holds `loss` (this replica's share of the mean loss),
    `correct` (int32 count), `finite` (bool), `grad_norm` (unscaled, before
    clipping) and `finite_per_variable` (bool per trainable variable).
    """
    trainable = model.trainable_variables
    # BatchNorm moving statistics are written by the forward pass itself, so a
    # skipped step must put them back (a nan batch would otherwise poison them).
    stateful = model.non_trainable_variables
    if class_weights is not None:
        class_weights = tf.constant(class_weights, tf.float32)

    def train_step(images, labels, step=None):
        saved_state = [tf.identity(v.value) for v in stateful]
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            per_example = keras.losses.sparse_categorical_crossentropy(
                labels, logits, from_logits=True
            )
            if class_weights is not None:
                per_example *= tf.gather(class_weights, labels)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch_size)
            scaled_loss = loss_scale.scale(loss)
        scaled_grads = tape.gradient(scaled_loss, trainable)
        if inject:
            scaled_grads = inject_nonfinite(scaled_grads, trainable, step, inject)

        fractions = {}
        if precision_diagnostics:
            # Before `apply_scaled_gradients` updates the scale: measured against
            # the scale this step used, on this replica's unscaled gradients.
            fractions = diagnostics.float16_range_fractions(
                loss_scale.unscale(scaled_grads), loss_scale.value
            )

        def restore_state():
            for var, value in zip(stateful, saved_state, strict=True):
                var.assign(value)

        finite, grad_norm, finite_per_variable = apply_scaled_gradients(
            optimizer, loss_scale, scaled_grads, trainable, clip_norm, on_skip=restore_state
        )
        correct = tf.reduce_sum(
            tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.int32)
        )
        out = {
            "loss": loss,
            "correct": correct,
            "finite": finite,
            "grad_norm": grad_norm,
            "finite_per_variable": finite_per_variable,
        }
        out.update(fractions)
        return out

    return train_step


def create_eval_step(model):
    """Returns `eval_step(images, labels) -> {loss_sum, correct, count}` for one replica."""

    def eval_step(images, labels):
        logits = model(images, training=False)
        per_example = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        predictions = tf.argmax(logits, -1, output_type=tf.int32)
        return {
            "loss_sum": tf.reduce_sum(per_example),
            "correct": tf.reduce_sum(tf.cast(tf.equal(predictions, labels), tf.int32)),
            "count": tf.size(labels),
        }

    return eval_step
