"""Loss scaling, by hand: the no-op, static and dynamic scales share one interface.

The training step calls, in this order and whatever the precision:

    scaled_loss = loss_scale.scale(loss)
    grads = unscale(d scaled_loss / d weights)      # float32, divided by the scale
    finite = no inf/nan in any gradient            # on all-reduced gradients
    apply the update only if finite
    loss_scale.update(finite)

so the step never branches on "is loss scaling on". All state is `tf.Variable`s on a
`tf.Module`, which makes it part of every checkpoint that tracks the object.
"""

import tensorflow as tf


class NoOpLossScale(tf.Module):
    """The scale for float32 and bfloat16: multiplies by one and never changes.

    The step still skips a non-finite update in every precision; `update(finite)`
    ignores its argument here.
    """

    def __init__(self, name="loss_scale"):
        super().__init__(name=name)

    @property
    def value(self):
        """The current scale as a float32 scalar tensor."""
        return tf.constant(1.0, tf.float32)

    def scale(self, loss):
        return loss

    def unscale(self, grads):
        return [None if g is None else tf.cast(g, tf.float32) for g in grads]

    def update(self, finite):
        del finite


class StaticLossScale(NoOpLossScale):
    """A fixed scale (`--loss_scale=1024`): multiplies the loss, divides the grads."""

    def __init__(self, scale, name="loss_scale"):
        super().__init__(name=name)
        if not scale > 0 or scale == float("inf"):
            raise ValueError(f"a static loss scale must be positive and finite, got {scale}")
        self._scale = tf.Variable(float(scale), trainable=False, dtype=tf.float32, name="scale")

    @property
    def value(self):
        return tf.convert_to_tensor(self._scale)

    def scale(self, loss):
        return loss * tf.cast(self._scale, loss.dtype)

    def unscale(self, grads):
        # Multiply by the reciprocal, computed once in float32: exact for a
        # power-of-two scale (the dynamic scale always is when it starts as one),
        # and dividing every gradient instead made ResNet50's XLA step ~20% slower
        # on a CPU (BUILD_NOTES.md).
        inverse = 1.0 / self._scale
        return [None if g is None else tf.cast(g, tf.float32) * inverse for g in grads]


class DynamicLossScale(StaticLossScale):
    """The dynamic loss scale of Micikevicius et al. (2018), with bounds.

    State: `scale` (float32) and `good_steps` (int64, finite steps since the last change).

        on a finite step:      good_steps += 1
                               if good_steps == growth_interval:
                                   scale = min(scale * growth_factor, max_scale)
                                   good_steps = 0
        on a non-finite step:  scale = max(scale * backoff_factor, min_scale)
                               good_steps = 0
                               (the caller skips the update)

    `max_scale` keeps the scale finite: an unbounded doubling reaches inf after
    enough quiet steps, and an inf scale turns every gradient into nan. `min_scale`
    stops a run of bad steps from driving the scale to zero, which would silently
    zero every gradient; the divergence guard, not the scale, decides to stop.
    The update is branch-free (`tf.where`), so it costs a few scalar ops in the graph
    and never a host round trip.
    """

    def __init__(
        self,
        initial_scale=2.0**15,
        growth_interval=2000,
        growth_factor=2.0,
        backoff_factor=0.5,
        min_scale=1.0,
        max_scale=2.0**24,
        name="loss_scale",
    ):
        if not 0 < min_scale <= initial_scale <= max_scale < float("inf"):
            raise ValueError(
                "loss scale bounds must satisfy 0 < min_scale <= initial_scale <= "
                f"max_scale < inf, got {min_scale}, {initial_scale}, {max_scale}"
            )
        if growth_interval < 1 or growth_factor <= 1 or not 0 < backoff_factor < 1:
            raise ValueError(
                "need growth_interval >= 1, growth_factor > 1 and 0 < backoff_factor < 1, "
                f"got {growth_interval}, {growth_factor}, {backoff_factor}"
            )
        super().__init__(initial_scale, name=name)
        self.growth_interval = int(growth_interval)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.min_scale = float(min_scale)
        self.max_scale = float(max_scale)
        self.good_steps = tf.Variable(0, trainable=False, dtype=tf.int64, name="good_steps")

    def update(self, finite):
        good_steps = tf.where(finite, self.good_steps + 1, tf.zeros_like(self.good_steps))
        grow = good_steps >= self.growth_interval
        factor = tf.where(
            finite,
            tf.where(grow, self.growth_factor, 1.0),
            self.backoff_factor,
        )
        new_scale = tf.clip_by_value(self._scale * factor, self.min_scale, self.max_scale)
        self._scale.assign(new_scale)
        self.good_steps.assign(tf.where(grow, tf.zeros_like(good_steps), good_steps))


def create_loss_scale(policy, loss_scale="dynamic", **dynamic_kwargs):
    """Returns the scale object for a precision policy.

    Args:
      policy: an `engine.precision.Policy`.
      loss_scale: "dynamic" or a positive number (a static scale); ignored when
        the policy needs no scaling.
      **dynamic_kwargs: `DynamicLossScale` settings (initial_scale, growth_interval, ...).
    """
    if not policy.loss_scaling:
        return NoOpLossScale()
    if loss_scale == "dynamic":
        return DynamicLossScale(**dynamic_kwargs)
    return StaticLossScale(float(loss_scale))
