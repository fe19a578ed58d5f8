"""Shared test setup: quiet TensorFlow, and small helpers for the engine's tests."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def read_scalars(logdir):
    """{tag: [(step, value), ...]} from the TF2 summary event files under `logdir`."""
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["tensors"]:
        events = acc.Tensors(tag)
        proto = events[0].tensor_proto if events else None
        # Scalars only: text (DT_STRING = 7), histograms and images have a shape.
        if proto is not None and proto.dtype != 7 and not proto.tensor_shape.dim:
            out[tag] = [(e.step, float(tf_make_ndarray(e.tensor_proto))) for e in events]
    return out


def read_texts(logdir):
    """{tag: [(step, text), ...]} of the text summaries under `logdir`."""
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["tensors"]:
        events = acc.Tensors(tag)
        proto = events[0].tensor_proto if events else None
        # Text is a scalar string; images are strings too, but a vector of them.
        if proto is not None and proto.dtype == 7 and not proto.tensor_shape.dim:
            out[tag] = [(e.step, tf_make_ndarray(e.tensor_proto).item().decode()) for e in events]
    return out


def tf_make_ndarray(proto):
    import tensorflow as tf

    return tf.make_ndarray(proto)


def tiny_config(**overrides):
    """A config that trains the tiny model for a few steps on small generated data."""
    from engine.config import Config

    base = dict(
        model="tiny",
        image_size=16,
        batch_size=16,
        train_steps=4,
        steps_per_loop=2,
        train_examples=128,
        eval_examples=64,
        eval_batch_size=32,
        warmup_steps=0,
        precision="fp32",
    )
    base.update(overrides)
    return Config(**base)
