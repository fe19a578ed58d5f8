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

from engine import scopes
from engine.files import one_line

MODES = ("train", "predict", "compare", "benchmark", "input_benchmark")
STRATEGIES = ("default", "one_device", "mirrored", "multi_worker")
PRECISIONS = ("auto", "fp32", "mixed", "mixed_bf16", "mixed_fp8")
FP8_RECIPES = ("current", "delayed", "block", "unscaled")  # engine/float8.py's
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


class ConfigError(ValueError):
    """A user mistake in the configuration; main.py prints it as one line.

    One line by construction: the message's lines are folded into one
    (`engine.files.one_line`), whatever text it quotes.
    """

    def __init__(self, message):
        super().__init__(one_line(message))


# The dynamic loss scale's options: only float16 (`--precision=mixed`) has one.
# Enforced apart from `SCOPES`, for the command line's own training run only
# (`Config.check_precision_flags`): --mode=compare and --mode=benchmark share one
# set of flags over several precisions, and give them to their float16 runs alone.
FLOAT16_ONLY = scopes.Scope(
    "precision",
    ("mixed",),
    scopes.applies_only(
        "--precision=mixed (float16)",
        lambda c: (
            "--precision=auto may pick one without a loss scale (set --precision=mixed to keep it)"
            if c.precision == "auto"
            else f"--precision={c.precision} has no loss scale"
        ),
    ),
)
# The float8 options (only mixed_fp8 has float8 matmuls): enforced apart, as FLOAT16_ONLY.
FLOAT8_ONLY = scopes.Scope(
    "precision",
    ("mixed_fp8",),
    scopes.applies_only(
        "--precision=mixed_fp8", lambda c: f"--precision={c.precision} has no float8 matmuls"
    ),
)
PRECISION_SCOPES = (FLOAT16_ONLY, FLOAT8_ONLY)
DELAYED_FLOAT8 = scopes.Scope(
    "fp8_recipe",
    ("delayed",),
    scopes.applies_only(
        "--fp8_recipe=delayed", lambda c: f"--fp8_recipe={c.fp8_recipe} keeps no amax history"
    ),
)
NAMED_SPLITS = scopes.Scope(
    "dataset",
    SPLIT_DATASETS,
    scopes.applies_only(
        "--dataset=tfds:NAME and folder:PATH",
        lambda c: f"--dataset={c.dataset} has no named splits",
    ),
)
# The generated data sets draw their classes uniformly: nothing to weight.
COUNTED_CLASSES = scopes.Scope(
    "dataset",
    DATASET_PREFIXES,
    scopes.applies_only(
        "tfds:, folder: and ships: data",
        lambda c: f"--dataset={c.dataset} draws its classes uniformly",
    ),
)
# The modes that train: --mode=compare trains each of its configurations.
TRAINING_MODES = ("train", "compare")
PROFILED_RUNS = scopes.Scope("mode", TRAINING_MODES, scopes.traces_training)
STARTING_WEIGHTS = scopes.Scope(
    "mode",
    TRAINING_MODES,
    scopes.acts_on_training(
        "set{s} the weights a training run starts from",
        {
            "predict": "--mode=predict restores the weights of --model_dir's checkpoints",
            "benchmark": "--mode=benchmark times the training step whatever weights it starts from",
        },
    ),
)
HEAD_FIRST = scopes.Scope(
    "mode",
    TRAINING_MODES,
    scopes.acts_on_training(
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
NOT_BENCHMARK = scopes.Scope(
    "mode", ("train", "predict", "compare", "input_benchmark"), scopes.not_in_benchmark
)
# The benchmark's own choice of its `fit` peer.
FIT_PEER = scopes.Scope(
    "mode",
    ("benchmark",),
    scopes.applies_only("--mode=benchmark", lambda c: f"--mode={c.mode} runs no fit peer"),
)
# The input benchmark's own options: how many images it generates and times.
PIPELINE_TIMING = scopes.Scope(
    "mode",
    ("input_benchmark",),
    scopes.applies_only("--mode=input_benchmark", lambda c: f"--mode={c.mode} times no pipeline"),
)
# The scopes every Config enforces, in this order (PRECISION_SCOPES: see FLOAT16_ONLY).
SCOPES = (
    DELAYED_FLOAT8,
    PROFILED_RUNS,
    STARTING_WEIGHTS,
    HEAD_FIRST,
    NAMED_SPLITS,
    COUNTED_CLASSES,
    NOT_BENCHMARK,
    FIT_PEER,
    PIPELINE_TIMING,
)


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
        "train; predict (needs a trained --model_dir); compare; benchmark; input_benchmark "
        "(the input pipeline's images/s beside the train step's).",
        choices=MODES,
    )
    precision: str = option(
        "auto",
        "fp32; mixed = float16 compute + loss scaling; mixed_bf16 = bfloat16 compute; "
        "mixed_fp8 = mixed_bf16 + float8 matmuls in the ViT blocks; auto: what is fast and "
        "correct for the model on this machine, logged and recorded with the run.",
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
    fp8_recipe: str = option(
        "current",
        "--precision=mixed_fp8's scaling: current (per tensor, its amax now), delayed (the last "
        "--fp8_amax_history amaxes), block (1x128 tiles, 128x128 blocks), unscaled (1: ablation).",
        choices=FP8_RECIPES,
        scopes=[FLOAT8_ONLY],
        resume=True,
    )
    fp8_amax_history: int = option(
        1024,
        "--fp8_recipe=delayed: steps of amaxes each scale is taken from (Keras' 1024).",
        scopes=[FLOAT8_ONLY, DELAYED_FLOAT8],
        resume=True,
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
    # --- real data ---
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
    # --- speed ---
    benchmark_repeats: int = option(
        7, "--mode=benchmark: interleaved fit/engine timed windows per configuration."
    )
    benchmark_steps: int = option(
        0,
        "--mode=benchmark: steps per timed window (0 = one loop of --steps_per_loop); "
        "--mode=input_benchmark: steps per training figure (0 = 40).",
    )
    benchmark_json: str = option("", "--mode=benchmark: write results here.")
    fit_scaling: str = option(
        "keras",
        "--mode=benchmark: the fit peer's loss scaling: keras (its LossScaleOptimizer) or "
        "engine (engine.keras_fit, the engine's step inside fit).",
        choices=("keras", "engine"),
        scopes=[FIT_PEER],
    )
    num_images: int = option(
        3000,
        "--mode=input_benchmark: generated 210x140 JPEGs to time (with --dataset left at "
        "its default).",
        scopes=[PIPELINE_TIMING],
    )
    pipeline_batches: int = option(
        60, "--mode=input_benchmark: batches timed per pipeline figure.", scopes=[PIPELINE_TIMING]
    )
    profile_steps: str = option(
        "",
        "START,END: write a TensorBoard profile trace of training steps START to END, both "
        "included (steps numbered as shown, from 1).",
        scopes=[PROFILED_RUNS],
    )
    # --- TensorBoard and diagnostics ---
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
    # --- checkpoints, resume, preemption, divergence, export ---
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
    # --- distribution ---
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
        from engine.validation import validate  # validation reads these declarations

        validate(self)

    def check_precision_flags(self):
        """Refuses a precision's own flags given to a training run of another precision.

        Only `--precision=mixed` (float16) scales the loss, only `mixed_fp8` has
        float8 matmuls. Elsewhere their flags would be ignored, yet recorded with
        the run, and a resume without them refused. Called for the command line's
        own training run: compare and benchmark runs share one set of flags over
        several precisions.
        """
        from engine.validation import refuse_out_of_scope

        if self.mode == "train":
            refuse_out_of_scope(self, PRECISION_SCOPES)

    def without_other_precisions_flags(self):
        """A copy with the flags of every precision but its own at their defaults."""
        default = defaults()
        names = [n for s in PRECISION_SCOPES if not s.covers(self.precision) for n in options_in(s)]
        return self.replace(**{name: default[name] for name in names})

    def replace(self, **changes):
        """A validated copy with `changes` applied."""
        return dataclasses.replace(self, **changes)


def options_in(scope):
    """The names of the options declared to apply in `scope`, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(Config) if scope in f.metadata["scopes"])


LOSS_SCALE_FLAGS = options_in(FLOAT16_ONLY)
FLOAT8_FLAGS = options_in(FLOAT8_ONLY)
SPLIT_FLAGS = options_in(NAMED_SPLITS)
BENCHMARK_REFUSED_FLAGS = options_in(NOT_BENCHMARK)
# What a resumed run must match in the checkpoints' config.json; any other
# option (steps, learning rate, XLA, checkpoint cadence...) may change on resume.
RESUME_FIELDS = tuple(f.name for f in dataclasses.fields(Config) if f.metadata["resume"])


def applies(name, settings):
    """Whether option `name` applies in a run with `settings` (a mapping: config.json's)."""
    (field,) = (f for f in dataclasses.fields(Config) if f.name == name)
    return all(scope.covers(settings.get(scope.setting)) for scope in field.metadata["scopes"])


def defaults():
    """Every field's default, by name: what a flag left unset holds."""
    return {f.name: f.default for f in dataclasses.fields(Config)}
