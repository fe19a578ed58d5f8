"""Mixed-precision training: `python main.py --precision=mixed --xla`.

Flags in, one validated `Config` out, one call into the engine. A user mistake
(bad flag, bad data) is one line on stderr and exit status 2, never a traceback.
"""

import os
import signal
import sys

from absl import app, flags

from engine import config as config_lib

C = config_lib.Config  # defaults live on the dataclass, not here

flags.DEFINE_enum(
    "mode",
    C.mode,
    config_lib.MODES,
    "train; predict (needs a trained --model_dir); compare; benchmark.",
)

flags.DEFINE_enum(
    "precision",
    C.precision,
    config_lib.PRECISIONS,
    "fp32; mixed = float16 compute + loss scaling; mixed_bf16 = bfloat16 compute.",
)
flags.DEFINE_bool("xla", C.xla, "Compile the training step with XLA (jit_compile=True).")
flags.DEFINE_enum("model", C.model, config_lib.MODELS, "Model architecture.")
flags.DEFINE_string(
    "dataset",
    C.dataset,
    "shapes (embedded, default), synthetic, tfds:NAME, folder:PATH or ships:PATH.",
)
flags.DEFINE_integer("image_size", C.image_size, "Input height and width in pixels.")
flags.DEFINE_integer("batch_size", C.batch_size, "Global training batch size.")
flags.DEFINE_integer("epochs", C.epochs, "Training epochs (ignored when --train_steps > 0).")
flags.DEFINE_integer("train_steps", C.train_steps, "Training steps; > 0 overrides --epochs.")
flags.DEFINE_enum("optimizer", C.optimizer, config_lib.OPTIMIZERS, "Optimizer.")
flags.DEFINE_float("learning_rate", C.learning_rate, "Peak learning rate.")
flags.DEFINE_enum(
    "lr_schedule",
    C.lr_schedule,
    config_lib.LR_SCHEDULES,
    "Learning-rate schedule (cosine includes --warmup_steps of linear warm-up).",
)
flags.DEFINE_integer(
    "warmup_steps", C.warmup_steps, "Linear warm-up steps for --lr_schedule=cosine."
)
flags.DEFINE_float("weight_decay", C.weight_decay, "Decoupled weight decay (0 = none).")
flags.DEFINE_string(
    "model_dir", C.model_dir, "Where summaries go; default runs/<timestamp>-<precision>[-xla]."
)
flags.DEFINE_integer(
    "steps_per_loop", C.steps_per_loop, "Steps per tf.function call (no host sync inside a loop)."
)
flags.DEFINE_string("loss_scale", C.loss_scale, "'dynamic' or a positive number (static scale).")
flags.DEFINE_float("initial_scale", C.initial_scale, "Initial dynamic loss scale.")
flags.DEFINE_integer(
    "growth_interval", C.growth_interval, "Finite steps in a row before the dynamic scale doubles."
)
flags.DEFINE_float("min_scale", C.min_scale, "Lower bound of the dynamic loss scale.")
flags.DEFINE_float("max_scale", C.max_scale, "Upper bound of the dynamic loss scale.")
flags.DEFINE_float(
    "clip_norm", C.clip_norm, "Clip unscaled gradients to this global norm (0 = off)."
)
flags.DEFINE_integer("seed", C.seed, "Seed for data generation, initialisation and shuffling.")
flags.DEFINE_integer(
    "train_examples", C.train_examples, "Generated train examples (shapes, synthetic)."
)
flags.DEFINE_integer(
    "eval_examples", C.eval_examples, "Generated eval examples (shapes, synthetic)."
)
flags.DEFINE_integer("eval_batch_size", C.eval_batch_size, "Evaluation batch size.")
# --- real data (issue 3) ---
flags.DEFINE_string("data_dir", C.data_dir, "TFDS data directory (default: TFDS' own).")
flags.DEFINE_bool("download", C.download, "Let TFDS download and prepare a missing data set.")
flags.DEFINE_string(
    "train_split",
    C.train_split,
    "TFDS split string (e.g. train[:90%]) or folder:PATH split (tfds: and folder: only).",
)
flags.DEFINE_string(
    "eval_split",
    C.eval_split,
    "TFDS split string or folder:PATH split (tfds: and folder: only); default test (tfds) or "
    "val/validation/eval/test.",
)
flags.DEFINE_float(
    "eval_fraction", C.eval_fraction, "Stratified hold-out for eval when there is no eval split."
)
flags.DEFINE_bool("augment", C.augment, "Random crop + flip when training on real images.")
flags.DEFINE_string(
    "cache",
    C.cache,
    "Cache decoded images: memory, a folder (files DIR/cache-*), a file-path prefix (files "
    "PREFIX-*), or empty for none.",
)
flags.DEFINE_bool(
    "deterministic",
    C.deterministic,
    "Deterministic ops and input order: same batches every run, bit-exact resume (slower).",
)
flags.DEFINE_bool(
    "class_weighting",
    C.class_weighting,
    "Weight the loss by inverse class frequency (tfds:, folder:, ships: data).",
)
flags.DEFINE_bool("skip_bad_images", C.skip_bad_images, "Skip (count and log) undecodable images.")
flags.DEFINE_string(
    "predict_csv", C.predict_csv, "--mode=predict: CSV with an image column (ships layout)."
)
flags.DEFINE_string(
    "predictions_csv",
    C.predictions_csv,
    "Where predictions go; default <model_dir>/predictions.csv.",
)

# --- speed (issue 7) ---
flags.DEFINE_integer(
    "benchmark_repeats",
    C.benchmark_repeats,
    "--mode=benchmark: interleaved fit/engine timed windows per configuration.",
)
flags.DEFINE_integer(
    "benchmark_steps",
    C.benchmark_steps,
    "--mode=benchmark: steps per timed window (0 = one loop of --steps_per_loop).",
)
flags.DEFINE_string("benchmark_json", C.benchmark_json, "--mode=benchmark: write results here.")
flags.DEFINE_string(
    "profile_steps",
    C.profile_steps,
    "START,END: write a TensorBoard profile trace of training steps START to END, both "
    "included (steps numbered as shown, from 1).",
)

# --- TensorBoard and diagnostics (issue 6) ---
flags.DEFINE_integer(
    "summary_every",
    C.summary_every,
    "Steps between scalar summaries (loops are shortened to end on them); 0 = every loop.",
)
flags.DEFINE_integer(
    "histogram_every",
    C.histogram_every,
    "Steps between weight and unscaled-gradient histograms; 0 = off.",
)
flags.DEFINE_bool(
    "precision_diagnostics",
    C.precision_diagnostics,
    "Log the fractions of gradient values float16 would underflow (unscaled) or overflow "
    "(at the current scale); costs a pass over the gradients each step.",
)
flags.DEFINE_string(
    "compare",
    C.compare,
    "Comma-separated PRECISION or PRECISION+xla: --mode=compare trains one run each; "
    "--mode=benchmark times only these (default: all, and the graph rewrite).",
)
flags.DEFINE_string(
    "inject_nonfinite",
    C.inject_nonfinite,
    "Testing: STEPS[@VARIABLE] gets nan gradients, e.g. 3,5@conv or 10:20 or 25: "
    "(steps numbered as shown, from 1).",
)

# --- checkpoints, resume, preemption, divergence, export (issue 4) ---
flags.DEFINE_integer(
    "checkpoint_every",
    C.checkpoint_every,
    "Save a checkpoint every this many steps (0 = only at the end and on SIGTERM/SIGINT).",
)
flags.DEFINE_integer("keep_checkpoints", C.keep_checkpoints, "Checkpoints kept in --model_dir.")
flags.DEFINE_bool(
    "fresh", C.fresh, "Start from step 0; refuse a --model_dir that holds checkpoints."
)
flags.DEFINE_bool("overwrite", C.overwrite, "With --fresh: delete <model_dir>/checkpoints first.")
flags.DEFINE_integer(
    "max_consecutive_skips",
    C.max_consecutive_skips,
    "Stop (exit 3) when more steps than this are skipped in a row (0 = no limit).",
)
flags.DEFINE_string(
    "export_dir", C.export_dir, "Write a float32 SavedModel (images -> probabilities) here."
)

# --- distribution (issue 5) ---
flags.DEFINE_enum(
    "strategy",
    C.strategy,
    config_lib.STRATEGIES,
    "tf.distribute strategy; multi_worker reads the cluster from TF_CONFIG.",
)
flags.DEFINE_integer(
    "num_cpu_devices",
    C.num_cpu_devices,
    "--strategy=mirrored on a machine without GPUs: replicas on this many logical CPUs.",
)
flags.DEFINE_integer(
    "grad_accum_steps",
    C.grad_accum_steps,
    "Split each batch into this many micro-batches; one decision and update per batch.",
)

FLAGS = flags.FLAGS


def config_from_flags():
    """Builds the validated `Config` from the parsed flags (`~` in paths expanded)."""
    fields = {f.name for f in config_lib.dataclasses.fields(config_lib.Config)}
    return config_lib.Config(
        **{name: config_lib.expand_home(name, FLAGS[name].value) for name in fields}
    )


def _parse_flags(argv):
    """absl's parser, but a bad flag is one line and exit 2 instead of two lines."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        # absl's own prefix (a flagfile it cannot open) would follow ours.
        _fail(str(e).removeprefix("ERROR:: "))


def _fail(message, status=2):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; flags look like --name=value")
    try:
        config = config_from_flags()
        config.check_loss_scale_flags()  # the command line's own run only (see there)
    except config_lib.ConfigError as e:
        _fail(str(e))
    # Resolved once: a stop message must name the folder this run writes.
    model_dir = config.model_dir or config_lib.default_model_dir(config)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    # Imported here so that a bad flag is rejected before TensorFlow loads.
    from engine import run

    try:
        # Until the training loop catches them (and after it), a stop signal
        # unwinds: no traceback, no half-written file of ours, what was saved kept.
        with run.terminate_as_interrupt():
            run.run(config, model_dir)
    except run.UserError as e:
        _fail(str(e))
    except run.TrainingDiverged as e:
        _fail(str(e), status=3)  # not a usage error: a scheduler should not just retry
    except (KeyboardInterrupt, run.Terminated) as e:
        signum = signal.SIGINT if isinstance(e, KeyboardInterrupt) else signal.SIGTERM
        resumable = config.mode in ("train", "compare")
        _fail(
            f"stopped by {signum.name}"
            + (
                "; checkpoints already written are kept: "
                + config_lib.resume_hint(config, model_dir)
                if resumable
                else ""
            ),
            status=128 + signum,  # as a shell reports a process a signal ended
        )


def run_main():
    """Console-script entry point (`mixed-precision-train`)."""
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run_main()
