"""The run configuration: one frozen dataclass, defaults in one place, validated once.

This module imports no TensorFlow, so `main.py` can reject a bad flag in
milliseconds, before TensorFlow has loaded.
"""

import dataclasses
import datetime
import os

MODES = ("train", "predict", "compare", "benchmark")
PRECISIONS = ("fp32", "mixed", "mixed_bf16")
MODELS = ("tiny", "small_resnet", "resnet50")
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
LR_SCHEDULES = ("constant", "cosine")
BUILTIN_DATASETS = ("shapes", "synthetic")
DATASET_PREFIXES = ("tfds:", "folder:", "ships:")


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
    # --- checkpoints, resume, preemption, divergence, export (issue 4) ---
    checkpoint_every: int = 250  # steps; 0 = only at the end and on SIGTERM/SIGINT
    keep_checkpoints: int = 3
    fresh: bool = False  # refuse a --model_dir that holds checkpoints, unless --overwrite
    overwrite: bool = False  # with --fresh: delete <model_dir>/checkpoints first
    max_consecutive_skips: int = 25  # more skipped steps in a row stop the run; 0 = no limit
    export_dir: str = ""  # "" = no SavedModel export
    deterministic: bool = False  # deterministic ops and input: bit-exact resume
    inject_nonfinite: str = ""  # testing hook, see parse_inject_nonfinite

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
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.epochs == 0 and self.train_steps == 0:
            raise ConfigError("set --epochs or --train_steps to a positive number")
        if self.image_size < 8:
            raise ConfigError(f"--image_size must be at least 8, got {self.image_size}")
        if not self.learning_rate > 0:
            raise ConfigError(f"--learning_rate must be positive, got {self.learning_rate}")
        if self.clip_norm < 0 or self.weight_decay < 0:
            raise ConfigError("--clip_norm and --weight_decay must be >= 0")
        if self.loss_scale != "dynamic":
            try:
                value = float(self.loss_scale)
            except ValueError:
                value = -1.0
            if not 0 < value < float("inf"):
                raise ConfigError(
                    f"--loss_scale must be 'dynamic' or a positive number, got {self.loss_scale!r}"
                )
        if not 0 < self.min_scale <= self.initial_scale <= self.max_scale < float("inf"):
            raise ConfigError(
                "need 0 < --min_scale <= --initial_scale <= --max_scale < inf, got "
                f"{self.min_scale}, {self.initial_scale}, {self.max_scale}"
            )
        self._validate_checkpointing()

    def _validate_checkpointing(self):
        for name in ("checkpoint_every", "max_consecutive_skips"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be an integer >= 0, got {getattr(self, name)}")
        _check_positive_int("keep_checkpoints", self.keep_checkpoints)
        if self.overwrite and not self.fresh:
            raise ConfigError("--overwrite only applies together with --fresh; add --fresh")
        parse_inject_nonfinite(self.inject_nonfinite)

    def replace(self, **changes):
        """A validated copy with `changes` applied."""
        return dataclasses.replace(self, **changes)


def _check_choice(name, value, choices):
    if value not in choices:
        raise ConfigError(f"--{name}={value!r} is not one of: {', '.join(choices)}")


def _check_positive_int(name, value):
    if not isinstance(value, int) or value < 1:
        raise ConfigError(f"--{name} must be a positive integer, got {value}")


def parse_inject_nonfinite(spec):
    """Parses the `--inject_nonfinite` testing hook: "START[:STOP][@VARIABLE]".

    The step that runs while the global step equals START (0-based: `3` poisons
    the fourth step) up to STOP (exclusive; `5:` = from 5 on, `5:7` = 5 and 6)
    gets nan gradients, for every variable or only those whose path contains
    VARIABLE. "" disables the hook.

    Returns:
      None, or (start, stop or None, variable substring or "").
    """
    if not spec:
        return None
    steps, _, variable = spec.partition("@")
    start, colon, stop = steps.partition(":")
    try:
        start = int(start)
        stop = int(stop) if stop else None
    except ValueError:
        start = -1
    if start < 0 or (stop is not None and stop <= start) or "@" in variable:
        raise ConfigError(
            f"--inject_nonfinite={spec!r} is not START[:STOP][@VARIABLE] with "
            "0 <= START < STOP, e.g. 10, 10:20, 10: or 10:20@dense"
        )
    return start, stop if colon else start + 1, variable


def default_model_dir(config):
    """A fresh folder under runs/ named for the time and the precision."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{stamp}-{config.precision}{'-xla' if config.xla else ''}")
