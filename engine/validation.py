"""Validation: every value of a `Config` checked, touching no disk.

`validate(config)` runs when a `Config` is made (and on every `replace`): each
check refuses its first problem in one line naming the flag and the fix, then
`refuse_out_of_scope` refuses an option set where it does not apply (see
`engine.scopes`). The parsers of the options that hold a small language
(`--compare`, `--inject_nonfinite`, `--profile_steps`) are here too. The start-up
checks that look at the disk are `engine.preflight`'s.

This module imports no TensorFlow.
"""

import dataclasses

from engine.config import (
    BUILTIN_DATASETS,
    DATASET_PREFIXES,
    FLOAT32_MAX,
    PRECISIONS,
    SCOPES,
    ConfigError,
    defaults,
    options_in,
)
from engine.families import model_family


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
        _check_float8,
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
    _check_positive_int("pipeline_batches", config.pipeline_batches)
    if config.mode == "input_benchmark" and config.dataset == "shapes" and config.num_images < 10:
        raise ConfigError(
            f"--num_images must be at least 10 (two of each of five classes), got "
            f"{config.num_images}"
        )
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


def _check_float8(config):
    trained = parse_compare(config.compare) if config.mode in ("compare", "benchmark") else ()
    if "mixed_fp8" not in (config.precision, *(precision for precision, _ in trained)):
        return
    if config.mode == "benchmark" and config.fit_scaling == "engine":
        raise ConfigError(
            "--fit_scaling=engine does not run float8 (mixed_fp8's fit peer is Keras' own "
            "float8 Dense): drop mixed_fp8 from --compare, or drop --fit_scaling"
        )
    if model_family(config.model) != "vit":
        raise ConfigError(
            "--precision=mixed_fp8 quantizes the matmuls of Transformer blocks (attention "
            f"projections and MLP), and --model={config.model} has none (its matmuls are "
            "convolutions): use a ViT (e.g. --model=vit_mini) or --precision=mixed_bf16"
        )


def _given_flags(config, names):
    """`--name` for each of `names` that `config` sets away from its default."""
    default = defaults()
    return [f"--{name}" for name in names if getattr(config, name) != default[name]]


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
