"""`--mode=predict`: restore the trained model and label a ships test CSV.

The model is rebuilt with the settings the run recorded in its config.json
(`RUN_FIELDS`: --model, --image_size, --patch_size, --precision, --preprocessing,
--dataset; see `with_run_settings`), only its weights are restored from the latest checkpoint
in `<model_dir>/checkpoints`, and the test images go through the eval
preprocessing. The output is a submission-style CSV `image,category` with the
contest's category ids 1..5, one row per input row, in input order.
"""

import csv
import dataclasses
import os

import numpy as np
import tensorflow as tf
from absl import logging

from engine import checkpoints, files, machine, train_run
from engine.config import ConfigError
from engine.data import data_config
from engine.run_paths import same_file
from engine.validation import check_local_path
from input_pipeline import preprocessing, ships


def output_path(config, model_dir):
    """Where the predictions go: `--predictions_csv`, default `<model_dir>/predictions.csv`.

    Checked here, not at flag parsing, because the default depends on the
    `model_dir` this run uses; it runs before anything is read or written.

    Raises:
      ConfigError: the path is not local or is a folder, or writing it would replace the input
        CSV, a checkpoint, or a file of the run that is not a CSV (flags.txt,
        TensorBoard events...).
    """
    out = config.predictions_csv or os.path.join(model_dir, "predictions.csv")
    flag = f"--predictions_csv={out}"
    # The flag's own value was checked at start-up; the default follows --model_dir.
    check_local_path("--predictions_csv", out)
    # Resolved, so that symlinks, relative paths and `..` all compare as the file they reach.
    real = os.path.realpath(out)
    if os.path.isdir(real):
        raise ConfigError(f"{flag} is a folder; give a file path")
    if same_file(real, config.predict_csv):
        raise ConfigError(
            f"{flag} is the input --predict_csv; writing it would replace the list of "
            "images to predict: give another file"
        )
    directory = checkpoints.checkpoint_dir(model_dir)
    if _inside(real, directory):
        raise ConfigError(
            f"{flag} is inside the checkpoint folder {directory}; writing there could "
            "destroy the trained model: give a file outside it"
        )
    if _inside(real, model_dir) and os.path.exists(real) and not real.lower().endswith(".csv"):
        raise ConfigError(
            f"{flag} would replace {real}, a file of the run in --model_dir={model_dir} "
            "that is not a CSV: give a .csv path"
        )
    return out


def _inside(path, folder):
    folder = os.path.realpath(folder)
    return os.path.commonpath([os.path.realpath(path), folder]) == folder


# What defines the model and its input: taken from the run, so a prediction
# needs no flag of the training command retyped.
RUN_FIELDS = ("model", "image_size", "patch_size", "precision", "preprocessing", "dataset")


def with_run_settings(config, model_dir):
    """`config` with the `RUN_FIELDS` of the run in `model_dir` (its config.json).

    A flag at its default takes the run's value; one set to the run's value is
    kept; any other value is refused. `--dataset` may name another ships folder
    (it may have moved since training): only its kind must be `ships`. A run
    without config.json (an older one) is read with `config` as given.

    Raises:
      ConfigError: the run was not trained on ships data, a flag differs from
        both its default and the run's value, or no ships folder is known.
    """
    check_trained_on_ships(model_dir)
    saved = checkpoints.load_config(checkpoints.checkpoint_dir(model_dir)) or {}
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    changes = {}
    for name in RUN_FIELDS:
        given, run = getattr(config, name), saved.get(name, getattr(config, name))
        if given == run:
            continue
        if given == defaults[name]:
            changes[name] = run
        elif name != "dataset":
            raise ConfigError(
                f"--{name}={given} differs from --{name}={run}, which the run in "
                f"--model_dir={model_dir} was trained with; drop --{name}: predict takes it "
                "from the run"
            )
    config = config.replace(**changes)
    if not config.dataset.startswith("ships:"):
        raise ConfigError("--mode=predict reads a ships test CSV; use --dataset=ships:PATH")
    if changes:
        taken = " ".join(f"--{name}={value}" for name, value in changes.items())
        logging.info("predict: %s, as the run in %s was trained", taken, model_dir)
    return config


def check_trained_on_ships(model_dir):
    """Raises ConfigError if `config.json` says the run was not trained on a ships: dataset.

    Only the kind is compared: the ships folder may have moved since training.
    Without config.json (an older run) the restore is the only check, as in training.
    """
    saved = checkpoints.load_config(checkpoints.checkpoint_dir(model_dir))
    dataset = str((saved or {}).get("dataset", "ships:"))
    if dataset.split(":", 1)[0] != "ships":
        raise ConfigError(
            f"--model_dir={model_dir} was trained on --dataset={dataset}, but --mode=predict "
            "labels ship categories: use a run trained with --dataset=ships:PATH"
        )


def restore_model(config, model_dir, num_classes):
    """The model of `config` with the weights of the latest checkpoint in `model_dir`.

    Raises:
      ConfigError: no checkpoint, or one that does not fit `--model`/`--image_size`.
    """
    directory = checkpoints.checkpoint_dir(model_dir)
    # A model at another resolution would restore and predict without a word.
    checkpoints.check_compatible(config, directory, fields=("model", "image_size"))
    paths = list(reversed(checkpoints.list_checkpoints(directory)))
    if not paths:
        raise ConfigError(
            f"--model_dir={model_dir} has no checkpoint in {directory}; "
            "train first with --mode=train"
        )
    model = train_run.create_model_for(config, num_classes)
    failures = []
    for latest in paths:
        mismatch = None
        with _unrestored_values_unlogged():
            try:
                status = tf.train.Checkpoint(model=model).restore(latest).expect_partial()
                # Every weight of the rebuilt model must come from the checkpoint: a
                # different --model would otherwise predict with random weights.
                status.assert_existing_objects_matched()
            except (AssertionError, ValueError, tf.errors.InvalidArgumentError) as e:
                mismatch = checkpoints.first_line(e)
            # A truncated file fails wherever its reader runs out of bytes: as in
            # training, a damaged checkpoint is reported and the one before it is used.
            except Exception as e:
                reason = f"{type(e).__name__}: {checkpoints.first_line(e)}"
                logging.error("checkpoint %s is damaged or unreadable: %s", latest, reason)
                failures.append(f"{os.path.basename(latest)}: {reason}")
                continue
        # Raised outside the `except`: there the restore error would become this
        # error's context and keep the failed restore (and its warnings) until exit.
        if mismatch:
            raise ConfigError(
                f"checkpoint {latest} does not fit --model={config.model} "
                f"--image_size={config.image_size}; use the training run's flags ({mismatch})"
            )
        break
    else:
        raise ConfigError(f"no checkpoint in {directory} can be read ({'; '.join(failures)})")
    logging.info("restored %s", latest)
    return model


def _unrestored_values_unlogged():
    """Drops the warnings a failed restore logs when it is freed.

    A restore that raises never returns the status to call `expect_partial()`
    on, so when the error is freed TensorFlow logs every checkpoint value the
    model does not hold (optimizer, step, iterator...): some 20 lines of noise
    after the one error line, as only the model is restored on purpose.
    """
    return checkpoints.tf_log_filtered(
        lambda record: not (record.module == "checkpoint" and record.funcName == "__del__")
    )


def write_predictions(path, names, categories):
    """Writes `image,category` rows; via a temporary file so a failure leaves no half CSV."""
    with files.written_whole(path, newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "category"])
        writer.writerows(zip(names, categories, strict=True))


def predict(config, model_dir):
    """Predicts `config.predict_csv` with the model in `model_dir`; returns the output path."""
    out = output_path(config, model_dir)
    # A model of another data set would predict meaningless labels, or fail to
    # restore with a message about shapes instead of the data set.
    config = with_run_settings(config, model_dir)
    # A run without config.json (an older one) records no precision: --precision=auto
    # is decided as a training run would decide it (weights are float32 in any case).
    config = machine.resolve(config, model_dir)
    root = config.dataset.split(":", 1)[1]
    names, paths = ships.read_unlabelled(config.predict_csv, root)
    kept, _, skipped = preprocessing.drop_undecodable(
        paths, np.zeros(len(paths), np.int32), config.skip_bad_images, config.predict_csv
    )
    if skipped:
        kept_set = set(kept)
        names = [n for n, p in zip(names, paths, strict=True) if p in kept_set]
    if not kept:
        raise ConfigError(f"--predict_csv={config.predict_csv}: no image could be decoded")
    model = restore_model(config, model_dir, len(ships.CLASS_NAMES))
    ds = preprocessing.create_eval_dataset(
        preprocessing.file_examples(kept, np.zeros(len(kept), np.int32)),
        data_config(config).replace(cache=""),
        config.eval_batch_size,
        cache_key=None,
        read=tf.io.read_file,
    )
    predict_step = tf.function(
        lambda images: tf.argmax(model(images, training=False), -1), jit_compile=config.xla
    )
    labels = np.concatenate([predict_step(images).numpy() for images, _ in ds])
    categories = [ships.CATEGORIES[i] for i in labels]
    write_predictions(out, names, categories)
    logging.info(
        "wrote %d predictions to %s (%d undecodable image(s) skipped)", len(names), out, skipped
    )
    return out
