"""`--inject_nonfinite`: a testing hook that puts nan into chosen steps' gradients."""

import tensorflow as tf

from engine.config import ConfigError


def inject_nonfinite(grads, variables, step, spec):
    """Nan gradients at the steps `spec` names, decided in the graph.

    Done on the scaled gradients, so the rest of the step sees exactly what a
    real float16 overflow would give it.

    Args:
      grads: one gradient per variable.
      variables: the variables, matched by their `path` (Keras 3) against the substring.
      step: int64 scalar, the number this step will have once done (the first is 1).
      spec: `validation.parse_inject_nonfinite`'s result: (ranges, substring).

    Raises:
      ConfigError: no variable's path contains the substring.
    """
    ranges, substring = spec
    names = check_matches(spec, variables)
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


def check_matches(spec, variables):
    """The variables' paths; ConfigError if none contains the substring `spec` names."""
    substring = spec[1]
    names = [getattr(v, "path", v.name) for v in variables]
    if not any(substring in n for n in names):
        raise ConfigError(
            f"--inject_nonfinite: no trainable variable's path contains {substring!r}; "
            f"some paths: {', '.join(names[:4])}"
        )
    return names


def create_hook(spec, variables, step_counter):
    """A `TrainStep(scaled_gradients_hook=)` injecting nan as `spec` says.

    `step_counter` is the run's global step variable (`TrainState.step`): the
    step being taken is the one after it. Checked against `variables` (the
    trainable ones) now: found at the first step's trace, the mistake would
    come after the run has started writing.
    """
    check_matches(spec, variables)
    return lambda grads, variables: inject_nonfinite(grads, variables, step_counter + 1, spec)
