"""The training step and the eval step: only TensorFlow ops.

The numerical order of a mixed-precision step, in one place:

  1. forward under the model's dtype policy; logits and loss in float32
  2. scale the loss (the no-op scale multiplies by one)
  3. gradients of the scaled loss with respect to the float32 weights
  4. cast to float32 and unscale, then sum across replicas
  5. ONE finiteness flag over all the summed gradients, so every replica
     reaches the same decision
  6. global norm of the unscaled gradients; optional clipping by it
  7. apply the update, or skip it: a skipped step leaves every weight, every
     optimizer slot, the optimizer's iteration count and the BatchNorm moving
     statistics bit-identical
  8. update the loss scale (grow, count or back off) and the float8 recipe's
     delayed scales, in the graph: a skipped step leaves the latter as they were

What a skipped step does to the counters (and is tested):
  * the engine's global step advances: it counts batches consumed, so the data
    position, summaries and `--train_steps` budget stay tied to the input.
  * `optimizer.iterations` does not advance: it counts applied updates, so the
    learning-rate schedule (a function of it) and Adam's bias correction never
    move on a step that changed nothing.

One replica runs stages 1-8 in `TrainStep.__call__`, compiled whole by XLA:
stages 1-4 of one batch are `TrainStep.gradients`, the rest read line by line.
Several replicas run 1-6 in each replica (`replica_step`) and 7-8 once, in
cross-replica context (`cross_replica_update`): a `tf.cond` around the
optimizer is not allowed inside a replica under strategies that synchronise
with `merge_call` (every strategy on a CPU).

Optional machinery plugs in at construction (`engine.extras.create_train_step`
wires it): a loss function (class weights), a hook on the scaled gradients
(fault injection), observers of the unscaled gradients (float16 range
diagnostics), micro-batches (gradient accumulation) and the optimizer's apply
function (fused kernels). Off, each is absent from the step, not an `if` inside it.
"""

import keras
import tensorflow as tf

from engine.float8 import NoFloat8


def cross_entropy(labels, logits):
    """Each example's float32 cross-entropy: the default `loss_fn`."""
    return keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)


def optimizer_apply(optimizer, grads, variables):
    """The default `apply_gradients`: Keras' own update."""
    optimizer.apply(grads, variables)


def sum_over_replicas(grads):
    """Stage 4's all-reduce: the gradients summed over replicas (as they are for one)."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return grads
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)


def check_finite(grads):
    """Stage 5: (finite, global norm, finite per tensor) of the summed unscaled gradients.

    `finite` is one bool scalar for the whole step. Per tensor: False where its
    sum of squares is not finite (an inf or a nan, or values beyond ~1e19).
    """
    # One pass over the gradients: half the sum of squares of each tensor (one
    # fused `L2Loss` kernel apiece), which the norm needs anyway. Any inf or nan
    # makes its tensor's sum, and the total, inf or nan, so a finite total proves
    # every gradient finite. A total that is not finite can also come from large
    # but finite gradients overflowing float32, so only then is every element
    # checked, in one reduction over all of them: a huge but finite step is applied.
    half_squares = tf.stack([tf.nn.l2_loss(g) for g in grads])
    total = tf.reduce_sum(half_squares)
    finite = tf.cond(
        tf.math.is_finite(total),
        lambda: tf.constant(True),
        lambda: tf.reduce_all(
            tf.math.is_finite(tf.concat([tf.reshape(g, [-1]) for g in grads], 0))
        ),
    )
    return finite, tf.sqrt(2.0 * total), tf.math.is_finite(half_squares)


def clip(grads, grad_norm, finite, clip_norm):
    """Stage 6: `grads` clipped to global norm `clip_norm` (0: as they are); (grads, finite).

    Clipped unscaled, so the threshold does not depend on the loss scale.
    """
    if not clip_norm:
        return grads, finite
    # Clipping by an infinite norm gives nan (`tf.clip_by_global_norm` says so
    # on purpose): a step whose norm overflows float32 is skipped instead.
    finite = finite & tf.math.is_finite(grad_norm)
    return tf.clip_by_global_norm(grads, clip_norm, use_norm=grad_norm)[0], finite


class TrainStep:
    """One training step: `step(images, labels)` on one replica.

    Args:
      model: a built Keras model producing float32 logits.
      optimizer: a built Keras optimizer over `model.trainable_variables`.
      loss_scale: a `NoOpLossScale`, `StaticLossScale` or `DynamicLossScale`.
      global_batch_size: examples per step over all replicas and micro-batches;
        each example's loss is divided by it, so summed gradients are the
        gradient of the global mean.
      clip_norm: clip the unscaled gradients to this global norm; 0 disables.
      loss_fn: `(labels, logits) -> float32 loss per example`.
      apply_gradients: `(optimizer, grads, variables)`, stage 7's update on one
        replica; default Keras' `optimizer.apply` (the engine passes TF's fused
        kernels, `extras.fused_update`). Several replicas always use Keras'
        `optimizer.apply`, which sums over replicas (`cross_replica_update`).
      scaled_gradients_hook: optional `(scaled_grads, variables) -> scaled_grads`,
        between stages 3 and 4 (fault injection reads the step number from the
        run's step counter itself).
      observers: `(unscaled_grads, loss_scale) -> {name: tensor}` functions whose
        results join the step's outputs (measured before the scale updates).
      micro_batches: optional `(gradients, images, labels) -> (grads, loss,
        correct)` that runs stages 1-4 (`gradients`) once per micro-batch.
      float8: the recipe of the model's float8 matmuls (`engine.float8`), committed
        at stage 8; default `NoFloat8`, which does nothing.

    Every call returns a dict with `loss` (this replica's share of the mean
    loss), `correct` (int32 count), `finite` (bool), `grad_norm` (unscaled,
    before clipping), `finite_per_variable` (bool per trainable variable) and
    whatever the observers add.
    """

    def __init__(
        self,
        model,
        optimizer,
        loss_scale,
        global_batch_size,
        clip_norm=0.0,
        loss_fn=cross_entropy,
        apply_gradients=None,
        scaled_gradients_hook=None,
        observers=(),
        micro_batches=None,
        float8=None,
    ):
        self.model, self.optimizer, self.loss_scale = model, optimizer, loss_scale
        self.global_batch_size = global_batch_size
        self.clip_norm = clip_norm
        self.per_example_loss = loss_fn
        self.apply_gradients = apply_gradients or optimizer_apply
        self.scaled_gradients_hook = scaled_gradients_hook or (lambda grads, variables: grads)
        self.observers = tuple(observers)
        self.micro_batches = micro_batches
        self.float8 = float8 or NoFloat8()
        self.trainable = model.trainable_variables
        # BatchNorm moving statistics are written by the forward pass itself, so a
        # skipped step must put them back (a nan batch would otherwise poison them).
        self.stateful = model.non_trainable_variables

    def __call__(self, images, labels):
        """Stages 1-8 on one replica, in the order of the module docstring."""
        saved_state = self._save_state()  # what the forward pass writes: put back on a skip
        grads, loss, correct = self._compute_gradients(images, labels)  # 1-4, see `gradients`
        out = self._observe(grads, loss, correct)  # this replica's unscaled gradients
        grads = sum_over_replicas(grads)  # 4
        finite, grad_norm, tensor_finite = check_finite(grads)  # 5
        grads, finite = clip(grads, grad_norm, finite, self.clip_norm)  # 6
        tf.cond(  # 7
            finite,
            lambda: self.apply_gradients(self.optimizer, grads, self.trainable),
            lambda: self._restore(saved_state),
        )
        self.loss_scale.update(finite)  # 8
        self.float8.commit(finite)  # 8
        # Which gradients held an inf or a nan: all True when the step is applied.
        return out | dict(
            finite=finite, grad_norm=grad_norm, finite_per_variable=tensor_finite | finite
        )

    def gradients(self, images, labels):
        """Stages 1-4 for one (micro-)batch: (unscaled float32 gradients, loss share, correct)."""
        with tf.GradientTape() as tape:
            logits = self.model(images, training=True)  # 1
            per_example = self.per_example_loss(labels, logits)  # 1: float32
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=self.global_batch_size)
            scaled_loss = self.loss_scale.scale(loss)  # 2
        scaled_grads = tape.gradient(scaled_loss, self.trainable)  # 3
        scaled_grads = self.scaled_gradients_hook(scaled_grads, self.trainable)
        correct = tf.reduce_sum(
            tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.int32)
        )
        return self.loss_scale.unscale(scaled_grads), loss, correct  # 4: float32, unscaled

    # --- several replicas: stages 1-6 in each replica, 7-8 once, across them ---

    def compute(self, images, labels):
        """Stages 1-4 in one replica, without the all-reduce (what XLA compiles there)."""
        saved_state = self._save_state()
        grads, loss, correct = self._compute_gradients(images, labels)
        return self._observe(grads, loss, correct) | dict(grads=grads, saved_state=saved_state)

    def replica_step(self, images, labels, compute=None):
        """Stages 1-6 in one replica; `compute` replaces `self.compute` (an XLA-compiled copy).

        The dict also holds `grads` (summed, clipped) and `saved_state` for stage 7.
        """
        out = (compute or self.compute)(images, labels)  # 1-4
        self._average_state_over_replicas()
        grads = sum_over_replicas(out["grads"])  # 4
        finite, grad_norm, tensor_finite = check_finite(grads)  # 5
        grads, finite = clip(grads, grad_norm, finite, self.clip_norm)  # 6
        return out | dict(
            grads=grads,
            finite=finite,
            grad_norm=grad_norm,
            finite_per_variable=tensor_finite | finite,
        )

    def cross_replica_update(self, strategy, out):
        """Stages 7-8 for several replicas, in cross-replica context."""
        # All replicas hold the same summed gradients and the same flag.
        finite = strategy.experimental_local_results(out["finite"])[0]

        def apply_update(grads):
            # Keras' optimizer sums gradients over replicas itself. The gradients
            # here are already that sum, so replica 0 passes them and the others
            # pass zeros: Keras' sum then reproduces them exactly (x + 0 == x)
            # and the update applied is exactly the one that was checked.
            ctx = tf.distribute.get_replica_context()
            first = tf.equal(ctx.replica_id_in_sync_group, 0)
            self.optimizer.apply(
                [tf.where(first, g, tf.zeros_like(g)) for g in grads], self.trainable
            )

        tf.cond(  # 7
            finite,
            lambda: strategy.extended.call_for_each_replica(apply_update, (out["grads"],)),
            lambda: strategy.extended.call_for_each_replica(self._restore, (out["saved_state"],)),
        )
        self.loss_scale.update(finite)  # 8
        self.float8.commit(finite)  # 8

    # --- helpers ---

    def _compute_gradients(self, images, labels):
        if self.micro_batches is None:
            return self.gradients(images, labels)
        return self.micro_batches(self.gradients, images, labels)

    def _observe(self, grads, loss, correct):
        out = {"loss": loss, "correct": correct}
        for observe in self.observers:
            out.update(observe(grads, self.loss_scale.value))
        return out

    def _save_state(self):
        return [tf.identity(v.value) for v in self.stateful]

    def _average_state_over_replicas(self):
        # Keras 3 keeps BatchNorm moving statistics per replica (aggregation
        # "none"): each replica would update them from its own batch, replicas
        # would drift apart and a checkpoint would hold replica 0's alone. One
        # small all-reduce keeps them identical everywhere.
        ctx = tf.distribute.get_replica_context()
        if not self.stateful or ctx is None or ctx.num_replicas_in_sync == 1:
            return
        local = [tf.identity(v.value) for v in self.stateful]
        averaged = ctx.all_reduce(tf.distribute.ReduceOp.MEAN, local)
        for var, value in zip(self.stateful, averaged, strict=True):
            var.assign(value)

    def _restore(self, saved_state):
        for var, value in zip(self.stateful, saved_state, strict=True):
            var.assign(value)


def create_eval_step(model):
    """Returns `eval_step(images, labels) -> {loss_sum, correct, count}` for one replica."""

    def eval_step(images, labels):
        logits = model(images, training=False)
        per_example = cross_entropy(labels, logits)
        predictions = tf.argmax(logits, -1, output_type=tf.int32)
        return {
            "loss_sum": tf.reduce_sum(per_example),
            "correct": tf.reduce_sum(tf.cast(tf.equal(predictions, labels), tf.int32)),
            "count": tf.size(labels),
        }

    return eval_step
