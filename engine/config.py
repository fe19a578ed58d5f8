"""The run configuration: every option declared once, in one frozen dataclass.

Each field of `Config` is one option and one flag (main.py generates the flags
from the fields): its name, type and default, and as metadata its help text,
its choices, the `Scope`s it applies in and whether a resume must match it.
`validate` checks the values and touches no disk; the start-up checks that do
(paths, folders) are `engine.preflight`'s.

This module imports no TensorFlow, so `main.py` can reject a bad flag in
milliseconds, before TensorFlow has loaded.
"""

import dataclasses
import datetime
import os
from collections.abc import Callable

from engine.files import one_line
from input_pipeline.paths import absolute_path

MODES = ("train", "predict", "compare", "benchmark")
STRATEGIES = ("default", "one_device", "mirrored", "multi_worker")
PRECISIONS = ("auto", "fp32", "mixed", "mixed_bf16")
MODELS = ("tiny", "small_resnet", "resnet50", "vit_test", "vit_mini", "vit_tiny", "vit_small")
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
LR_SCHEDULES = ("constant", "cosine")
PRETRAINED = ("none", "imagenet")  # Keras Applications' weights; for resnet50 only
PREPROCESSINGS = ("auto", "scaled", "caffe")
BUILTIN_DATASETS = ("shapes", "synthetic")
DATASET_PREFIXES = ("tfds:", "folder:", "ships:")
# The data sets that read --train_split and --eval_split; the others have no splits.
SPLIT_DATASETS = ("tfds:", "folder:")
DEFAULT_COMPARE = "fp32,fp32+xla,mixed,mixed+xla,mixed_bf16,mixed_bf16+xla"

FLOAT32_MAX = 3.4028234663852886e38  # the largest finite float32
# Where the defaults above would train a model family worse, its own, taken for every
# option the command line does not give (`with_family_defaults`). ViTs: the usual ViT
# recipe, AdamW with weight decay, a lower peak rate after a warm-up, gradients clipped
# at norm 1, a squared-gradient average over ~100 steps rather than Keras' ~1,000,
# which outlast a short run (mixed + XLA, 600 steps: 0.901 against 0.847), and four
# times the generated examples, as a ViT, without a CNN's locality, overfits 4,096.
# Measured on vit_mini, mixed_bf16: 0.8955 eval accuracy against 0.825 with the ResNets'.
FAMILY_DEFAULTS = {
    "vit": {
        "optimizer": "adamw",
        "learning_rate": 2e-3,
        "weight_decay": 0.05,
        "warmup_steps": 60,
        "clip_norm": 1.0,
        "beta_2": 0.99,
        "train_examples": 16384,
    },
}


class ConfigError(ValueError):
    """A user mistake in the configuration; main.py prints it as one line.

    One line by construction: the message's lines are folded into one
    (`engine.files.one_line`), whatever text it quotes.
    """

    def __init__(self, message):
        super().__init__(one_line(message))


@dataclasses.dataclass(frozen=True, eq=False)
class Scope:
    """Where some options apply: runs whose `setting` is one of `values`.

    Set away from its default anywhere else, such an option would be ignored,
    yet recorded with the run (and a resume without it refused):
    `refuse_out_of_scope` refuses it in one line, `refusal(given, config)`.
    """

    setting: str  # the Config field the scope looks at: mode, precision or dataset
    values: tuple  # where the options apply (for dataset: kinds, e.g. "tfds:")
    refusal: Callable  # (["--flag", ...], config) -> the one-line error message

    def covers(self, value):
        """Whether a run whose `setting` is `value` is in this scope."""
        if self.setting == "dataset":  # named by kind and NAME or PATH: tfds:NAME
            return str(value).startswith(self.values)
        return value in self.values


def _applies_only(applies_to, why_not_here):
    """A refusal: "--a, --b apply only to `applies_to`; `why_not_here(config)`: drop them"."""

    def refusal(given, config):
        verb, them = ("applies", "it") if len(given) == 1 else ("apply", "them")
        return (
            f"{', '.join(given)} {verb} only to {applies_to}; {why_not_here(config)}: drop {them}"
        )

    return refusal


def _traces_training(given, config):
    return (
        f"{', '.join(given)} traces training steps; use it with --mode=train or --mode=compare, "
        f"not --mode={config.mode} (e.g. on the configuration a benchmark shows as slow)"
    )


def _acts_on_training(does, instead):
    """A refusal: "--a DOES; INSTEAD[mode]: use it with --mode=train or --mode=compare, or drop it".

    `does` holds `{s}`, the verb's ending for one option; `instead` says, per
    mode outside the scope, what that mode does in its place.
    """

    def refusal(given, config):
        one = len(given) == 1
        them = "it" if one else "them"
        return (
            f"{', '.join(given)} {does.format(s='s' if one else '')}; {instead[config.mode]}: "
            f"use {them} with --mode=train or --mode=compare, or drop {them}"
        )

    return refusal


def _not_in_benchmark(given, config):
    del config  # the benchmark's reason is the same for every run
    verb, them = ("does", "it") if len(given) == 1 else ("do", "them")
    choose = (
        " (choose precisions and XLA with --compare, e.g. --compare=fp32,mixed_bf16+xla)"
        if {"--precision", "--xla"} & set(given)
        else ""
    )
    return (
        f"{', '.join(given)} {verb} not apply to --mode=benchmark, "
        f"which times the single-device training step of each --compare configuration "
        f"against Keras fit: drop {them}{choose}"
    )


# The dynamic loss scale's options: only float16 (`--precision=mixed`) has one.
FLOAT16_ONLY = Scope(
    "precision",
    ("mixed",),
    _applies_only(
        "--precision=mixed (float16)",
        lambda c: (
            "--precision=auto may pick one without a loss scale (set --precision=mixed to keep it)"
            if c.precision == "auto"
            else f"--precision={c.precision} has no loss scale"
        ),
    ),
)
NAMED_SPLITS = Scope(
    "dataset",
    SPLIT_DATASETS,
    _applies_only(
        "--dataset=tfds:NAME and folder:PATH",
        lambda c: f"--dataset={c.dataset} has no named splits",
    ),
)
# The generated data sets draw their classes uniformly: nothing to weight.
COUNTED_CLASSES = Scope(
    "dataset",
    DATASET_PREFIXES,
    _applies_only(
        "tfds:, folder: and ships: data",
        lambda c: f"--dataset={c.dataset} draws its classes uniformly",
    ),
)
# The modes that train: --mode=compare trains each of its configurations.
TRAINING_MODES = ("train", "compare")
PROFILED_RUNS = Scope("mode", TRAINING_MODES, _traces_training)
STARTING_WEIGHTS = Scope(
    "mode",
    TRAINING_MODES,
    _acts_on_training(
        "set{s} the weights a training run starts from",
        {
            "predict": "--mode=predict restores the weights of --model_dir's checkpoints",
            "benchmark": "--mode=benchmark times the training step whatever weights it starts from",
        },
    ),
)
HEAD_FIRST = Scope(
    "mode",
    TRAINING_MODES,
    _acts_on_training(
        "train{s} only the head for a training run's first steps",
        {
            "predict": "--mode=predict trains nothing",
            "benchmark": "--mode=benchmark times the step that trains every layer",
        },
    ),
)
# `--mode=benchmark` times one device's plain training step for each --compare
# configuration against Keras `fit`, which has none of these options; ignored,
# they would leave a table that measured something else than asked.
NOT_BENCHMARK = Scope("mode", ("train", "predict", "compare"), _not_in_benchmark)
# The scopes every Config enforces, in this order. FLOAT16_ONLY is enforced for
# the command line's own training run only (`Config.check_loss_scale_flags`).
SCOPES = (PROFILED_RUNS, STARTING_WEIGHTS, HEAD_FIRST, NAMED_SPLITS, COUNTED_CLASSES, NOT_BENCHMARK)


def option(default, help_text, *, choices=(), scopes=(), resume=False):
    """A `Config` field: one option, declared once.

    Args:
      default: what the flag left unset holds.
      help_text: the flag's help.
      choices: the values a str option takes (its flag is an enum), or () for any.
      scopes: the `Scope`s it applies in; set outside any of them, it is refused.
      resume: whether a resumed run must match the checkpoints in it: the option
        decides the shape, dtype or meaning of the checkpointed state.
    """
    metadata = {
        "help": help_text,
        "choices": tuple(choices),
        "scopes": tuple(scopes),
        "resume": resume,
    }
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run needs. Field names are the flag names."""

    mode: str = option(
        "train",
        "train; predict (needs a trained --model_dir); compare; benchmark.",
        choices=MODES,
    )
    precision: str = option(
        "auto",
        "fp32; mixed = float16 compute + loss scaling; mixed_bf16 = bfloat16 compute; auto: "
        "what is fast and correct on this machine, logged and recorded with the run.",
        choices=PRECISIONS,
        scopes=[NOT_BENCHMARK],
        resume=True,
    )
    xla: bool = option(
        None,
        "Compile the training step with XLA (jit_compile=True); unset: chosen with "
        "--precision=auto, else off.",
        scopes=[NOT_BENCHMARK],
    )
    model: str = option("small_resnet", "Model architecture.", choices=MODELS, resume=True)
    dataset: str = option(
        "shapes",
        "shapes (embedded, default), synthetic, tfds:NAME, folder:PATH or ships:PATH.",
        resume=True,
    )
    image_size: int = option(32, "Input height and width in pixels.", resume=True)
    patch_size: int = option(
        0,
        "ViT patch side in pixels; 0: an 8x8 grid of patches up to 128 px, 16 px above.",
        resume=True,
    )
    batch_size: int = option(64, "Global training batch size.", resume=True)
    epochs: int = option(6, "Training epochs (ignored when --train_steps > 0).")
    train_steps: int = option(0, "Training steps; > 0 overrides --epochs.")
    optimizer: str = option("adam", "Optimizer.", choices=OPTIMIZERS, resume=True)
    learning_rate: float = option(3e-3, "Peak learning rate.")
    # resume: a constant rate is an optimizer variable, a schedule is not: they
    # differ in what the optimizer checkpoints.
    lr_schedule: str = option(
        "cosine",
        "Learning-rate schedule (cosine includes --warmup_steps of linear warm-up).",
        choices=LR_SCHEDULES,
        resume=True,
    )
    warmup_steps: int = option(50, "Linear warm-up steps for --lr_schedule=cosine.")
    weight_decay: float = option(0.0, "Decoupled weight decay (0 = none).")
    beta_2: float = option(
        0.999, "Adam's and AdamW's decay of the squared-gradient average (Keras' beta_2)."
    )
    model_dir: str = option("", "Where summaries go; default runs/<timestamp>-<precision>[-xla].")
    steps_per_loop: int = option(50, "Steps per tf.function call (no host sync inside a loop).")
    loss_scale: str = option(
        "dynamic",
        "'dynamic' or a positive number (static scale).",
        scopes=[FLOAT16_ONLY],
        resume=True,
    )
    initial_scale: float = option(2.0**15, "Initial dynamic loss scale.", scopes=[FLOAT16_ONLY])
    growth_interval: int = option(
        2000, "Finite steps in a row before the dynamic scale doubles.", scopes=[FLOAT16_ONLY]
    )
    min_scale: float = option(1.0, "Lower bound of the dynamic loss scale.", scopes=[FLOAT16_ONLY])
    max_scale: float = option(
        2.0**24, "Upper bound of the dynamic loss scale.", scopes=[FLOAT16_ONLY]
    )
    clip_norm: float = option(0.0, "Clip unscaled gradients to this global norm (0 = off).")
    label_smoothing: float = option(
        0.0,
        "Mix this much of a uniform distribution into the targets (0 = off, below 1).",
        scopes=[NOT_BENCHMARK],
    )
    stochastic_depth: float = option(
        0.0,
        "ViT: drop each block's residual branches for this share of the examples in the "
        "last block, less in earlier ones, 0 in the first (0 = off, below 1).",
        scopes=[NOT_BENCHMARK],
        resume=True,
    )
    seed: int = option(0, "Seed for data generation, initialisation and shuffling.", resume=True)
    train_examples: int = option(4096, "Generated train examples (shapes, synthetic).", resume=True)
    eval_examples: int = option(1024, "Generated eval examples (shapes, synthetic).")
    eval_batch_size: int = option(256, "Evaluation batch size.")
    # --- real data (issue 3) ---
    data_dir: str = option("", "TFDS data directory (default: TFDS' own).")
    download: bool = option(False, "Let TFDS download and prepare a missing data set.")
    # resume, for the splits, the hold-out and the images read: which examples
    # are training data. A different split would resume the input stream at the
    # right position in the wrong data, and could train on eval.
    train_split: str = option(
        "train",
        "TFDS split string (e.g. train[:90%]) or folder:PATH split (tfds: and folder: only).",
        scopes=[NAMED_SPLITS],
        resume=True,
    )
    eval_split: str = option(
        "",
        "TFDS split string or folder:PATH split (tfds: and folder: only); default test (tfds) "
        "or val/validation/eval/test.",
        scopes=[NAMED_SPLITS],
        resume=True,
    )
    eval_fraction: float = option(
        0.1, "Stratified hold-out for eval when there is no eval split.", resume=True
    )
    augment: bool = option(True, "Random crop + flip when training on real images.", resume=True)
    cache: str = option(
        "auto",
        "Decoded images: auto (in memory if they fit half the available memory, else "
        "streamed), memory, a folder (files DIR/cache-*) or file-path prefix (PREFIX-*): "
        "decoded once into a cache on disk read by index, or empty: streamed from the "
        "files, decoded at every step.",
    )
    # Not in a benchmark: its workers never turn on TF's op determinism.
    deterministic: bool = option(
        False,
        "Deterministic ops and input order: same batches every run, bit-exact resume (slower).",
        scopes=[NOT_BENCHMARK],
    )
    class_weighting: bool = option(
        False,
        "Weight the loss by inverse class frequency (tfds:, folder:, ships: data).",
        scopes=[COUNTED_CLASSES, NOT_BENCHMARK],
    )
    skip_bad_images: bool = option(False, "Skip (count and log) undecodable images.", resume=True)
    predict_csv: str = option("", "--mode=predict: CSV with an image column (ships layout).")
    predictions_csv: str = option("", "Where predictions go; default <model_dir>/predictions.csv.")
    # --- speed (issue 7) ---
    benchmark_repeats: int = option(
        7, "--mode=benchmark: interleaved fit/engine timed windows per configuration."
    )
    benchmark_steps: int = option(
        0, "--mode=benchmark: steps per timed window (0 = one loop of --steps_per_loop)."
    )
    benchmark_json: str = option("", "--mode=benchmark: write results here.")
    profile_steps: str = option(
        "",
        "START,END: write a TensorBoard profile trace of training steps START to END, both "
        "included (steps numbered as shown, from 1).",
        scopes=[PROFILED_RUNS],
    )
    # --- TensorBoard and diagnostics (issue 6) ---
    summary_every: int = option(
        0,
        "Steps between scalar summaries (loops are shortened to end on them); 0 = every loop.",
    )
    histogram_every: int = option(
        0, "Steps between weight and unscaled-gradient histograms; 0 = off."
    )
    precision_diagnostics: bool = option(
        False,
        "Log the fractions of gradient values float16 would underflow (unscaled) or overflow "
        "(at the current scale); costs a pass over the gradients each step.",
        scopes=[NOT_BENCHMARK],
    )
    compare: str = option(
        DEFAULT_COMPARE,
        "Comma-separated PRECISION or PRECISION+xla: --mode=compare trains one run each; "
        "--mode=benchmark times only these (default: all, and the graph rewrite).",
    )
    inject_nonfinite: str = option(
        "",
        "Testing: STEPS[@VARIABLE] gets nan gradients, e.g. 3,5@conv or 10:20 or 25: "
        "(steps numbered as shown, from 1).",
        scopes=[NOT_BENCHMARK],
    )
    # --- checkpoints, resume, preemption, divergence, export (issue 4) ---
    checkpoint_every: int = option(
        250,
        "Save a checkpoint every this many steps (0 = only at the end and on SIGTERM/SIGINT).",
    )
    keep_checkpoints: int = option(3, "Checkpoints kept in --model_dir.")
    fresh: bool = option(False, "Start from step 0; refuse a --model_dir that holds checkpoints.")
    overwrite: bool = option(False, "With --fresh: delete <model_dir>/checkpoints first.")
    max_consecutive_skips: int = option(
        25, "Stop (exit 3) when more steps than this are skipped in a row (0 = no limit)."
    )
    export_dir: str = option("", "Write a float32 SavedModel (images -> probabilities) here.")
    # --- distribution (issue 5) ---
    strategy: str = option(
        "default",
        "tf.distribute strategy; multi_worker reads the cluster from TF_CONFIG.",
        choices=STRATEGIES,
        scopes=[NOT_BENCHMARK],
    )
    num_cpu_devices: int = option(
        2,
        "--strategy=mirrored on a machine without GPUs: replicas on this many logical CPUs.",
        scopes=[NOT_BENCHMARK],
    )
    grad_accum_steps: int = option(
        1,
        "Split each batch into this many micro-batches; one decision and update per batch.",
        scopes=[NOT_BENCHMARK],
    )
    # --- BatchNorm statistics ---
    bn_recalibration_examples: int = option(
        1024,
        "Recompute BatchNorm's statistics from this many training examples (capped at one "
        "epoch) before each eval, the last checkpoint and the export (0 = off).",
        scopes=[NOT_BENCHMARK],
    )
    # --- Starting weights (fine-tuning; engine/initialization.py) ---
    init_weights: str = option(
        "",
        "Start every layer but the head from this Keras weights file (.h5 as Keras "
        "Applications publishes them, or .weights.h5), matched by layer name.",
        scopes=[STARTING_WEIGHTS],
    )
    pretrained: str = option(
        "none",
        "Start from Keras Applications' weights (imagenet: --model=resnet50), downloaded "
        "once into Keras' cache (~/.keras/models).",
        choices=PRETRAINED,
        scopes=[STARTING_WEIGHTS],
    )
    init_from: str = option(
        "",
        "Start the model from the latest checkpoint of this run folder (its head too when "
        "the classes agree); optimizer, step and loss scale start fresh.",
        scopes=[STARTING_WEIGHTS],
    )
    freeze_steps: int = option(
        0,
        "Train only the head for this many steps (every other layer frozen, its BatchNorm "
        "in inference mode), then every layer (0 = off).",
        scopes=[HEAD_FIRST],
    )
    preprocessing: str = option(
        "auto",
        "Input pixels as the weights expect: scaled (the pipeline's range, [-1, 1] for "
        "photos) or caffe (Keras' ResNet50 preprocess_input); auto: caffe with --pretrained "
        "or --init_weights, the source run's with --init_from, else scaled.",
        choices=PREPROCESSINGS,
        scopes=[NOT_BENCHMARK],
        resume=True,
    )

    def __post_init__(self):
        validate(self)

    def check_loss_scale_flags(self):
        """Refuses loss-scale flags given to a training run that has no loss scale.

        Only `--precision=mixed` (float16) scales the loss. Elsewhere the flags
        would be ignored, yet recorded with the run, and a resume without them
        refused. Called for the command line's own training run: compare and
        benchmark runs share one set of flags over several precisions.
        """
        if self.mode == "train":
            refuse_out_of_scope(self, [FLOAT16_ONLY])

    def without_loss_scale_flags(self):
        """A copy with every loss-scale flag at its default."""
        defaults = _defaults()
        return self.replace(**{name: defaults[name] for name in LOSS_SCALE_FLAGS})

    def replace(self, **changes):
        """A validated copy with `changes` applied."""
        return dataclasses.replace(self, **changes)


def options_in(scope):
    """The names of the options declared to apply in `scope`, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(Config) if scope in f.metadata["scopes"])


LOSS_SCALE_FLAGS = options_in(FLOAT16_ONLY)
SPLIT_FLAGS = options_in(NAMED_SPLITS)
BENCHMARK_REFUSED_FLAGS = options_in(NOT_BENCHMARK)
# What a resumed run must match in the checkpoints' config.json; any other
# option (steps, learning rate, XLA, checkpoint cadence...) may change on resume.
RESUME_FIELDS = tuple(f.name for f in dataclasses.fields(Config) if f.metadata["resume"])


def refuse_out_of_scope(config, scopes=SCOPES):
    """Refuses, in one line, the options `config` sets outside their `scopes`.

    Raises:
      ConfigError: for the first scope `config` is outside of, the options of
        it set away from their defaults.
    """
    for scope in scopes:
        if scope.covers(getattr(config, scope.setting)):
            continue
        given = _given_flags(config, options_in(scope))
        if given:
            raise ConfigError(scope.refusal(given, config))


def applies(name, settings):
    """Whether option `name` applies in a run with `settings` (a mapping: config.json's)."""
    (field,) = (f for f in dataclasses.fields(Config) if f.name == name)
    return all(scope.covers(settings.get(scope.setting)) for scope in field.metadata["scopes"])


def validate(config):
    """Checks every value of `config`; touches no disk (that is `engine.preflight`'s).

    Raises:
      ConfigError: the first problem found, naming the flag and how to fix it.
    """
    for check in (
        _check_choices,
        _check_dataset,
        _check_counts,
        _check_benchmark_and_profile,
        _check_rates,
        _check_loss_scale,
        _check_real_data,
        _check_output_files,
        _check_checkpointing,
        _check_distribution,
        _check_tensorboard,
        _check_initialization,
    ):
        check(config)
    refuse_out_of_scope(config)


def _check_choices(config):
    for field in dataclasses.fields(config):
        if field.metadata["choices"]:
            _check_choice(field.name, getattr(config, field.name), field.metadata["choices"])


def _check_dataset(config):
    if config.dataset not in BUILTIN_DATASETS and not config.dataset.startswith(DATASET_PREFIXES):
        raise ConfigError(
            f"--dataset={config.dataset!r} is not known; use one of "
            f"{', '.join(BUILTIN_DATASETS)} or tfds:NAME, folder:PATH, ships:PATH"
        )
    if config.dataset in DATASET_PREFIXES:
        raise ConfigError(f"--dataset={config.dataset} needs a name or path after the colon")


def _check_counts(config):
    for name in (
        "image_size",
        "batch_size",
        "steps_per_loop",
        "growth_interval",
        "train_examples",
        "eval_examples",
        "eval_batch_size",
    ):
        _check_positive_int(name, getattr(config, name))
    for name in ("epochs", "train_steps", "warmup_steps", "freeze_steps", "seed"):
        # Seeds reach numpy, which takes 32 bits; counts past 2**31 no run reaches.
        limit = 2**32 if name == "seed" else 2**31
        if not 0 <= getattr(config, name) < limit:
            raise ConfigError(
                f"--{name} must be >= 0 and below 2**{limit.bit_length() - 1}, "
                f"got {getattr(config, name)}"
            )
    if config.epochs == 0 and config.train_steps == 0:
        raise ConfigError("set --epochs or --train_steps to a positive number")
    if config.image_size < 8:
        raise ConfigError(f"--image_size must be at least 8, got {config.image_size}")
    _check_patch_size(config)


def _check_patch_size(config):
    if not config.patch_size:
        return
    if model_family(config.model) != "vit":
        raise ConfigError(f"--patch_size is for the ViT models, not --model={config.model}")
    if config.patch_size < 0 or config.image_size % config.patch_size:
        raise ConfigError(
            f"--patch_size={config.patch_size} must be positive and divide "
            f"--image_size={config.image_size}"
        )


def _check_benchmark_and_profile(config):
    if config.benchmark_repeats < 1 or config.benchmark_steps < 0:
        raise ConfigError("--benchmark_repeats must be >= 1 and --benchmark_steps >= 0")
    if config.benchmark_steps % config.steps_per_loop:
        raise ConfigError(
            f"--benchmark_steps ({config.benchmark_steps}) must be 0 or a multiple of "
            f"--steps_per_loop ({config.steps_per_loop})"
        )
    if config.profile_steps:
        parse_profile_steps(config.profile_steps)


def _check_rates(config):
    # Comparisons with nan are false, so these reject nan as well as inf: an
    # infinite clip norm or rate would turn every update into nan while the
    # step, checked before clipping, still counted as finite.
    # The step computes in float32: a value past its range is inf there.
    if not 0 < config.learning_rate <= FLOAT32_MAX:
        raise ConfigError(
            f"--learning_rate must be a positive finite number (float32: at most 3.4e38), "
            f"got {config.learning_rate}"
        )
    for name in ("clip_norm", "weight_decay"):
        if not 0 <= getattr(config, name) <= FLOAT32_MAX:
            raise ConfigError(
                f"--{name} must be a finite number >= 0 (0 turns it off; float32: at most "
                f"3.4e38), got {getattr(config, name)}"
            )
    if not 0 <= config.beta_2 < 1:
        raise ConfigError(f"--beta_2 must be >= 0 and below 1, got {config.beta_2}")
    for name in ("label_smoothing", "stochastic_depth"):
        if not 0 <= getattr(config, name) < 1:
            raise ConfigError(f"--{name} must be >= 0 and below 1, got {getattr(config, name)}")
    if config.stochastic_depth and model_family(config.model) != "vit":
        raise ConfigError(f"--stochastic_depth is for the ViT models, not --model={config.model}")


def _check_loss_scale(config):
    if config.loss_scale != "dynamic":
        try:
            value = float(config.loss_scale)
        except ValueError:
            value = -1.0
        if not 0 < value <= FLOAT32_MAX:
            raise ConfigError(
                f"--loss_scale must be 'dynamic' or a positive number, got {config.loss_scale!r}"
            )
    if not 0 < config.min_scale <= config.initial_scale <= config.max_scale <= FLOAT32_MAX:
        raise ConfigError(
            "need 0 < --min_scale <= --initial_scale <= --max_scale <= 3.4e38 (float32), got "
            f"{config.min_scale}, {config.initial_scale}, {config.max_scale}"
        )


def _check_real_data(config):
    if not 0.0 < config.eval_fraction < 1.0:
        raise ConfigError(f"--eval_fraction must be between 0 and 1, got {config.eval_fraction}")
    if not config.train_split:
        raise ConfigError("--train_split must not be empty")
    if config.mode == "predict":
        # --dataset is checked against the run's (engine/modes/predict.py).
        if not config.predict_csv:
            raise ConfigError(
                "--mode=predict needs --predict_csv=PATH (a CSV with an image column)"
            )
        if not config.model_dir:
            raise ConfigError("--mode=predict needs --model_dir of a trained run")


def _check_output_files(config):
    # The files written with open(); their folders are checked by engine.preflight.
    for name in ("benchmark_json", "predictions_csv"):
        if getattr(config, name):
            check_local_path(f"--{name}", getattr(config, name))


def _check_checkpointing(config):
    for name in ("checkpoint_every", "max_consecutive_skips"):
        if not isinstance(getattr(config, name), int) or getattr(config, name) < 0:
            raise ConfigError(f"--{name} must be an integer >= 0, got {getattr(config, name)}")
    _check_positive_int("keep_checkpoints", config.keep_checkpoints)
    if config.overwrite and not config.fresh:
        raise ConfigError("--overwrite only applies together with --fresh; add --fresh")
    parse_inject_nonfinite(config.inject_nonfinite)


def _check_distribution(config):
    _check_positive_int("num_cpu_devices", config.num_cpu_devices)
    _check_positive_int("grad_accum_steps", config.grad_accum_steps)
    if config.batch_size % config.grad_accum_steps:
        raise ConfigError(
            f"--batch_size ({config.batch_size}) must be a multiple of --grad_accum_steps "
            f"({config.grad_accum_steps}): each step splits the batch into equal micro-batches"
        )


def _check_tensorboard(config):
    for name in ("summary_every", "histogram_every", "bn_recalibration_examples"):
        if not isinstance(getattr(config, name), int) or getattr(config, name) < 0:
            raise ConfigError(
                f"--{name} must be an integer >= 0 (0 = off), got {getattr(config, name)}"
            )
    parse_compare(config.compare)


def _defaults():
    """Every field's default, by name: what a flag left unset holds."""
    return {f.name: f.default for f in dataclasses.fields(Config)}


def _given_flags(config, names):
    """`--name` for each of `names` that `config` sets away from its default."""
    defaults = _defaults()
    return [f"--{name}" for name in names if getattr(config, name) != defaults[name]]


def check_local_path(flag, path):
    """Refuses `scheme://` paths for a file written with Python's `open()`.

    `open()` takes `gs://b/x` for a relative path and fails at the end of the
    run, when the file is written, not where the flag is read.
    """
    scheme, sep, _ = path.partition("://")
    if sep:
        raise ConfigError(
            f"{flag}={path} must be a local path: the file is written with Python's open(), "
            f"which cannot write {scheme}:// URLs; give a local file and copy it afterwards"
        )


def _check_initialization(config):
    given = [
        flag
        for flag, value in (
            ("--init_weights", config.init_weights),
            ("--init_from", config.init_from),
            ("--pretrained", config.pretrained != "none"),
        )
        if value
    ]
    if len(given) > 1:
        raise ConfigError(f"{' and '.join(given)} each set the starting weights; keep one")
    if config.pretrained != "none" and config.model != "resnet50":
        raise ConfigError(
            f"--pretrained={config.pretrained} has weights for --model=resnet50 only, not "
            f"--model={config.model}; use --init_weights=FILE for other weights"
        )


def _check_choice(name, value, choices):
    if value not in choices:
        raise ConfigError(f"--{name}={value!r} is not one of: {', '.join(choices)}")


def _check_positive_int(name, value):
    # Sizes and counts become int32 tensors: past 2**31 they fail deep in TensorFlow.
    if not isinstance(value, int) or not 1 <= value < 2**31:
        raise ConfigError(f"--{name} must be a positive integer below 2**31, got {value}")


def parse_compare(spec):
    """`--compare` as a tuple of (precision, xla) pairs, e.g. "fp32,mixed+xla".

    Raises:
      ConfigError: an entry is not PRECISION or PRECISION+xla, or repeats.
    """
    pairs = []
    for entry in spec.split(","):
        precision, plus, suffix = entry.strip().partition("+")
        if precision not in PRECISIONS or (plus and suffix != "xla"):
            raise ConfigError(
                f"--compare entry {entry.strip()!r} is not PRECISION or PRECISION+xla "
                f"(PRECISION one of {', '.join(PRECISIONS)}), e.g. --compare=fp32,mixed+xla"
            )
        pairs.append((precision, bool(plus)))
    if len(set(pairs)) != len(pairs):
        raise ConfigError(f"--compare={spec!r} lists a configuration twice")
    return tuple(pairs)


def parse_inject_nonfinite(spec):
    """`--inject_nonfinite`, a testing hook: "STEPS[@VARIABLE]" -> (ranges, substring).

    STEPS is a comma-separated list of step numbers as the console and
    TensorBoard show them (the first step is 1): `N`, `A:B` (A to B-1) or `A:`
    (A onwards). Those steps get nan gradients, for every trainable variable, or
    only those whose path contains VARIABLE. "" disables the hook.

    Returns:
      None, or (((start, stop or None), ...), substring or "").

    Raises:
      ConfigError: the spec does not parse.
    """
    if not spec:
        return None
    steps, _, substring = spec.partition("@")
    ranges = []
    try:
        for item in steps.split(","):
            first, colon, last = item.strip().partition(":")
            start = int(first)
            stop = (int(last) if last else None) if colon else start + 1
            # Bounded so the step numbers fit the graph's int64 step counter.
            if not 1 <= start < 2**62 or (stop is not None and not start < stop < 2**62):
                raise ValueError(item)
            ranges.append((start, stop))
    except ValueError:
        raise ConfigError(
            f"--inject_nonfinite={spec!r} is not STEPS[@VARIABLE] with steps >= 1, "
            "e.g. 3, 3,5@conv, 10:20 or 25:"
        ) from None
    return tuple(ranges), substring


# The flags that name local files or folders (and `--dataset=folder:|ships:PATH`).
PATH_FLAGS = (
    "model_dir",
    "data_dir",
    "cache",
    "export_dir",
    "benchmark_json",
    "predict_csv",
    "predictions_csv",
    "init_weights",
    "init_from",
)


def same_file(a, b):
    """Whether paths `a` and `b` name one file or folder, through links and spellings."""
    # samefile also sees hard links; realpath covers a path that does not exist yet.
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def dataset_path(dataset):
    """The PATH of `folder:PATH` or `ships:PATH`, else None (generated sets, tfds names)."""
    kind, colon, path = dataset.partition(":")
    return path if colon and kind in ("folder", "ships") else None


def expand_home(name, value):
    """`value` of flag `name` with `~` at the start of a local path expanded.

    The shell leaves `~` in `--data_dir=~/x` alone (it expands a tilde only at
    the start of a word), and neither TFDS nor `open()` expands it: they would
    use a folder named `~` in the working directory.
    """
    if name == "dataset" and dataset_path(value) is not None:
        kind, path = value.split(":", 1)
        return f"{kind}:{os.path.expanduser(path)}"
    return os.path.expanduser(value) if name in PATH_FLAGS else value


def absolute_dataset(dataset):
    """`--dataset` with a local relative `folder:`/`ships:` PATH made absolute."""
    if dataset_path(dataset) is None:
        return dataset
    kind, path = dataset.split(":", 1)
    return f"{kind}:{absolute_path(path)}"


def _replayable(name, value):
    """`value` of flag `name` as flags.txt writes it: the same files from any folder."""
    if name == "dataset":
        return absolute_dataset(value)
    if name in PATH_FLAGS and not (name == "cache" and value in ("auto", "memory")):
        return absolute_path(value)
    return value


def to_flagfile(config):
    """The flags that rebuild `config`, one per line (for `--flagfile`).

    All but `--fresh` and `--overwrite`: replaying a run's flags must never delete
    its checkpoints. Local relative paths (`PATH_FLAGS`, the data set's PATH) are
    written absolute, resolved against the current folder, so a replay from
    another folder reads and writes the run's own files.
    """
    lines = []
    for field in dataclasses.fields(config):
        if field.name in ("fresh", "overwrite"):
            continue  # actions on the model_dir, not configuration
        value = _replayable(field.name, getattr(config, field.name))
        if value is None:
            continue  # unset (--xla before --precision=auto decides): the default replays it
        if isinstance(value, bool):
            lines.append(f"--{field.name}" if value else f"--no{field.name}")
        else:
            # repr keeps every digit of a float, so the value round-trips exactly.
            lines.append(
                f"--{field.name}={value!r}"
                if isinstance(value, float)
                else f"--{field.name}={value}"
            )
    return "\n".join(lines) + "\n"


def default_model_dir(config):
    """A fresh folder under runs/ named for the time and the precision (or `compare`)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    if config.mode == "compare":
        return os.path.join("runs", f"{stamp}-compare")
    return os.path.join("runs", f"{stamp}-{config.precision}{'-xla' if config.xla else ''}")


def resume_hint(config, model_dir, purpose="resume"):
    """How to resume the command that ran `config` in `model_dir`, for stop messages.

    Without --model_dir the same command would start a new timestamped folder:
    the hint names the one this run wrote.
    """
    if config.model_dir:
        return f"rerun the same command to {purpose}"
    return f"rerun with --model_dir={os.path.abspath(model_dir)} to {purpose}"


def parse_profile_steps(value):
    """ "START,END" -> (start, end), steps numbered from 1, both traced; ConfigError otherwise."""
    try:
        start, end = (int(v) for v in value.split(","))
    except ValueError:
        start, end = 0, 0
    if not 1 <= start <= end:
        raise ConfigError(
            f"--profile_steps must be START,END with 1 <= START <= END (steps numbered as "
            f"shown, from 1; both traced), got {value!r}"
        )
    return start, end


def model_family(model):
    """ "vit" for the Vision Transformers, "resnet" for the rest."""
    return "vit" if model.startswith("vit_") else "resnet"


def with_family_defaults(config, given):
    """`config` with its model family's `FAMILY_DEFAULTS` for every option not in `given`.

    `given` holds the names of the options the user set (main.py: the flags present
    on the command line or in a flagfile); a `Config` built in code keeps its values.
    """
    defaults = FAMILY_DEFAULTS.get(model_family(config.model), {})
    return config.replace(**{k: v for k, v in defaults.items() if k not in given})
