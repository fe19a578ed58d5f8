"""What TensorBoard says about each chart: descriptions, and the mixed-precision layout.

Every scalar the engine writes carries a description (shown under the chart's
title): what it is and how to read it. The custom-scalars dashboard gets a
layout, written once per run, that puts the charts of mixed precision at work
(the loss scale, skips, the gradient norm, float16's range) side by side
instead of scattered among the others in alphabetical order; a float8 run adds
a "Float8" group (`engine.float8.LAYOUT`: scales, amaxes, clipped and underflowed
fractions per kind of tensor).
"""

import tensorflow as tf
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as layout_metadata

from engine import float8

DESCRIPTIONS = {
    "train/loss": "Mean training loss (float32) per step since the last write; with "
    "--class_weighting, the weighted loss.",
    "train/accuracy": "Share of training examples classified correctly since the last "
    "write (augmented images, BatchNorm on batch statistics).",
    "train/loss_scale": "The dynamic loss scale after the last step (--precision=mixed): "
    "halves on every skipped step, doubles after --growth_interval finite steps in a row, "
    "within --min_scale and --max_scale. A scale that keeps falling means overflowing "
    "gradients; 1 in fp32 and mixed_bf16, which need none.",
    "train/skipped_steps": "Steps skipped so far: a gradient held an inf or a nan, so the "
    "weights, optimizer state and BatchNorm statistics were left bit-identical.",
    "train/nonfinite_events": "1 at each skipped step; the text train/nonfinite_variables "
    "names the variables whose gradients held an inf or a nan.",
    "train/skip_rate": "Share of the steps since the last write that were skipped. A few "
    "at the start are the scale finding its level; a steady rate is a problem.",
    "train/grad_norm": "Global L2 norm of the unscaled float32 gradients before clipping, "
    "averaged over the steps applied since the last write.",
    "train/learning_rate": "The learning rate now. It follows applied updates: a skipped "
    "step does not advance warm-up or the schedule.",
    "train/examples_per_sec": "Training examples per second since the last write (the "
    "first step, with tracing and compilation, excluded).",
    "train/steps_per_sec": "Training steps per second since the last write.",
    "train/first_step_seconds": "Wall time of the first step alone: tracing, XLA "
    "compilation and the first batch.",
    "train/fp16_underflow_fraction": "--precision_diagnostics: share of the nonzero "
    "unscaled gradient values float16 would flush to zero without a loss scale "
    "(|g| <= 2**-25): what loss scaling rescues.",
    "train/fp16_overflow_fraction": "--precision_diagnostics: share of gradient values "
    "that overflow float16 once multiplied by the current scale. Counts the float32 "
    "head's gradients too, which never are float16: not always a skip.",
    "eval/loss": "Mean loss on the eval split, BatchNorm statistics recomputed first "
    "(--bn_recalibration_examples).",
    "eval/accuracy": "Accuracy on the eval split, BatchNorm statistics recomputed first "
    "(--bn_recalibration_examples).",
    "data/skipped_images": "Images left out because they could not be decoded "
    "(--skip_bad_images); written only when some were.",
    "final/eval_accuracy": "Eval accuracy at the end of training (the HParams metric).",
    "final/examples_per_sec": "Training examples per second over the run, first step excluded.",
    "final/skipped_steps": "Skipped steps over the whole run.",
    "final/train_seconds": "Time in the training loops, first step included; no eval, "
    "saves or export.",
    **float8.DESCRIPTIONS,
    **float8.BY_LAYER_DESCRIPTIONS,
}

# The custom-scalars dashboard: (category, [(chart title, [tag regexes])]).
LAYOUT = (
    (
        "Mixed precision",
        [
            ("Loss scale", [r"^train/loss_scale$"]),
            ("Skip rate", [r"^train/skip_rate$"]),
            ("Skipped steps", [r"^train/skipped_steps$"]),
            ("Non-finite steps", [r"^train/nonfinite_events$"]),
            ("Gradient norm (unscaled)", [r"^train/grad_norm$"]),
            ("float16 underflow and overflow", [r"^train/fp16_(underflow|overflow)_fraction$"]),
        ],
    ),
    (
        "Training",
        [
            ("Loss", [r"^(train|eval)/loss$"]),
            ("Accuracy", [r"^(train|eval)/accuracy$"]),
            ("Learning rate", [r"^train/learning_rate$"]),
            ("Examples per second", [r"^train/examples_per_sec$"]),
        ],
    ),
)


def layout(with_float8=False):
    """`LAYOUT` (and the Float8 group, `with_float8`) as the custom-scalars plugin's proto."""
    categories = (*LAYOUT, float8.LAYOUT) if with_float8 else LAYOUT
    return layout_pb2.Layout(
        category=[
            layout_pb2.Category(
                title=title,
                chart=[
                    layout_pb2.Chart(
                        title=chart, multiline=layout_pb2.MultilineChartContent(tag=tags)
                    )
                    for chart, tags in charts
                ],
            )
            for title, charts in categories
        ]
    )


def write_layout(with_float8=False):
    """Writes the layout with the default summary writer (once per run, at step 0)."""
    tf.summary.write(
        layout_metadata.CONFIG_SUMMARY_TAG,
        tf.constant(layout(with_float8).SerializeToString()),
        step=0,
        metadata=layout_metadata.create_summary_metadata(),
    )
