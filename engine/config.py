"""The run configuration: one frozen dataclass, defaults in one place, validated once.

This module imports no TensorFlow, so `main.py` can reject a bad flag in
milliseconds, before TensorFlow has loaded.
"""

import dataclasses
import datetime
import os

from input_pipeline.paths import absolute_path, cache_prefix

MODES = ("train", "predict", "compare", "benchmark")
STRATEGIES = ("default", "one_device", "mirrored", "multi_worker")
PRECISIONS = ("fp32", "mixed", "mixed_bf16")
MODELS = ("tiny", "small_resnet", "resnet50")
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
LR_SCHEDULES = ("constant", "cosine")
BUILTIN_DATASETS = ("shapes", "synthetic")
DATASET_PREFIXES = ("tfds:", "folder:", "ships:")
# The data sets that read --train_split and --eval_split; the others have no splits.
SPLIT_DATASETS = ("tfds:", "folder:")
SPLIT_FLAGS = ("train_split", "eval_split")
DEFAULT_COMPARE = "fp32,fp32+xla,mixed,mixed+xla,mixed_bf16,mixed_bf16+xla"


# The flags of the dynamic loss scale; only float16 (`--precision=mixed`) has one.
LOSS_SCALE_FLAGS = ("loss_scale", "initial_scale", "growth_interval", "min_scale", "max_scale")


# Flags `--mode=benchmark` cannot honour: it times one device's plain training step
# for each configuration, against Keras `fit`, which has none of these; the
# configurations themselves come from --compare.
BENCHMARK_REFUSED_FLAGS = (
    "precision",
    "xla",
    "strategy",
    "num_cpu_devices",
    "grad_accum_steps",
    "class_weighting",
    "precision_diagnostics",
    "inject_nonfinite",
    # The benchmark's workers never turn on TF's op determinism (`train_and_evaluate` does).
    "deterministic",
)


FLOAT32_MAX = 3.4028234663852886e38  # the largest finite float32


class ConfigError(ValueError):
    """A user mistake in the configuration; main.py prints it as one line."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run needs. Field names are the flag names."""

    mode: str = "train"
    precision: str = "mixed"
    xla: bool = False
    model: str = "small_resnet"
    dataset: str = "shapes"
    image_size: int = 32
    batch_size: int = 64
    epochs: int = 6
    train_steps: int = 0  # > 0 overrides epochs
    optimizer: str = "adam"
    learning_rate: float = 3e-3
    lr_schedule: str = "cosine"
    warmup_steps: int = 50
    weight_decay: float = 0.0
    model_dir: str = ""  # "" means runs/<timestamp>-<precision>[-xla]
    steps_per_loop: int = 50
    loss_scale: str = "dynamic"  # "dynamic" or a positive number
    initial_scale: float = 2.0**15
    growth_interval: int = 2000
    min_scale: float = 1.0
    max_scale: float = 2.0**24
    clip_norm: float = 0.0  # 0 disables clipping
    seed: int = 0
    train_examples: int = 4096  # size of the generated train split (shapes, synthetic)
    eval_examples: int = 1024
    eval_batch_size: int = 256
    # --- real data (issue 3) ---
    data_dir: str = ""  # TFDS data directory; "" means TFDS' default (~/tensorflow_datasets)
    download: bool = False  # let TFDS download and prepare a missing data set
    train_split: str = "train"  # TFDS split string, or the folder:PATH split folder
    eval_split: str = ""  # "" means tfds: "test"; folder: val|validation|eval|test or hold-out
    eval_fraction: float = 0.1  # stratified hold-out when there is no eval split
    augment: bool = True  # random crop + horizontal flip for real-image training
    cache: str = "memory"  # "", "memory", a folder or a file-path prefix (see cache_prefix)
    deterministic: bool = False  # deterministic ops and input order: same batches, exact resume
    class_weighting: bool = False  # weight the loss by n / (num_classes * n_class)
    skip_bad_images: bool = False  # drop (count, log) undecodable images instead of failing
    predict_csv: str = ""  # --mode=predict: CSV with an `image` column (ships layout)
    predictions_csv: str = ""  # "" means <model_dir>/predictions.csv
    # --- speed (issue 7) ---
    benchmark_repeats: int = 7  # interleaved fit/engine timed windows per configuration
    benchmark_steps: int = 0  # steps per timed window; 0 = steps_per_loop (one loop)
    benchmark_json: str = ""  # also write the results here
    profile_steps: str = ""  # "START,END": TensorBoard profile trace of steps START..END (from 1)
    # --- TensorBoard and diagnostics (issue 6) ---
    summary_every: int = 0  # steps between scalar writes; 0 = after every loop
    histogram_every: int = 0  # steps between weight/gradient histograms; 0 = off
    precision_diagnostics: bool = False  # float16 underflow/overflow fractions
    compare: str = DEFAULT_COMPARE  # configurations run by --mode=compare
    inject_nonfinite: str = ""  # tests: nan gradients, see parse_inject_nonfinite
    # --- checkpoints, resume, preemption, divergence, export (issue 4) ---
    checkpoint_every: int = 250  # steps; 0 = only at the end and on SIGTERM/SIGINT
    keep_checkpoints: int = 3
    fresh: bool = False  # refuse a --model_dir that holds checkpoints, unless --overwrite
    overwrite: bool = False  # with --fresh: delete <model_dir>/checkpoints first
    max_consecutive_skips: int = 25  # more skipped steps in a row stop the run; 0 = no limit
    export_dir: str = ""  # "" = no SavedModel export

    # --- distribution (issue 5) ---
    strategy: str = "default"  # default | one_device | mirrored | multi_worker (TF_CONFIG)
    num_cpu_devices: int = 2  # --strategy=mirrored without a GPU: logical CPU devices
    grad_accum_steps: int = 1  # micro-batches per optimizer step (batch_size is split)

    def __post_init__(self):
        _check_choice("mode", self.mode, MODES)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("model", self.model, MODELS)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        if self.dataset not in BUILTIN_DATASETS and not self.dataset.startswith(DATASET_PREFIXES):
            raise ConfigError(
                f"--dataset={self.dataset!r} is not known; use one of "
                f"{', '.join(BUILTIN_DATASETS)} or tfds:NAME, folder:PATH, ships:PATH"
            )
        for name in (
            "image_size",
            "batch_size",
            "steps_per_loop",
            "growth_interval",
            "train_examples",
            "eval_examples",
            "eval_batch_size",
        ):
            _check_positive_int(name, getattr(self, name))
        for name in ("epochs", "train_steps", "warmup_steps", "seed"):
            # Seeds reach numpy, which takes 32 bits; counts past 2**31 no run reaches.
            limit = 2**32 if name == "seed" else 2**31
            if not 0 <= getattr(self, name) < limit:
                raise ConfigError(
                    f"--{name} must be >= 0 and below 2**{limit.bit_length() - 1}, "
                    f"got {getattr(self, name)}"
                )
        if self.epochs == 0 and self.train_steps == 0:
            raise ConfigError("set --epochs or --train_steps to a positive number")
        if self.image_size < 8:
            raise ConfigError(f"--image_size must be at least 8, got {self.image_size}")
        if self.benchmark_repeats < 1 or self.benchmark_steps < 0:
            raise ConfigError("--benchmark_repeats must be >= 1 and --benchmark_steps >= 0")
        if self.benchmark_steps % self.steps_per_loop:
            raise ConfigError(
                f"--benchmark_steps ({self.benchmark_steps}) must be 0 or a multiple of "
                f"--steps_per_loop ({self.steps_per_loop})"
            )
        if self.profile_steps:
            parse_profile_steps(self.profile_steps)
            if self.mode not in ("train", "compare"):
                raise ConfigError(
                    f"--profile_steps traces training steps; use it with --mode=train, not "
                    f"--mode={self.mode} (e.g. on the configuration a benchmark shows as slow)"
                )
        # Comparisons with nan are false, so these reject nan as well as inf: an
        # infinite clip norm or rate would turn every update into nan while the
        # step, checked before clipping, still counted as finite.
        # The step computes in float32: a value past its range is inf there.
        if not 0 < self.learning_rate <= FLOAT32_MAX:
            raise ConfigError(
                f"--learning_rate must be a positive finite number (float32: at most 3.4e38), "
                f"got {self.learning_rate}"
            )
        for name in ("clip_norm", "weight_decay"):
            if not 0 <= getattr(self, name) <= FLOAT32_MAX:
                raise ConfigError(
                    f"--{name} must be a finite number >= 0 (0 turns it off; float32: at most "
                    f"3.4e38), got {getattr(self, name)}"
                )
        if self.loss_scale != "dynamic":
            try:
                value = float(self.loss_scale)
            except ValueError:
                value = -1.0
            if not 0 < value <= FLOAT32_MAX:
                raise ConfigError(
                    f"--loss_scale must be 'dynamic' or a positive number, got {self.loss_scale!r}"
                )
        if not 0 < self.min_scale <= self.initial_scale <= self.max_scale <= FLOAT32_MAX:
            raise ConfigError(
                "need 0 < --min_scale <= --initial_scale <= --max_scale <= 3.4e38 (float32), got "
                f"{self.min_scale}, {self.initial_scale}, {self.max_scale}"
            )
        self._check_real_data()
        self._check_output_paths()
        self._validate_checkpointing()
        self._check_distribution()
        self._check_tensorboard_fields()
        self._check_benchmark_flags()

    def _check_real_data(self):
        for prefix in DATASET_PREFIXES:
            if self.dataset == prefix:
                raise ConfigError(f"--dataset={prefix} needs a name or path after the colon")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError(f"--eval_fraction must be between 0 and 1, got {self.eval_fraction}")
        if not self.train_split:
            raise ConfigError("--train_split must not be empty")
        self._check_split_flags()
        if self.class_weighting and self.dataset in BUILTIN_DATASETS:
            # Ignored there (classes drawn uniformly), yet it would be recorded with the run.
            raise ConfigError(
                f"--class_weighting applies only to tfds:, folder: and ships: data; "
                f"--dataset={self.dataset} draws its classes uniformly: drop it"
            )
        if self.cache not in ("", "memory"):
            parent = os.path.dirname(os.path.abspath(cache_prefix(self.cache)))
            if not os.path.isdir(parent):
                raise ConfigError(
                    f"--cache={self.cache}: {_not_a_folder(parent)}, "
                    "or use --cache=memory or --cache="
                )
        if self.mode == "predict":
            # --dataset is checked against the run's (engine/modes/predict.py).
            if not self.predict_csv:
                raise ConfigError(
                    "--mode=predict needs --predict_csv=PATH (a CSV with an image column)"
                )
            if not self.model_dir:
                raise ConfigError("--mode=predict needs --model_dir of a trained run")

    def _check_split_flags(self):
        # Elsewhere the flags would be ignored, yet recorded with the run, and a
        # resume without them refused.
        if self.dataset.startswith(SPLIT_DATASETS):
            return
        _refuse_given(
            _given_flags(self, SPLIT_FLAGS),
            "--dataset=tfds:NAME and folder:PATH",
            f"--dataset={self.dataset} has no named splits",
        )

    def _check_output_paths(self):
        # Checked before anything runs: a benchmark or a training run must not
        # end by failing to write its result.
        for name in ("benchmark_json", "predictions_csv"):
            path = getattr(self, name)
            if not path:
                continue
            check_local_path(f"--{name}", path)
            if os.path.isdir(path):
                raise ConfigError(f"--{name}={path} is a folder; give a file path")
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                raise ConfigError(f"--{name}={path}: {_not_a_folder(parent)}")
        if self.export_dir and "://" not in self.export_dir and self.mode in ("train", "compare"):
            if os.path.exists(self.export_dir) and not os.path.isdir(self.export_dir):
                raise ConfigError(f"--export_dir={self.export_dir} is a file; give a folder path")
            # The export is written after training: a folder that cannot be made
            # must stop the run now, not then. `lexists`: a link to nothing is
            # where the walk stops (abspath drops a trailing `/` that would follow it).
            existing = os.path.abspath(self.export_dir)
            while not os.path.lexists(existing):
                existing = os.path.dirname(existing)
            if not os.path.exists(existing):
                raise ConfigError(
                    f"--export_dir={self.export_dir}: {existing} is a symbolic link to "
                    f"{os.readlink(existing)}, which does not exist; create it or give "
                    "another path"
                )
            if not os.path.isdir(existing):
                raise ConfigError(
                    f"--export_dir={self.export_dir}: {existing} is a file, so the folder "
                    "cannot be made; give another path"
                )
            if not os.access(existing, os.W_OK | os.X_OK):
                raise ConfigError(
                    f"--export_dir={self.export_dir}: {existing} is not writable; give another path"
                )

    def _check_tensorboard_fields(self):
        for name in ("summary_every", "histogram_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(
                    f"--{name} must be an integer >= 0 (0 = off), got {getattr(self, name)}"
                )
        parse_compare(self.compare)

    def _check_benchmark_flags(self):
        # Ignored, they would leave a table that measured something else than asked.
        if self.mode != "benchmark":
            return
        given = _given_flags(self, BENCHMARK_REFUSED_FLAGS)
        if not given:
            return
        verb, them = ("does", "it") if len(given) == 1 else ("do", "them")
        choose = (
            " (choose precisions and XLA with --compare, e.g. --compare=fp32,mixed_bf16+xla)"
            if {"--precision", "--xla"} & set(given)
            else ""
        )
        raise ConfigError(
            f"{', '.join(given)} {verb} not apply to --mode=benchmark, "
            f"which times the single-device training step of each --compare configuration "
            f"against Keras fit: drop {them}{choose}"
        )

    def _check_distribution(self):
        _check_choice("strategy", self.strategy, STRATEGIES)
        _check_positive_int("num_cpu_devices", self.num_cpu_devices)
        _check_positive_int("grad_accum_steps", self.grad_accum_steps)
        if self.batch_size % self.grad_accum_steps:
            raise ConfigError(
                f"--batch_size ({self.batch_size}) must be a multiple of --grad_accum_steps "
                f"({self.grad_accum_steps}): each step splits the batch into equal micro-batches"
            )

    def _validate_checkpointing(self):
        for name in ("checkpoint_every", "max_consecutive_skips"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be an integer >= 0, got {getattr(self, name)}")
        _check_positive_int("keep_checkpoints", self.keep_checkpoints)
        if self.overwrite and not self.fresh:
            raise ConfigError("--overwrite only applies together with --fresh; add --fresh")
        parse_inject_nonfinite(self.inject_nonfinite)

    def check_loss_scale_flags(self):
        """Refuses loss-scale flags given to a training run that has no loss scale.

        Only `--precision=mixed` (float16) scales the loss. Elsewhere the flags
        would be ignored, yet recorded with the run, and a resume without them
        refused. Called for the command line's own training run: compare and
        benchmark runs share one set of flags over several precisions.
        """
        if self.mode != "train" or self.precision == "mixed":
            return
        _refuse_given(
            _given_flags(self, LOSS_SCALE_FLAGS),
            "--precision=mixed (float16)",
            f"--precision={self.precision} has no loss scale",
        )

    def without_loss_scale_flags(self):
        """A copy with every loss-scale flag at its default."""
        defaults = _defaults()
        return self.replace(**{name: defaults[name] for name in LOSS_SCALE_FLAGS})

    def replace(self, **changes):
        """A validated copy with `changes` applied."""
        return dataclasses.replace(self, **changes)


def _defaults():
    """Every field's default, by name: what a flag left unset holds."""
    return {f.name: f.default for f in dataclasses.fields(Config)}


def _given_flags(config, names):
    """`--name` for each of `names` that `config` sets away from its default."""
    defaults = _defaults()
    return [f"--{name}" for name in names if getattr(config, name) != defaults[name]]


def _refuse_given(given, applies_to, why_not_here):
    """Refuses the flags `given` (if any), which apply only to `applies_to`, in one line."""
    if given:
        verb, them = ("applies", "it") if len(given) == 1 else ("apply", "them")
        raise ConfigError(
            f"{', '.join(given)} {verb} only to {applies_to}; {why_not_here}: drop {them}"
        )


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


def _not_a_folder(path):
    """Why files cannot go into `path`, for an error message."""
    if os.path.exists(path):
        return f"{path} is a file, not a folder; give a path in a folder"
    return f"folder {path} does not exist; create it"


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
    if name in PATH_FLAGS and not (name == "cache" and value == "memory"):
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
