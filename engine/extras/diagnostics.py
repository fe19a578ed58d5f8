"""What the graph records for the host to read once per summary: why steps were skipped.

The inner loop runs many steps per `tf.function` call and never syncs with the
host, so anything the host wants to know about an individual step is written
into variables here and read back when the outer loop writes summaries:

  * `StepMonitor.record` keeps the global step and the per-variable finiteness
    flags of the last `capacity` non-finite steps in a ring buffer (only a
    non-finite step writes, inside a `tf.cond`), plus their count;
  * with `--precision_diagnostics`, sums of the float16 underflow and overflow
    fractions (`float16_range_fractions`) over the steps since the last read.
"""

import collections

import tensorflow as tf

Readout = collections.namedtuple("Readout", ["events", "dropped", "scalars"])
Readout.__doc__ = """What `StepMonitor.read_and_reset` returns.

  events: [(global step, [names of the variables with a non-finite gradient])],
    oldest first, at most `capacity` of them.
  dropped: non-finite steps since the last read beyond the last `capacity`.
  scalars: {tag: value} of the precision diagnostics (empty when off).
"""


def float16_range_fractions(grads, scale):
    """Fractions of gradient values float16 cannot hold, without and with `scale`.

    Measured by casting (round to nearest even, as the hardware does), so the
    thresholds are float16's own:

      underflow: a nonzero unscaled value that becomes 0 in float16, i.e.
                 0 < |g| <= 2**-25 (half the smallest subnormal, 2**-24): what
                 float16 gradients would lose without loss scaling.
      overflow:  `g * scale` is not finite in float16, i.e. |g * scale| >= 65520
                 (65504 is the largest float16; above 65519.99 rounds to inf),
                 or g itself is inf or nan: what the current scale pushes out
                 of range.

    Args:
      grads: unscaled float32 gradients.
      scale: the loss scale these gradients were computed with.

    Returns:
      {"underflow_fraction": float32 scalar, "overflow_fraction": float32 scalar},
      over all gradient values together.
    """
    values = tf.concat([tf.reshape(g, [-1]) for g in grads], axis=0)
    underflow = tf.logical_and(
        tf.not_equal(values, 0.0), tf.equal(tf.cast(values, tf.float16), 0.0)
    )
    overflow = tf.logical_not(tf.math.is_finite(tf.cast(values * scale, tf.float16)))
    total = tf.cast(tf.size(values), tf.float32)
    return {
        "underflow_fraction": tf.reduce_sum(tf.cast(underflow, tf.float32)) / total,
        "overflow_fraction": tf.reduce_sum(tf.cast(overflow, tf.float32)) / total,
    }


class StepMonitor(tf.Module):
    """Graph-side record of non-finite steps (and, optionally, float16 range).

    Not checkpointed: it only carries values from the inner loop to the host.
    """

    def __init__(self, variable_names, capacity=64, precision_diagnostics=False):
        super().__init__(name="step_monitor")
        self.variable_names = list(variable_names)
        self.capacity = int(capacity)
        self.precision_diagnostics = precision_diagnostics
        self.count = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.steps = tf.Variable(tf.zeros([capacity], tf.int64), trainable=False)
        self.finite_per_variable = tf.Variable(
            tf.ones([capacity, len(self.variable_names)], tf.bool), trainable=False
        )
        if precision_diagnostics:
            self.underflow = tf.Variable(0.0, trainable=False)
            self.overflow = tf.Variable(0.0, trainable=False)
            self.measured_steps = tf.Variable(0, dtype=tf.int64, trainable=False)

    def record(self, step, out):
        """In the graph, after each step: `out` is the step's dict (one replica's values)."""

        def remember_nonfinite_step():
            slot = tf.reshape(tf.math.floormod(self.count, self.capacity), [1, 1])
            self.steps.assign(tf.tensor_scatter_nd_update(self.steps, slot, [step]))
            self.finite_per_variable.assign(
                tf.tensor_scatter_nd_update(
                    self.finite_per_variable, slot, [out["finite_per_variable"]]
                )
            )
            self.count.assign_add(1)

        tf.cond(out["finite"], lambda: None, remember_nonfinite_step)
        if self.precision_diagnostics:
            self.underflow.assign_add(out["underflow_fraction"])
            self.overflow.assign_add(out["overflow_fraction"])
            self.measured_steps.assign_add(1)

    def read_and_reset(self):
        """On the host, once per summary: returns a `Readout` and starts over."""
        count = int(self.count.numpy())
        kept = min(count, self.capacity)
        steps = self.steps.numpy()
        flags = self.finite_per_variable.numpy()
        events = []
        for i in range(count - kept, count):
            slot = i % self.capacity
            bad = [n for n, ok in zip(self.variable_names, flags[slot], strict=True) if not ok]
            events.append((int(steps[slot]), bad))
        self.count.assign(0)
        scalars = {}
        if self.precision_diagnostics:
            measured = max(int(self.measured_steps.numpy()), 1)
            scalars = {
                "train/fp16_underflow_fraction": float(self.underflow.numpy()) / measured,
                "train/fp16_overflow_fraction": float(self.overflow.numpy()) / measured,
            }
            for var in (self.underflow, self.overflow, self.measured_steps):
                var.assign(tf.zeros_like(var))
        return Readout(events, count - kept, scalars)


def create_gradient_probe(train_step):
    """Returns `probe(images, labels) -> unscaled float32 gradients`, changing nothing.

    For the gradient histograms (`--histogram_every`): the training step keeps
    its gradients inside the graph, so the host recomputes them on a fixed batch
    at the current weights and scale, with the step's own loss (class weights
    included) averaged over that batch. BatchNorm statistics are put back, so
    the probe leaves training exactly as it found it.
    """
    model, loss_scale = train_step.model, train_step.loss_scale
    trainable = model.trainable_variables
    stateful = model.non_trainable_variables

    @tf.function
    def probe(images, labels):
        saved = [tf.identity(v.value) for v in stateful]
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            loss = tf.reduce_mean(train_step.per_example_loss(labels, logits))
            scaled_loss = loss_scale.scale(loss)
        grads = loss_scale.unscale(tape.gradient(scaled_loss, trainable))
        for var, value in zip(stateful, saved, strict=True):
            var.assign(value)
        return grads

    return probe
