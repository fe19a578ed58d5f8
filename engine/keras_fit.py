"""`model.fit` with the engine's loss scaling: a Keras model whose `train_step` is the engine's.

A Keras user keeps `compile` and `fit`:

    model = LossScaledModel(inputs, outputs)          # or LossScaledModel(m.inputs, m.outputs)
    model.compile(optimizer, loss, metrics=[...])     # float16 layers: a dynamic scale
    model.fit(data, epochs=...)                       # logs carry loss_scale, skipped_steps

Why a model: overriding `Model.train_step` is Keras' documented way to change what
`fit` does ("Customizing what happens in fit()"), and it keeps everything else
Keras' own: compile's loss and metrics, callbacks, the progress bar, `evaluate`,
`predict`, saving. A subclassed model mixes `LossScaling` in instead
(`class Net(LossScaling, keras.Model)`). An optimizer wrapper, Keras' own route
(`LossScaleOptimizer`), cannot do the engine's step: it is called after the
forward pass has written the BatchNorm statistics, and under a strategy it
decides inside one replica, on that replica's gradients.

The step, in the engine's order (engine/step.py):
  1-4, in each replica: snapshot the state the forward pass writes, forward,
      compile's loss plus `model.losses` (`compute_loss`), scale, gradients,
      cast to float32 and unscale;
  then average the BatchNorm statistics over replicas, sum the gradients over
      replicas and take ONE finiteness flag on the sums (`check_finite`);
  7-8, once: apply or skip (putting the snapshot back), update the scale, count
      a skip. Under a mirrored strategy this runs in cross-replica context
      (`merge_call`), where a `tf.cond` around the optimizer is allowed.
XLA: on one device `compile(jit_compile=True)` compiles the whole step, as Keras
does. Under a mirrored strategy Keras would hand XLA `strategy.run` whole,
`merge_call` included, which it cannot compile (keras-team/keras#21366): there
`jit_compile=True` compiles each replica's stages 1-4 and the rest runs outside,
as in the engine's loop.
State: the scale, its good-step counter and the skipped-step count are
`tf.Variable`s on the model: `tf.train.Checkpoint` tracks them as attributes,
and `save_own_variables` puts them in `.keras` and `.weights.h5` files.
"""

import warnings

import keras
import tensorflow as tf

from engine import precision
from engine.loss_scale import create_loss_scale
from engine.step import check_finite, sum_over_replicas


def _replicated(strategy):
    # The engine's rule (engine.distribute.replicated): mirrored variables are
    # updated through `merge_call`, whatever the replica count.
    mirrored = (tf.distribute.MirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy)
    return isinstance(strategy, mirrored)


def _compute_dtypes(model):
    for layer in getattr(model, "layers", ()):
        yield layer.dtype_policy.compute_dtype
        yield from _compute_dtypes(layer)


def _policy_of(model):
    """The engine's precision policy for what the model's layers compute in."""
    # The layers, not the model's own policy: a model built outside the policy
    # that built its layers, or loaded from a file, has the default policy.
    dtypes = set(_compute_dtypes(model))
    if "float16" in dtypes:
        return precision.get_policy("mixed")
    return precision.get_policy("mixed_bf16" if "bfloat16" in dtypes else "fp32")


def _create_loss_scale(policy, spec):
    """`spec` as `create_loss_scale` reads it: "dynamic", a static number, or settings."""
    if isinstance(spec, dict):
        try:
            return create_loss_scale(policy, "dynamic", **spec)
        except TypeError as e:
            raise ValueError(
                f"loss_scale={spec!r}: a dict holds DynamicLossScale settings "
                "(initial_scale, growth_interval, growth_factor, backoff_factor, "
                f"min_scale, max_scale): {e}"
            ) from None
    if spec != "dynamic" and isinstance(spec, str):
        raise ValueError(f'loss_scale={spec!r}: use "dynamic", a positive number or a dict')
    return create_loss_scale(policy, spec)


class LossScaling:
    """Mixin for a `keras.Model`: `fit` runs the engine's loss-scaled step.

    `compile(..., loss_scale="dynamic")` takes Keras' arguments plus the scale:
    "dynamic", a positive number (a static scale) or a dict of `DynamicLossScale`
    settings. Whether the loss is scaled at all follows what the layers compute
    in, as the engine's precision policies decide: float16 (`mixed_float16`)
    scales, float32 and bfloat16 do not. Every precision skips a step whose
    gradients are not finite.

    Attributes (after `compile`): `loss_scale`, the engine's loss-scale object;
    `skipped_steps`, an int64 `tf.Variable` counting skipped steps.
    """

    def compile(self, optimizer="rmsprop", loss=None, *, loss_scale="dynamic", **kwargs):
        """Keras' `compile`, plus `loss_scale`; the optimizer must not scale itself."""
        if kwargs.pop("auto_scale_loss", False):
            raise ValueError("drop auto_scale_loss: this model scales the loss itself")
        super().compile(optimizer, loss, auto_scale_loss=False, **kwargs)
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            raise ValueError(
                "pass the inner optimizer, not a LossScaleOptimizer: this model scales "
                "the loss itself (compile(loss_scale=...))"
            )
        if self.optimizer.loss_scale_factor is not None:
            raise ValueError(
                "unset the optimizer's loss_scale_factor; for a static scale use "
                "compile(loss_scale=<number>)"
            )
        if getattr(self, "_loss_scale_spec", None) != loss_scale:
            # A recompile with the same scale (e.g. to unfreeze layers) keeps its state.
            with self.distribute_strategy.scope():
                self.loss_scale = _create_loss_scale(_policy_of(self), loss_scale)
                self.skipped_steps = tf.Variable(
                    0, dtype=tf.int64, trainable=False, name="skipped_steps"
                )
            self._loss_scale_spec = loss_scale

    def train_step(self, data):
        """The engine's step on one batch; logs add `loss_scale` and `skipped_steps`."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        forward_backward = self._forward_backward
        if getattr(self, "_xla_per_replica", False):
            # No collective inside, so XLA can compile it (see make_train_function).
            forward_backward = tf.function(forward_backward, jit_compile=True, autograph=False)
        y_pred, loss, grads, saved_state = forward_backward(x, y, sample_weight)
        self._average_statistics_over_replicas()
        grads = sum_over_replicas(grads)
        finite, grad_norm, _ = check_finite(grads)
        if self.optimizer.global_clipnorm or self.optimizer.clipnorm:
            # Clipping by an infinite norm gives nan: such a step is skipped, as
            # the engine's own clipping does.
            finite = finite & tf.math.is_finite(grad_norm)
        ctx = tf.distribute.get_replica_context()
        if _replicated(self.distribute_strategy):
            ctx.merge_call(self._update_all_replicas, args=(grads, finite, saved_state))
        else:
            self._apply_or_skip(
                finite, lambda: self._apply(grads), lambda: self._restore(saved_state)
            )
        # Keras' own bookkeeping, as its train_step does it: the loss is this
        # replica's share of the mean, so the tracker is given the mean.
        replicas = tf.cast(ctx.num_replicas_in_sync, loss.dtype)
        batch_size = tf.shape(tf.nest.flatten(x)[0])[0]
        self._loss_tracker.update_state(loss * replicas, sample_weight=batch_size)
        logs = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        logs.update(loss_scale=self.loss_scale.value, skipped_steps=self.skipped_steps.value())
        return logs

    def _forward_backward(self, x, y, sample_weight):
        """Stages 1-4 on one replica: (y_pred, loss, unscaled float32 grads, snapshot)."""
        # The forward pass writes the BatchNorm moving statistics: a skip puts them back.
        saved_state = [tf.identity(v.value) for v in self.non_trainable_variables]
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
            )
            scaled_loss = self.loss_scale.scale(loss)
        scaled_grads = tape.gradient(scaled_loss, self.trainable_variables)
        return y_pred, loss, self.loss_scale.unscale(scaled_grads), saved_state

    def _average_statistics_over_replicas(self):
        # Keras 3 keeps BatchNorm moving statistics per replica (aggregation
        # "none"): averaged every step, replicas agree and a save holds all of
        # them, as in the engine (TrainStep._average_state_over_replicas).
        ctx = tf.distribute.get_replica_context()
        weights = self.non_trainable_weights  # without seeds: those stay per replica
        if not weights or ctx.num_replicas_in_sync == 1:
            return
        averaged = ctx.all_reduce(
            tf.distribute.ReduceOp.MEAN, [tf.identity(v.value) for v in weights]
        )
        for variable, value in zip(weights, averaged, strict=True):
            variable.assign(value)

    def _apply(self, grads):
        self.optimizer.apply(grads, self.trainable_variables)

    def _restore(self, saved_state):
        for variable, value in zip(self.non_trainable_variables, saved_state, strict=True):
            variable.assign(value)

    def _apply_or_skip(self, finite, apply, skip):
        """Stages 7-8, once per step: apply or skip, update the scale, count a skip."""
        tf.cond(finite, apply, skip)
        self.loss_scale.update(finite)
        self.skipped_steps.assign_add(tf.cast(tf.logical_not(finite), tf.int64))

    def _update_all_replicas(self, strategy, grads, finite, saved_state):
        """Stages 7-8 in cross-replica context: every replica applies, or every one skips."""
        # All replicas hold the same summed gradients, so the same flag.
        finite = strategy.experimental_local_results(finite)[0]

        def apply(grads):
            # Keras' optimizer sums the gradients over replicas again: replica 0
            # passes the sums and the others zeros, so the sum it applies is
            # exactly the one checked (x + 0 == x).
            first = tf.equal(tf.distribute.get_replica_context().replica_id_in_sync_group, 0)
            self._apply([tf.where(first, g, tf.zeros_like(g)) for g in grads])

        self._apply_or_skip(
            finite,
            lambda: strategy.extended.call_for_each_replica(apply, (grads,)),
            lambda: strategy.extended.call_for_each_replica(self._restore, (saved_state,)),
        )

    def make_train_function(self, force=False):
        """Keras' train function; under a mirrored strategy XLA compiles per replica."""
        self._xla_per_replica = bool(self.jit_compile) and _replicated(self.distribute_strategy)
        return self._without_xla_around_replicas(super().make_train_function, force)

    def make_test_function(self, force=False):
        """Keras' own; under a mirrored strategy, not compiled around the replicas."""
        return self._without_xla_around_replicas(super().make_test_function, force)

    def make_predict_function(self, force=False):
        """Keras' own; under a mirrored strategy, not compiled around the replicas."""
        return self._without_xla_around_replicas(super().make_predict_function, force)

    def _without_xla_around_replicas(self, make_function, force):
        if not (self.jit_compile and _replicated(self.distribute_strategy)):
            return make_function(force)
        # Keras would compile `strategy.run(step)` whole: merge_call included
        # (keras-team/keras#21366), and with every replica's variables, which
        # XLA cannot reach from one device ("Trying to access resource ...
        # located in device CPU:1 from device CPU:0", even for evaluate). So
        # the function is built uncompiled; train_step compiles each replica's
        # forward and backward pass itself.
        self.jit_compile = False
        try:
            return make_function(force)
        finally:
            self.jit_compile = True

    def get_compile_config(self):
        """Keras' compile config, plus the `loss_scale` argument."""
        config = super().get_compile_config()
        if config:
            config["loss_scale"] = self._loss_scale_spec
        return config

    def compile_from_config(self, config):
        """Compiles from `get_compile_config()` when a saved model is loaded."""
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def _scaling_state(self):
        """{key in a saved file: variable}; empty before `compile`."""
        if not hasattr(self, "loss_scale"):
            return {}
        named = {"skipped_steps": self.skipped_steps}
        for variable in self.loss_scale.variables:  # "scale", "good_steps"
            named["loss_scale." + variable.name.split(":")[0]] = variable
        return named

    def save_own_variables(self, store):
        """Keras' saving hook: the model's own variables, plus the scaling state."""
        super().save_own_variables(store)
        for key, variable in self._scaling_state().items():
            store[key] = variable.numpy()

    def load_own_variables(self, store):
        """Keras' loading hook; a file without scaling state leaves it as it is."""
        keys = list(store.keys())
        saved_state = [k for k in keys if k == "skipped_steps" or k.startswith("loss_scale.")]
        super().load_own_variables({k: store[k] for k in keys if k not in saved_state})
        state = self._scaling_state()
        if saved_state and not state:
            warnings.warn(
                "the file's loss-scale state was not loaded: compile the model before "
                "load_weights to restore it",
                stacklevel=2,
            )
        for key, variable in state.items():
            if key in keys:
                variable.assign(store[key])


@keras.saving.register_keras_serializable(package="engine")
class LossScaledModel(LossScaling, keras.Model):
    """A functional `keras.Model` trained by `fit` with the engine's loss scaling.

    Build it as a functional model (`LossScaledModel(inputs, outputs)`); an
    existing functional or Sequential model's layers are reused, weights and
    all, by `LossScaledModel(model.inputs, model.outputs)`.
    """


def compile_for_fit(model, optimizer, loss, metrics=None, loss_scale="dynamic", **kwargs):
    """`model`'s layers as a compiled `LossScaledModel`: the benchmark's `fit` peer.

    Args:
      model: a built functional or Sequential model (its layers and weights are shared).
      optimizer, loss, metrics, **kwargs: as `keras.Model.compile`.
      loss_scale: "dynamic", a positive number, or `DynamicLossScale` settings.

    Raises:
      ValueError: a subclassed model (no graph to reuse).
    """
    if not isinstance(model, LossScaling):
        try:
            inputs, outputs = model.inputs, model.outputs
        except (AttributeError, ValueError):
            inputs = outputs = None
        if not inputs:
            raise ValueError(
                f"{type(model).__name__} is not a built functional or Sequential model; "
                "for a subclassed model, inherit from engine.keras_fit.LossScaling too"
            )
        model = LossScaledModel(inputs, outputs, name=model.name)
    model.compile(optimizer, loss, metrics=metrics, loss_scale=loss_scale, **kwargs)
    return model
