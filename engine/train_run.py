"""The train-run object: what a training run holds, built in one place.

`build_run(config, model_dir)` makes a `TrainRun`: the strategy, the data, the
train state with its starting weights (or those restored from the newest
checkpoint), the iterator, the checkpoint and its manager, the step and its
inner loop, the eval loop and the BatchNorm recalibration. `engine.train`
then hands it to the outer loop with the actions.
"""

import contextlib
import dataclasses

import keras
import tensorflow as tf
from absl import logging

from engine import (
    checkpoints,
    distribute,
    families,
    float8,
    initialization,
    loop,
    optimizers,
    validation,
)
from engine.actions import batch_norm_stats, freezing
from engine.config import ConfigError
from engine.data import data_config
from engine.extras import create_train_step, diagnostics
from engine.loss_scale import create_loss_scale
from engine.precision import get_policy, slow_combination_warning
from engine.step import create_eval_step
from input_pipeline import create_data
from input_pipeline.preprocessing import PIXEL_RANGE, DataError
from models import create_model


class CurrentStep:
    """The training step, its inner loop and its monitor: rebuilt when the weights
    that train change (`--freeze_steps`).

    The outer loop calls it as the inner loop; the actions that need the step
    (summaries read the monitor, histograms the step) hold this object and read
    its fields when they act, so a rebuilt step reaches them without patching.
    """

    def __init__(self, build):
        self._build = build  # () -> (train_step, train_loop, monitor)
        self.rebuild()

    def rebuild(self):
        self.train_step, self.train_loop, self.monitor = self._build()

    def __call__(self, iterator, num_steps):
        return self.train_loop(iterator, num_steps)


@dataclasses.dataclass
class TrainRun:
    """What a training run holds, built in one place (`build_run`)."""

    model_dir: str
    strategy: tf.distribute.Strategy
    data: object  # input_pipeline.DataSpec
    eval_data: object  # the eval set, distributed over the strategy's replicas
    state: loop.TrainState  # model, optimizer, loss scale, counters: what is checkpointed
    stats: loop.LoopStats  # what each inner loop accumulates for the host
    step: CurrentStep
    eval_loop: object  # (distributed eval set) -> (mean loss, accuracy)
    recalibrate: object  # (step) -> whether BatchNorm's statistics changed
    input_pipelines: list  # the input contexts of this worker's training pipelines
    iterator: object  # the training iterator (checkpointed where the strategy allows)
    checkpoint: tf.train.Checkpoint
    manager: tf.train.CheckpointManager
    write_dir: distribute.WriteDir  # model_dir on the chief, a temporary folder elsewhere
    last_good: str | None  # the newest checkpoint written: what a failure falls back to
    saved_step: int | None  # its step
    start_step: int
    total: int  # the run's last step


def device_type():
    return "GPU" if tf.config.list_physical_devices("GPU") else "CPU"


def create_model_for(config, num_classes, pixel_range=PIXEL_RANGE):
    """The run's model under its precision's policy, fed pixels in `pixel_range`.

    BatchNorm runs on TensorFlow's fused kernels unless XLA compiles the step
    (see `models.batch_norm`: faster on TensorFlow's kernels, slower under XLA).
    `--preprocessing=caffe` puts Keras' ResNet50 input step in the model (see
    `models.inputs`); "auto" is decided before (`initialization.resolve_preprocessing`).
    """
    policy = get_policy(config.precision)
    return create_model(
        config.model,
        num_classes,
        config.image_size,
        policy.keras_policy,
        fused_batch_norm=not config.xla,
        preprocessing="caffe" if config.preprocessing == "caffe" else "scaled",
        pixel_range=pixel_range,
        patch_size=config.patch_size,
        stochastic_depth=config.stochastic_depth,
    )


def build_state(config, data, strategy):
    """Creates model, optimizer, loss scale and float8 recipe under the strategy, all built.

    With `--precision=mixed_fp8` the model's Transformer-block Dense layers are made
    float8 (`float8.quantize_model`) here, before any checkpoint holds the recipe's state.
    """
    policy = get_policy(config.precision)
    with strategy.scope():
        model = create_model_for(config, data.num_classes, data.pixel_range)
        recipe = float8.create_recipe(
            config.fp8_recipe if policy.float8 else "none", config.fp8_amax_history
        )
        if policy.float8 and not float8.quantize_model(model, recipe):
            raise ValueError(f"{config.model} has no Dense layer float8 quantizes")
        optimizer = optimizers.create_optimizer(config, total_train_steps(config, data))
        optimizer.build(model.trainable_variables)
        loss_scale = create_loss_scale(
            policy,
            config.loss_scale,
            initial_scale=config.initial_scale,
            growth_interval=config.growth_interval,
            min_scale=config.min_scale,
            max_scale=config.max_scale,
        )
        return loop.TrainState(model, optimizer, loss_scale, recipe)


def check_batch_sizes(config, num_replicas):
    """Raises ConfigError unless the batches divide evenly over replicas and micro-batches."""
    per_replica, remainder = divmod(config.batch_size, num_replicas)
    if remainder or per_replica % config.grad_accum_steps:
        raise ConfigError(
            f"--batch_size ({config.batch_size}) must be a multiple of the {num_replicas} "
            f"replica(s) x --grad_accum_steps ({config.grad_accum_steps})"
        )
    if config.eval_batch_size % num_replicas:
        raise ConfigError(
            f"--eval_batch_size ({config.eval_batch_size}) must be a multiple of the "
            f"{num_replicas} replica(s)"
        )


def steps_per_epoch(batch_size, data):
    return max(data.train_size // batch_size, 1)


def total_train_steps(config, data):
    return config.train_steps or config.epochs * steps_per_epoch(config.batch_size, data)


def build_run(config, model_dir):
    """The `TrainRun` of `config` in `model_dir`: new, or restored from its newest checkpoint.

    In this order: the strategy (logical devices must be set up before
    TensorFlow starts its runtime), the data (bad data leaves no trace in
    model_dir), the resume rules, the state and its starting weights, then the
    iterator and the checkpoint, restored when resuming.
    """
    strategy, data, eval_data = _strategy_and_data(config)
    if distribute.is_chief(strategy):
        resume = checkpoints.prepare_model_dir(config, model_dir, data.class_names)
    else:
        resume = checkpoints.resumed_config(model_dir, config.fresh) is not None
    state = build_state(config, data, strategy)
    if not resume:  # a resumed run restores its own weights
        with strategy.scope():
            initialization.initialize(config, state.model, data.num_classes, data.pixel_range)
    input_pipelines = []  # filled as the strategy builds this worker's pipelines

    def new_iterator():
        def train_fn(input_context):
            input_pipelines.append(input_context)
            return data.train_fn(input_context)

        return iter(strategy.distribute_datasets_from_function(train_fn))

    restored = _restore_or_start(
        config.keep_checkpoints, model_dir, strategy, state, data, new_iterator, resume
    )
    start_step = int(state.step.numpy())
    # Frozen until --freeze_steps (a resume past it starts unfrozen); see `freezing`.
    freezing.set_frozen(state.model, start_step < config.freeze_steps)
    stats = loop.LoopStats()
    return TrainRun(
        model_dir=model_dir,
        strategy=strategy,
        data=data,
        eval_data=eval_data,
        state=state,
        stats=stats,
        step=CurrentStep(lambda: _build_step(config, strategy, state, stats, data)),
        eval_loop=loop.create_eval_loop(strategy, create_eval_step(state.model), config.xla),
        recalibrate=batch_norm_stats.create_recalibration(
            strategy,
            state.model,
            data,
            config.bn_recalibration_examples,
            config.batch_size,
            config.xla,
        ),
        input_pipelines=input_pipelines,
        **restored,
        start_step=start_step,
        total=total_train_steps(config, data),
    )


def _strategy_and_data(config):
    """(strategy, data, distributed eval set): everything a run needs before model_dir."""
    policy, family = get_policy(config.precision), families.model_family(config.model)
    warning = slow_combination_warning(policy, config.xla, device_type(), family)
    if warning:
        logging.warning("%s", warning)
    # First: logical CPU devices can only be set up before TensorFlow starts its runtime.
    strategy = distribute.create_strategy(config.strategy, config.num_cpu_devices)
    check_batch_sizes(config, strategy.num_replicas_in_sync)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(config.seed)
    data = create_data(data_config(config))
    # Also before model_dir: a stale lock or a damaged file cache of the eval
    # images is found here (see `preprocessing.create_eval_dataset`). The
    # training images are decoded (or read from their cache) later, when the
    # iterator is made: after `prepare_model_dir` has checked the flags, so a
    # mismatched resume is refused before a whole data set is decoded.
    return strategy, data, strategy.distribute_datasets_from_function(data.eval_fn)


def _restore_or_start(keep_checkpoints, model_dir, strategy, state, data, new_iterator, resume):
    """The iterator, checkpoint, manager and write folder; restored when resuming.

    Returns the `TrainRun` fields they fill, as a dict.
    """
    # Making it decodes every image into memory (or a file cache): one that broke
    # since the start-up check is named here too, not only mid-run.
    with images_named_if_they_fail(data):
        iterator = new_iterator()
    checkpoint = checkpoints.create_checkpoint(state, iterator)
    # Only the chief writes to model_dir; other workers write to a temporary
    # folder, deleted at the end, and here if restoring fails.
    write_dir = distribute.WriteDir(model_dir, strategy)
    manager = checkpoints.create_manager(checkpoint, write_dir.path, keep_checkpoints)
    last_good, saved_step = None, None  # the checkpoint a failure falls back to
    if resume:
        # Every worker restores the chief's checkpoint, which all of them can read.
        source = manager if write_dir.chief else checkpoints.reader(model_dir)
        try:
            last_good = checkpoints.restore_latest(checkpoint, source, new_iterator)
        except BaseException:
            write_dir.cleanup()
            raise
        iterator = getattr(checkpoint, "iterator", iterator)  # replaced if unreadable
        saved_step = int(state.step.numpy())
        logging.info(
            "resuming from %s at step %d (loss scale %g)",
            last_good,
            saved_step,
            float(state.loss_scale.value.numpy()),
        )
    return dict(
        iterator=iterator,
        checkpoint=checkpoint,
        manager=manager,
        write_dir=write_dir,
        last_good=last_good,
        saved_step=saved_step,
    )


def _build_step(config, strategy, state, stats, data):
    """(train step, its inner loop, its monitor) over the weights that train now."""
    monitor = diagnostics.StepMonitor(
        [v.path for v in state.model.trainable_variables],
        precision_diagnostics=config.precision_diagnostics,
    )
    train_step = create_train_step(
        state.model,
        state.optimizer,
        state.loss_scale,
        config.batch_size,
        config.clip_norm,
        class_weights=data.class_weights,
        precision_diagnostics=config.precision_diagnostics,
        inject=validation.parse_inject_nonfinite(config.inject_nonfinite),
        step_counter=state.step,
        grad_accum_steps=config.grad_accum_steps,
        label_smoothing=config.label_smoothing,
        float8=state.float8,
    )
    train_loop = loop.create_train_loop(strategy, train_step, state, stats, config.xla, monitor)
    return train_step, train_loop, monitor


@contextlib.contextmanager
def images_named_if_they_fail(data):
    """An image file that fails mid-run (changed or gone since the start-up check) is named.

    Checkpoints already written stay; a rerun checks the changed file again at
    start-up (and skips it with --skip_bad_images).
    """
    try:
        yield
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError):
        bad = data.find_bad_files() if data.find_bad_files else []
        if not bad:
            raise
        raise DataError(
            f"image {bad[0]} can no longer be read or decoded (it passed the check at "
            "start-up); fix or remove it, then rerun to resume from the last checkpoint"
        ) from None
