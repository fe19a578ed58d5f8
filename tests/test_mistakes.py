"""A user's mistake is one line on stderr starting `error: `, exit status 2, nothing lost.

The user-error types keep their message to one line by construction (first
tests). Then ONE table of mistakes, `MISTAKES`, each run through main.py as a
user would: exit status 2, exactly one line starting `error:` on stderr, no
`Traceback` in the output, and every file of the entry's folder (an existing
--model_dir among them, a copy of one finished run) byte-identical afterwards.

Cheap by design: each mistake runs main.py's own parser and `main` in a
driver process, tests/mistakes_driver.py (its docstring says why that is the
path a user meets), two drivers at once on the two cores. One runs the
mistakes refused before TensorFlow loads (flag values, start-up checks of
paths), ~80 in about a second, and proves it never loaded TensorFlow; the
other loads TensorFlow once, trains the finished run, then runs the mistakes
found after it loads (data, caches, checkpoints, replicas). The input
benchmark's mistakes, a command of its own, run as its processes.

`RAISE_SITES` maps every place that raises a user error to the entries that
reach it, or to the end-to-end test that covers it elsewhere, or says why the
command line cannot reach it; a test keeps that map complete.
"""

import ast
import concurrent.futures
import dataclasses
import glob
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import types
from collections.abc import Callable

import pytest
from conftest import ROOT
from image_trees import corrupt, make_folder_tree, make_ships_tree, write_csv

# Its module fixture runs once: under pytest-xdist, its tests share one worker.
pytestmark = pytest.mark.xdist_group("mistakes")

# --- one line by construction --------------------------------------------------

# A message as a library may write it: indented lines, blank ones, CR LF and
# the other line breaks a terminal shows as a new line.
MULTI_LINE = "Error parsing split 'x'. \n\n  Unknown split 'x'.\r\nsee\x0bthe\u2028docs  \n"
FOLDED = "Error parsing split 'x'.; Unknown split 'x'.; see; the; docs"

# The errors main.py prints as `error:` lines, each one line by construction.
ONE_LINE_TYPES = {
    "ConfigError": "engine.config",
    "DataError": "input_pipeline.preprocessing",
    "UserError": "engine.run",
}
# The other error types of the project, and how the user meets them: as one of
# the types above (their text folded there) or through main.py's `_fail`.
SHOWN_THROUGH = {
    "DamagedCheckpoints": "UserError (engine.run.run)",
    "ExportError": "UserError (engine.run.run)",
    "ExportFailed": "UserError (engine.run.run; an ExportError)",
    "WeightsMismatch": "ConfigError (engine.initialization._load_file)",
    "TrainingDiverged": "main._fail, exit 3",
    "Terminated": "main._fail, exit 128 + SIGTERM",
}


def _exception_classes():
    """The names of the exception classes defined in main.py, engine/, input_pipeline/, models/."""
    paths = [os.path.join(ROOT, "main.py")]
    for package in ("engine", "input_pipeline", "models"):
        paths += glob.glob(os.path.join(ROOT, package, "**", "*.py"), recursive=True)
    classes = {}
    for path in paths:
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                classes[node.name] = [ast.unparse(base).split(".")[-1] for base in node.bases]
    found, grew = set(), True
    while grew:  # subclasses of Python's exceptions, and of those found, to any depth
        new = {
            name
            for name, bases in classes.items()
            if any(b in found or b.endswith(("Error", "Exception", "Interrupt")) for b in bases)
        }
        grew, found = new != found, new
    return found


def test_every_error_type_is_one_line_or_reaches_the_user_through_one():
    # A new error type must be sorted into one of the two tables above.
    assert _exception_classes() == set(ONE_LINE_TYPES) | set(SHOWN_THROUGH)


@pytest.mark.parametrize("name", sorted(ONE_LINE_TYPES))
def test_a_user_error_folds_a_message_holding_newlines_into_one_line(name):
    import importlib

    error_type = getattr(importlib.import_module(ONE_LINE_TYPES[name]), name)
    assert str(error_type(MULTI_LINE)) == FOLDED
    assert str(error_type("--flag=x is wrong; fix it")) == "--flag=x is wrong; fix it"
    # As its callers catch it: ConfigError and DataError are ValueErrors.
    assert issubclass(error_type, ValueError) == (name != "UserError")


def test_main_fail_prints_one_line_whatever_the_message_holds(capsys):
    import main

    with pytest.raises(SystemExit) as exit_:
        main._fail(MULTI_LINE)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"error: {FOLDED}\n"


def test_a_config_built_in_code_refuses_a_value_outside_its_choices():
    from engine.config import Config, ConfigError

    with pytest.raises(ConfigError) as error:
        Config(precision="fp16")
    assert str(error.value) == (
        "--precision='fp16' is not one of: auto, fp32, mixed, mixed_bf16, mixed_fp8"
    )


# --- the table of mistakes -----------------------------------------------------

MAIN = os.path.join(ROOT, "main.py")
# The finished run every entry's --model_dir copies: a tiny model trained on a
# ships tree, with a decoded cache on disk (for the cache mistakes) and
# checkpoints (for the resume and predict mistakes).
TINY = (
    "--model=tiny",
    "--image_size=16",
    "--batch_size=8",
    "--eval_batch_size=8",
    "--steps_per_loop=2",
    "--warmup_steps=0",
    "--precision=fp32",
)
FINISHED = (*TINY, "--train_steps=4", "--dataset=ships:{ships}")
# The finished run resumed: only the mistake added to it differs.
RESUME = (*TINY, "--train_steps=6", "--dataset=ships:{ships}")
PREDICT = ("--mode=predict", "--predict_csv={ships}/test.csv")


@dataclasses.dataclass(frozen=True)
class Mistake:
    """One mistake as a user makes it, and what its error line says.

    `args` are main.py's flags, with `{tmp}` (the entry's own folder), `{run}`
    (a copy of the finished run in it, also the --model_dir unless `args` name
    another or `model_dir` is False), `{cache}` (a copy of the finished run's
    decoded cache), `{ships}` (the shared ships tree), `{tfds}` and
    `{tfds_tfrecord}` (a local TFDS set, as ArrayRecord and TFRecord) and
    `{weights}` (a Keras weights file of small_resnet) filled in.
    """

    id: str
    args: tuple
    says: str  # what the one error line holds; `...` stands for any text
    setup: Callable | None = None  # setup(paths): makes what the mistake needs in the folder
    tf: bool = False  # found after TensorFlow loads: run in the driver
    patch: tuple = ()  # the driver's (PATCHES name, argument with the same fields)
    model_dir: bool = True
    creates: str = ""  # a path the command may create (a new run's folder); all else stays
    env: tuple = ()  # (name, value) pairs, with the same fields
    command: tuple = (MAIN,)  # what runs the flags (python ARGS...)


def flag(id, args, says, **kwargs):
    """A mistake found before TensorFlow loads (flag values, start-up checks of paths)."""
    return Mistake(
        id, tuple(args.split()) if isinstance(args, str) else tuple(args), says, **kwargs
    )


def late(id, args, says, **kwargs):
    """A mistake found after TensorFlow loads: run by the driver."""
    return flag(id, args, says, tf=True, **kwargs)


# Setups: each gets the entry's paths (pathlib) and makes what its mistake needs.


def _tree(p, **kwargs):
    return make_folder_tree(p.tmp / "data", **{"per_class": 4, **kwargs})


def _corrupt_images(p, pattern):
    _tree(p)
    for path in sorted((p.tmp / "data" / "train").glob(pattern)):
        corrupt(str(path))


def _unlistable_subfolder(p):
    _tree(p)
    make_folder_tree(p.tmp / "data" / "train" / "red", splits=("locked",), classes=("red",))


def _class_without_images(p):
    _tree(p)
    (p.tmp / "data" / "train" / "blue").mkdir()
    (p.tmp / "data" / "train" / "blue" / "notes.txt").write_text("no image here")


def _eval_class_not_in_train(p):
    _tree(p, classes=("red", "green"))
    make_folder_tree(p.tmp / "data", splits=("val",), classes=("red", "blue"), per_class=2)


def _ships_csv(rows, header=("image", "category")):
    def setup(p):
        root, _ = make_ships_tree(p.tmp / "ships")
        write_csv(os.path.join(root, "train", "train.csv"), header, rows)

    return setup


def _ships_without_csv(p):
    make_ships_tree(p.tmp / "ships")
    (p.tmp / "ships" / "train" / "train.csv").unlink()


def _truncate(pattern):
    """Cuts the files of the entry's folder matching `pattern` to half their length."""

    def setup(p):
        found = sorted(p.tmp.glob(pattern))
        assert found, pattern
        for path in found:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    return setup


def _locked_eval_cache(p):
    # What a run killed while writing the eval images' cache leaves: a lock, no cache.
    (index,) = p.cache.glob("*.index")
    stem = index.name[: -len(".index")]
    for path in p.cache.glob(f"{stem}*"):
        path.unlink()
    (p.cache / f"{stem}_0.lockfile").write_text("")


def _index_as_folder(p):
    # A `checkpoint` index that cannot be rewritten (replaced by a folder), listing nothing.
    (p.run / "checkpoints" / "checkpoint").unlink()
    (p.run / "checkpoints" / "checkpoint").mkdir()


def _edit_json(name, change):
    def setup(p):
        path = p.run / "checkpoints" / name
        path.write_text(json.dumps(change(json.loads(path.read_text()))))

    return setup


def _remove(*patterns):
    def setup(p):
        for pattern in patterns:
            for path in p.tmp.glob(pattern):
                shutil.rmtree(path) if path.is_dir() else path.unlink()

    return setup


def _write(name, text):
    def setup(p):
        (p.tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (p.tmp / name).write_text(text)

    return setup


def _mkdir(name):
    return lambda p: (p.tmp / name).mkdir(parents=True)


def _predict_csv_of_corrupt_images(p):
    root, _ = make_ships_tree(p.tmp / "ships", per_class=(2, 2, 2, 2, 2), num_test=2)
    for name in ("test0.jpg", "test1.jpg"):
        corrupt(os.path.join(root, "train", "images", name))


def _dangling_export_link(p):
    (p.tmp / "export").symlink_to(p.tmp / "missing")


def _corrupt_one(p):
    _tree(p)
    corrupt(str(p.tmp / "data" / "train" / "red" / "img0_0.jpg"))


FLAG_VALUES = [
    flag("unknown_precision", "--precision=fp8", "fp32|mixed|mixed_bf16"),
    flag(
        "zero_batch", "--batch_size=0", "--batch_size must be a positive integer below 2**31, got 0"
    ),
    flag(
        "huge_image_size",
        "--image_size=100000000000000000000",
        "--image_size must be a positive integer below",
    ),
    flag(
        "float8_on_a_resnet",
        "--precision=mixed_fp8",
        "--precision=mixed_fp8 quantizes the matmuls of Transformer blocks (attention projections "
        "and MLP), and --model=small_resnet has none (its matmuls are convolutions): use a ViT "
        "(e.g. --model=vit_mini) or --precision=mixed_bf16",
    ),
    flag(
        "float8_compared_on_a_resnet",
        "--mode=compare --compare=mixed_bf16,mixed_fp8 --model=tiny",
        "--model=tiny has none (its matmuls are convolutions)",
    ),
    flag(
        "float8_in_a_benchmark",
        "--mode=benchmark --compare=mixed_fp8 --model=vit_test --fit_scaling=engine",
        "--fit_scaling=engine does not run float8 (mixed_fp8's fit peer is Keras' own float8 "
        "Dense): drop mixed_fp8 from --compare, or drop --fit_scaling",
    ),
    flag("image_size_below_8", "--image_size=4", "--image_size must be at least 8, got 4"),
    flag(
        "seed_past_32_bits",
        "--seed=4294967296",
        "--seed must be >= 0 and below 2**32, got 4294967296",
    ),
    flag(
        "negative_warmup",
        "--warmup_steps=-1",
        "--warmup_steps must be >= 0 and below 2**31, got -1",
    ),
    flag(
        "learning_rate_past_float32",
        "--learning_rate=1e39",
        "--learning_rate must be a positive finite number (float32",
    ),
    flag(
        "infinite_learning_rate",
        "--learning_rate=inf",
        "--learning_rate must be a positive finite number (float32",
    ),
    flag("clip_norm_past_float32", "--clip_norm=1e39", "--clip_norm must be a finite number >= 0"),
    flag(
        "infinite_clip_norm",
        "--clip_norm=inf",
        "--clip_norm must be a finite number >= 0 (0 turns it off; float32: at most 3.4e38), got "
        "inf",
    ),
    flag("negative_clip_norm", "--clip_norm=-1", "--clip_norm must be a finite number >= 0"),
    flag("nan_weight_decay", "--weight_decay=nan", "--weight_decay must be a finite number >= 0"),
    flag("beta_2_of_1", "--beta_2=1", "--beta_2 must be >= 0 and below 1, got 1.0"),
    flag(
        "label_smoothing_of_1",
        "--label_smoothing=1",
        "--label_smoothing must be >= 0 and below 1, got 1.0",
    ),
    flag(
        "stochastic_depth_on_a_resnet",
        "--stochastic_depth=0.1",
        "--stochastic_depth is for the ViT models, not --model=small_resnet",
    ),
    flag(
        "patch_size_on_a_resnet",
        "--patch_size=4",
        "--patch_size is for the ViT models, not --model=small_resnet",
    ),
    flag(
        "patch_size_not_dividing",
        "--model=vit_test --patch_size=5",
        "--patch_size=5 must be positive and divide --image_size=32",
    ),
    flag("max_scale_past_float32", "--max_scale=1e39", "--max_scale <= 3.4e38 (float32)"),
    flag(
        "min_scale_above_initial",
        "--precision=mixed --min_scale=4 --initial_scale=2",
        "need 0 < --min_scale <= --initial_scale <= --max_scale",
    ),
    flag("unknown_model", "--model=vgg", "tiny|small_resnet|resnet50"),
    flag(
        "negative_loss_scale",
        "--loss_scale=-3",
        "--loss_scale must be 'dynamic' or a positive number",
    ),
    flag("unknown_dataset", "--dataset=imagenet", "--dataset='imagenet' is not known"),
    flag(
        "dataset_without_a_path",
        "--dataset=folder:",
        "--dataset=folder: needs a name or path after the colon",
    ),
    flag("unknown_flag", "--nonsense=1", "Unknown command line flag 'nonsense'"),
    flag(
        "stray_arguments",
        "train --model=tiny",
        "unexpected arguments ['train']; flags look like --name=value",
    ),
    flag("missing_flagfile", "--flagfile=/nonexistent/f.txt", "error: Unable to open flagfile"),
    flag("no_epochs_or_steps", "--epochs=0", "set --epochs or --train_steps"),
    flag(
        "batch_not_split_by_micro_batches",
        "--grad_accum_steps=3",
        "must be a multiple of --grad_accum_steps (3)",
    ),
    flag("unknown_strategy", "--strategy=tpu", "default|one_device|mirrored|multi_worker"),
    flag(
        "zero_cpu_devices",
        "--num_cpu_devices=0",
        "--num_cpu_devices must be a positive integer below 2**31, got 0",
    ),
    flag(
        "inject_step_past_int64",
        "--inject_nonfinite=99999999999999999999",
        "--inject_nonfinite='99999999999999999999'",
    ),
    flag(
        "eval_fraction_of_1",
        "--eval_fraction=1",
        "--eval_fraction must be between 0 and 1, got 1.0",
    ),
    flag(
        "empty_train_split",
        ["--dataset=folder:data", "--train_split="],
        "--train_split must not be empty",
    ),
    flag(
        "predict_without_a_csv",
        "--mode=predict --dataset=ships:x",
        "--mode=predict needs --predict_csv=PATH",
    ),
    flag(
        "predict_without_model_dir",
        "--mode=predict --dataset=ships:x --predict_csv=t.csv",
        "--mode=predict needs --model_dir of a trained run",
        model_dir=False,
    ),
    flag(
        "negative_checkpoint_every",
        "--checkpoint_every=-1",
        "--checkpoint_every must be an integer >= 0, got -1",
    ),
    flag(
        "negative_skip_limit",
        "--max_consecutive_skips=-1",
        "--max_consecutive_skips must be an integer >= 0, got -1",
    ),
    flag(
        "zero_checkpoints_kept",
        "--keep_checkpoints=0",
        "--keep_checkpoints must be a positive integer below 2**31, got 0",
    ),
    flag(
        "overwrite_without_fresh",
        "--overwrite",
        "--overwrite only applies together with --fresh; add --fresh",
    ),
    flag(
        "negative_summary_every",
        "--summary_every=-1",
        "--summary_every must be an integer >= 0 (0 = off), got -1",
    ),
    flag(
        "unknown_compare_entry",
        "--compare=fp32,fp16+xla",
        "--compare entry 'fp16+xla' is not PRECISION or PRECISION+xla",
    ),
    flag(
        "compare_entry_twice",
        "--mode=compare --compare=fp32,fp32",
        "--compare='fp32,fp32' lists a configuration twice",
    ),
    flag(
        "zero_benchmark_repeats",
        "--mode=benchmark --benchmark_repeats=0",
        "--benchmark_repeats must be >= 1 and --benchmark_steps >= 0",
    ),
    flag(
        "benchmark_steps_across_loops",
        "--mode=benchmark --benchmark_steps=3 --steps_per_loop=2",
        "--benchmark_steps (3) must be 0 or a multiple of --steps_per_loop (2)",
    ),
    flag(
        "profile_steps_backwards",
        "--profile_steps=5,2",
        "--profile_steps must be START,END with 1 <= START <= END",
    ),
    flag(
        "two_starting_weights",
        "--init_weights=a.h5 --init_from=run",
        "--init_weights and --init_from each set the starting weights; keep one",
    ),
    flag(
        "pretrained_small_resnet",
        "--pretrained=imagenet",
        "--pretrained=imagenet has weights for --model=resnet50 only",
    ),
    flag(
        "remote_benchmark_json",
        "--benchmark_json=gs://bucket/b.json",
        "--benchmark_json=gs://bucket/b.json must be a ",
    ),
    flag(
        "remote_predictions_csv",
        "--predictions_csv=s3://b/p.csv",
        "must be a local path: the file is written with",
    ),
]

# Options set where they do nothing: each scope's refusal gives its own reason.
OUT_OF_SCOPE = [
    flag(
        "loss_scale_without_float16",
        "--precision=fp32 --loss_scale=128",
        "--loss_scale applies only to --precision=mixed",
    ),
    flag(
        "loss_scale_options_in_bfloat16",
        "--precision=mixed_bf16 --initial_scale=4 --growth_interval=10",
        "--initial_scale, --growth_interval apply only to --precision=mixed (float16); "
        "--precision=mixed_bf16 has no loss scale: drop them",
    ),
    flag(
        "benchmark_options",
        "--mode=benchmark --strategy=mirrored --grad_accum_steps=2 --xla",
        "--xla, --strategy, --grad_accum_steps do not apply to --mode=benchmark, which times the "
        "single-device training step of each --compare configuration against Keras fit: drop them "
        "(choose precisions and XLA with --compare, e.g. --compare=fp32,",
    ),
    flag(
        "class_weights_of_generated_shapes",
        "--class_weighting",
        "--class_weighting applies only to tfds:, folder: and ships: data; --dataset=shapes draws "
        "its classes uniformly: drop it",
    ),
    flag(
        "class_weights_of_synthetic_data",
        "--dataset=synthetic --class_weighting",
        "--dataset=synthetic draws its classes",
    ),
    flag(
        "split_of_synthetic_data",
        "--dataset=synthetic --eval_split=val",
        "--eval_split applies only to --dataset=tfds:NAME and folder:PATH; --dataset=synthetic "
        "has no named splits: drop it",
    ),
    flag(
        "profile_in_a_benchmark",
        "--mode=benchmark --profile_steps=2,4",
        "--profile_steps traces training steps; use it with --mode=train or --mode=compare, not "
        "--mode=benchmark (e.g. on the configuration a benchmark shows as slow)",
    ),
    flag(
        "profile_in_predict",
        "--mode=predict --predict_csv=t.csv --profile_steps=2,4",
        "--profile_steps traces training steps; use it with --mode=train or --mode=compare, not "
        "--mode=predict",
    ),
    flag(
        "init_weights_in_predict",
        "--mode=predict --predict_csv=t.csv --init_weights=w.h5",
        "--init_weights sets the weights a training run starts from; --mode=predict restores the "
        "weights of --model_dir's checkpoints: use it with --mode=train or --mode=compare, or "
        "drop it",
    ),
    flag(
        "init_from_in_predict",
        "--mode=predict --predict_csv=t.csv --init_from=other",
        "--init_from sets the weights a training run starts from; --mode=predict restores the "
        "weights of --model_dir's checkpoints: use it with --mode=train or --mode=compare",
    ),
    flag(
        "pretrained_in_a_benchmark",
        "--mode=benchmark --model=resnet50 --pretrained=imagenet",
        "--pretrained sets the weights a training run starts from; --mode=benchmark times the "
        "training step whatever weights it starts from: use it with --mode=train or "
        "--mode=compare, or drop it",
    ),
    flag(
        "freeze_steps_in_a_benchmark",
        "--mode=benchmark --freeze_steps=5",
        "--freeze_steps trains only the head for a training run's first steps; --mode=benchmark "
        "times the step that trains every layer: use it with --mode=train or --mode=compare, or "
        "drop it",
    ),
    flag(
        "fp8_recipe_without_float8",
        "--precision=mixed_bf16 --fp8_recipe=block",
        "--fp8_recipe applies only to --precision=mixed_fp8; --precision=mixed_bf16 has no "
        "float8 matmuls: drop it",
    ),
    flag(
        "amax_history_of_the_current_recipe",
        "--model=vit_test --precision=mixed_fp8 --fp8_amax_history=16",
        "--fp8_amax_history applies only to --fp8_recipe=delayed; --fp8_recipe=current keeps no "
        "amax history: drop it",
    ),
    flag(
        "freeze_steps_in_predict",
        "--mode=predict --predict_csv=t.csv --freeze_steps=5",
        "--freeze_steps trains only the head for a training run's first steps; --mode=predict "
        "trains nothing: use it with --mode=train or --mode=compare, or drop it",
    ),
]

START_UP_PATHS = [
    flag(
        "cache_in_a_missing_folder",
        "--cache={tmp}/new/",
        "--cache={tmp}/new/: folder {tmp}/new does not exist; create it, or use --cache=memory or "
        "--cache=",
    ),
    flag(
        "cache_prefix_in_a_missing_folder",
        "--cache=/no/such/dir/c",
        "--cache=/no/such/dir/c: folder /no/such/dir does not exist",
    ),
    flag(
        "remote_cache",
        "--cache=gs://bucket/dir",
        "--cache=gs://bucket/dir: a decoded cache must be on a local disk (gs:// is remote; each "
        "step reads its images from it by index): give a local folder, e.g. --cache=/tmp/cache/, "
        "or use --cache=memory, or --cache= to decode at every step",
    ),
    flag(
        "benchmark_json_in_a_missing_folder",
        "--benchmark_json=/nonexistent/x.json",
        "folder /nonexistent does not exist; create it",
    ),
    flag(
        "benchmark_json_under_a_file",
        "--benchmark_json={tmp}/afile/b.json",
        "{tmp}/afile is a file, not a folder",
        setup=_write("afile", "mine"),
    ),
    flag(
        "predictions_csv_a_folder",
        "--predictions_csv={tmp}",
        "--predictions_csv={tmp} is a folder; give a file path",
    ),
    flag(
        "export_dir_a_file",
        "--export_dir={tmp}/afile",
        "--export_dir={tmp}/afile is a file; give a folder path",
        setup=_write("afile", "mine"),
    ),
    flag(
        "export_dir_under_a_file",
        "--export_dir={tmp}/afile/export",
        "{tmp}/afile is a file, so the folder cannot be made",
        setup=_write("afile", "mine"),
    ),
    *(
        flag(
            f"export_dir_linking_to_nothing{suffix.replace('/', '_slash')}",
            f"--export_dir={{tmp}}/export{suffix}",
            "{tmp}/export is a symbolic link to {tmp}/missing, which does not exist",
            setup=_dangling_export_link,
        )
        for suffix in ("", "/", "/sub")  # a trailing separator must not hide the link
    ),
    # Unwritable for root too: /proc takes no new file, though os.access says it does.
    flag(
        "unwritable_export_dir",
        "--export_dir=/proc/export",
        "--export_dir=/proc/export: cannot write in /proc (No such file or directory); give a "
        "folder you can write to",
    ),
    flag(
        "unwritable_cache_folder",
        "--cache=/proc/",
        "--cache=/proc/: cannot write in /proc (No such file or directory); give a folder you can "
        "write to, or use --cache=",
    ),
    flag(
        "missing_init_weights_file",
        "--init_weights={tmp}/missing.h5",
        "--init_weights={tmp}/missing.h5: no such file; name a Keras weights file",
    ),
    flag(
        "missing_init_from_folder",
        "--init_from={tmp}/nothing",
        "--init_from={tmp}/nothing: no such folder; name the --model_dir of a finished training "
        "run",
    ),
]

DATA = [
    late(
        "corrupt_image",
        "--dataset=folder:{tmp}/data",
        "cannot decode image {tmp}/data/train/red/img0_0.jpg in folder:{tmp}/data train: corrupt, "
        "truncated or not a JPEG/PNG; fix or remove it, or pass --skip_bad_images",
        setup=_corrupt_one,
    ),
    late(
        "every_image_undecodable",
        "--dataset=folder:{tmp}/data --skip_bad_images",
        "folder:{tmp}/data: every train image was undecodable",
        setup=lambda p: _corrupt_images(p, "*/*"),
    ),
    late(
        "a_class_left_without_images",
        "--dataset=folder:{tmp}/data --skip_bad_images",
        "class red has no training image left",
        setup=lambda p: _corrupt_images(p, "red/*"),
    ),
    # The image breaks after the start-up check passed it: the driver's check passes it.
    late(
        "an_image_broken_after_the_check",
        "--dataset=folder:{tmp}/data --model_dir={tmp}/new",
        "image {tmp}/data/train/red/img0_0.jpg can no longer be read or decoded (it passed the "
        "check at start-up)",
        setup=_corrupt_one,
        patch=("passed_at_start_up", ""),
        creates="{tmp}/new",
    ),
    # Root lists any folder whatever its mode: the driver makes listing this one
    # fail with EACCES, as it fails for a user without read permission.
    late(
        "unreadable_class_subfolder",
        "--dataset=folder:{tmp}/data",
        "cannot list {tmp}/data/train/red/locked (Permission denied); make it readable",
        setup=_unlistable_subfolder,
        patch=("unlistable", "{tmp}/data/train/red/locked"),
    ),
    late(
        "missing_train_split_folder",
        "--dataset=folder:{tmp}/photos",
        "--dataset=folder:{tmp}/photos: {tmp}/photos/train is not a folder; expected "
        "{tmp}/photos/train/<class>/*.jpg (see --train_split)",
    ),
    late(
        "no_class_folders",
        "--dataset=folder:{tmp}/data",
        "{tmp}/data/train has no class folders",
        setup=_mkdir("data/train"),
    ),
    late(
        "eval_class_not_in_train",
        "--dataset=folder:{tmp}/data",
        "class folder {tmp}/data/val/blue is not a class of the train split (green, red); rename "
        "or remove it",
        setup=_eval_class_not_in_train,
    ),
    late(
        "class_folder_without_images",
        "--dataset=folder:{tmp}/data",
        "class folder {tmp}/data/train/blue has no .jpg/.jpeg/.png images",
        setup=_class_without_images,
    ),
    late(
        "missing_eval_split_folder",
        "--dataset=folder:{tmp}/data --eval_split=nope",
        "--eval_split=nope: {tmp}/data/nope is not a folder",
        setup=_tree,
    ),
    late(
        "hold_out_without_images",
        "--dataset=folder:{tmp}/data",
        "the eval split has no images; add images: the hold-out gives eval an image only from a "
        "class with at least 2",
        setup=lambda p: _tree(p, per_class=1),
    ),
    # Over the budget honestly: a few images, at a size no memory holds decoded.
    late(
        "cache_memory_over_the_budget",
        "--dataset=folder:{tmp}/data --cache=memory --image_size=200000",
        "--cache=memory for folder:{tmp}/data: 12 images decoded at 225000 px take 1822.50 GB, "
        "...; use --cache=auto or --cache= to stream the images from their files",
        setup=_tree,
    ),
    late(
        "generated_set_over_the_budget",
        "--train_examples=1000000000",
        "--dataset=shapes: 1000000000 generated examples at 32 px take 12288.00 GB, generating "
        "them peaks near ...: lower --train_examples or --image_size",
    ),
    late(
        "ships_csv_missing",
        "--dataset=ships:{tmp}/ships",
        "{tmp}/ships/train/train.csv does not exist; expected a CSV with columns image,category",
        setup=_ships_without_csv,
    ),
    late(
        "ships_csv_without_category",
        "--dataset=ships:{tmp}/ships",
        "lacks column(s) category; its header must include image,category (found image,label)",
        setup=_ships_csv([("0.jpg", 1)], header=("image", "label")),
    ),
    late(
        "ships_image_missing",
        "--dataset=ships:{tmp}/ships",
        "line 2: image 'gone.jpg' does not exist in {tmp}/ships/train/images",
        setup=_ships_csv([("gone.jpg", 1)]),
    ),
    late(
        "ships_unknown_category",
        "--dataset=ships:{tmp}/ships",
        "line 2: unknown category '9'; categories are 1 = Cargo",
        setup=_ships_csv([("0.jpg", 9)]),
    ),
    late(
        "ships_image_twice",
        "--dataset=ships:{tmp}/ships",
        "line 3: image '0.jpg' is listed twice",
        setup=_ships_csv([("0.jpg", 1), ("0.jpg", 1)]),
    ),
    late(
        "ships_csv_without_rows",
        "--dataset=ships:{tmp}/ships",
        "train.csv has no rows; the train split is empty",
        setup=_ships_csv([]),
    ),
    late(
        "ships_without_images_folder",
        "--dataset=ships:{tmp}",
        "--dataset=ships:{tmp}: {tmp}/train/images is not a folder",
    ),
]

# The local TFDS set of tests/tfds_sets.py, prepared as ArrayRecord (read through
# tfds.data_source) and as TFRecord (read through tfds.load): one reader each.
TFDS = [
    *(
        late(
            f"tfds_split_{what}{suffix}",
            f"--dataset=tfds:colour_shapes --data_dir={{{data_dir}}} --train_split={split}",
            f"--dataset=tfds:colour_shapes: --train_split={split} cannot be read ({reason}); see "
            "https://www.tensorflow.org/datasets/splits for how to write one, e.g. train[:90%]",
        )
        for suffix, data_dir in (("", "tfds"), ("_tfrecord", "tfds_tfrecord"))
        for what, split, reason in (
            (
                "past_100_percent",
                "train[:200%]",
                "When unit=%, percent slice boundaries should be in [-100, 100]. Got: ...",
            ),
            ("malformed", "train[abc]", "Unrecognized split format: 'train[abc]'."),
        )
    ),
    late(
        "tfds_unknown_eval_split",
        "--dataset=tfds:colour_shapes --data_dir={tfds} --eval_split=nosuch",
        "--dataset=tfds:colour_shapes: --eval_split=nosuch cannot be read (Unknown split "
        "'nosuch'. Should be one of ['train', 'test'].); see https://www.tensorflow.org/datasets/",
    ),
    late(
        "tfds_empty_train_split",
        "--dataset=tfds:colour_shapes --data_dir={tfds_tfrecord} --train_split=train[:0]",
        "--dataset=tfds:colour_shapes: --train_split=train[:0] selects no example; choose a split "
        "or a slice that holds some",
    ),
    late(
        "tfds_unknown_name",
        "--dataset=tfds:no_such_set --data_dir={tmp}",
        "--dataset=tfds:no_such_set: TFDS has no data set called 'no_such_set'; see "
        "https://www.tensorflow.org/datasets/catalog for the names",
    ),
    # Known to TFDS without a download: its information is in TFDS' code.
    late(
        "tfds_not_image_classification",
        "--dataset=tfds:imdb_reviews --data_dir={tmp}",
        "--dataset=tfds:imdb_reviews is not an image classification data set (its supervised "
        "keys are ('text', 'label')); choose one with (image, label) pairs",
    ),
]

CACHES = [
    late(
        "damaged_decoded_cache",
        (*RESUME, "--cache={cache}/"),
        "--cache={cache}/: the cache file {cache}/cache-....array_record is damaged (unreadable "
        "(no footer)); delete it to rebuild it, or use --cache= to decode at every step",
        setup=_truncate("cache/*.array_record"),
    ),
    late(
        "locked_eval_cache",
        (*RESUME, "--cache={cache}/"),
        "--cache={cache}/: {cache}/cache-..._0.lockfile locks its cache file; ... delete "
        "{cache}/cache-...* (the lock and the partial cache), or use another --cache",
        setup=_locked_eval_cache,
    ),
    late(
        "damaged_eval_cache",
        (*RESUME, "--cache={cache}/"),
        "--cache={cache}/: the cache files are damaged (...); delete {cache}/cache-...* to "
        "rebuild them, or use --cache=memory",
        setup=_truncate("cache/*.data-*"),
    ),
    # No disk is filled: the driver's `shutil.disk_usage` reports 8,000 bytes free there.
    late(
        "no_disk_room_for_the_cache",
        (*RESUME, "--cache={tmp}/new/"),
        "--cache={tmp}/new/: the decoded images need 0.00 GB and {tmp}/new has 0.00 GB free",
        setup=_mkdir("new"),
        patch=("full_disk", "{tmp}/new"),
    ),
    # The real ArrayRecord writer, failing after 3 records as it does on a full disk.
    late(
        "failed_cache_write",
        (*RESUME, "--cache={tmp}/new/"),
        "write() failed: No space left on device; free some space or give another folder",
        setup=_mkdir("new"),
        patch=("failing_cache_writer", ""),
    ),
    # The array_record package made missing in the driver, with the cache on disk.
    late(
        "cache_reader_missing",
        (*RESUME, "--cache={cache}/"),
        "the array_record package is missing: pip install array_record",
        patch=("no_array_record", ""),
    ),
]

CHECKPOINTS = [
    late(
        "index_cannot_be_rewritten",
        RESUME,
        "cannot rewrite {run}/checkpoints/checkpoint (...Is a directory); make "
        "{run}/checkpoints writable",
        setup=_index_as_folder,
    ),
    late(
        "fresh_over_checkpoints",
        (*RESUME, "--fresh"),
        "--fresh: --model_dir={run} already holds checkpoints; add --overwrite",
    ),
    # Root writes anywhere chmod allows nothing: the driver refuses the writes and
    # deletions of this folder as a read-only mount does (see its `read_only`).
    late(
        "fresh_overwrite_read_only",
        (*RESUME, "--fresh", "--overwrite"),
        "--fresh --overwrite: cannot delete {run}/checkpoints ([Errno 30] Read-only file system",
        patch=("read_only", "{run}"),
    ),
    # The same read-only folder met by a resume: its test file cannot be made.
    late(
        "read_only_model_dir",
        RESUME,
        "--model_dir={run}: cannot write in {run} (",
        patch=("read_only", "{run}"),
    ),
    late(
        "model_dir_a_file",
        (*RESUME, "--model_dir={tmp}/afile"),
        "--model_dir={tmp}/afile: cannot create {tmp}/afile/checkpoints",
        setup=_write("afile", "mine"),
    ),
    # classes.json edited: ships' classes are fixed, so no tree of ours can change them.
    late(
        "other_classes_on_resume",
        RESUME,
        "has other classes than the checkpoints in {run}/checkpoints (class Freight is now Cargo;",
        setup=_edit_json("classes.json", lambda c: ["Freight", *c[1:]]),
    ),
    late(
        "resume_with_another_batch",
        (*RESUME, "--batch_size=4"),
        "--batch_size=4 does not match the checkpoints in {run}/checkpoints (written with "
        "--batch_size=8)",
    ),
    late(
        "unreadable_config_json",
        RESUME,
        "{run}/checkpoints/config.json is unreadable (...); it records the flags the checkpoints "
        "were written with: restore it, or delete it to resume without this check",
        setup=_write("run/checkpoints/config.json", '{"model": "tin'),
    ),
    late(
        "no_checkpoint_restorable",
        RESUME,
        "no checkpoint in {run}/checkpoints can be restored (ckpt-4: ...); repair or move them "
        "away, or start again with --fresh --overwrite",
        setup=_remove("run/checkpoints/ckpt-*.data-*"),
    ),
    late(
        "checkpoints_of_another_model",
        (*RESUME, "--model=vit_test"),  # config.json, which would refuse it first, is gone
        "the checkpoints in {run}/checkpoints were written by a differently built run (ckpt-4: "
        "...); resume with the flags in {run}/checkpoints/config.json, or train in another",
        setup=_remove("run/checkpoints/config.json"),
    ),
    late(
        "batch_not_divisible_by_replicas",
        (*RESUME, "--strategy=mirrored", "--batch_size=15"),
        "--batch_size (15) must be a multiple of the 2 replica(s) x --grad_accum_steps (1)",
    ),
    late(
        "eval_batch_not_divisible_by_replicas",
        (*RESUME, "--strategy=mirrored", "--eval_batch_size=15"),
        "--eval_batch_size (15) must be a multiple of the 2 replica(s)",
    ),
    late(
        "inject_into_no_variable",
        (*RESUME, "--inject_nonfinite=3@nosuchvar"),
        "--inject_nonfinite: no trainable variable's path contains 'nosuchvar'",
    ),
]

STARTING_WEIGHTS = [
    late(
        "init_weights_not_a_weights_file",
        (*FINISHED, "--init_weights={tmp}/w.h5", "--model_dir={tmp}/new"),
        "--init_weights={tmp}/w.h5: cannot read {tmp}/w.h5 as a Keras weights file",
        setup=_write("w.h5", "not HDF5"),
        creates="{tmp}/new",
    ),
    # No download is tried: the driver's `keras.utils.get_file` fails as it does offline.
    late(
        "pretrained_without_network",
        ("--model=resnet50", "--pretrained=imagenet", "--train_steps=1", "--model_dir={tmp}/new"),
        "--pretrained=imagenet: cannot fetch resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5 "
        "(URL fetch failure...); download https://storage.googleapis.com/...notop.h5 and put it "
        "in {tmp}/keras/models/, or pass --init_weights=FILE",
        patch=("no_network", ""),
        env=(("KERAS_HOME", "{tmp}/keras"),),
        creates="{tmp}/new",
    ),
    late(
        "init_weights_of_another_model",
        (*FINISHED, "--init_weights={weights}", "--model_dir={tmp}/new"),
        "--init_weights={weights}: {weights} does not fit the model: ...; use a file saved from "
        "--model's layers",
        creates="{tmp}/new",
    ),
    late(
        "init_from_an_empty_folder",
        (*FINISHED, "--init_from={tmp}/empty", "--model_dir={tmp}/new"),
        "--init_from={tmp}/empty holds no run",
        setup=_mkdir("empty"),
        creates="{tmp}/new",
    ),
    late(
        "init_from_another_size",
        (*FINISHED, "--image_size=24", "--init_from={run}", "--model_dir={tmp}/new"),
        "--init_from={run} was trained with --image_size=16, not --image_size=24",
        creates="{tmp}/new",
    ),
    late(
        "init_from_damaged_run",
        (*FINISHED, "--init_from={run}", "--model_dir={tmp}/new"),
        "--init_from={run}: cannot restore {run}/checkpoints/ckpt-4 (",
        setup=_truncate("run/checkpoints/ckpt-*.data-*"),
        creates="{tmp}/new",
    ),
]

PREDICTIONS = [
    late(
        "predict_csv_a_folder",
        ("--mode=predict", "--predict_csv={ships}/train"),
        "{ships}/train is a folder; expected a CSV with columns image",
    ),
    late(
        "predict_csv_without_rows",
        ("--mode=predict", "--predict_csv={tmp}/t.csv"),
        "{tmp}/t.csv has no rows; nothing to predict",
        setup=_write("t.csv", "image\n"),
    ),
    late(
        "predict_over_its_input",
        (*PREDICT, "--predictions_csv={ships}/test.csv"),
        "--predictions_csv={ships}/test.csv is the input --predict_csv",
    ),
    late(
        "predict_into_the_checkpoints",
        (*PREDICT, "--predictions_csv={run}/checkpoints/ckpt-4.index"),
        "--predictions_csv={run}/checkpoints/ckpt-4.index is inside the checkpoint folder "
        "{run}/checkpoints; writing there could destroy the trained model",
    ),
    late(
        "predict_over_a_file_of_the_run",
        (*PREDICT, "--predictions_csv={run}/flags.txt"),
        "--predictions_csv={run}/flags.txt would replace {run}/flags.txt, a file of the run",
    ),
    late(
        "default_predictions_csv_a_folder",
        PREDICT,
        "--predictions_csv={run}/predictions.csv is a folder; give a file path",
        setup=_mkdir("run/predictions.csv"),
    ),
    late(
        "predict_with_another_model",
        (*PREDICT, "--model=vit_test"),
        "--model=vit_test differs from --model=tiny, which the run in --model_dir={run} was "
        "trained",
    ),
    late(
        "predict_from_a_folder_data_set",
        (*PREDICT, "--dataset=folder:{tmp}"),
        "--mode=predict reads a ships test CSV; use --dataset=ships:PATH",
    ),
    # config.json edited: a run trained on shapes, as far as predict can tell.
    late(
        "predict_with_a_run_of_shapes",
        PREDICT,
        "--model_dir={run} was trained on --dataset=shapes, but --mode=predict labels ship "
        "categories",
        setup=_edit_json("config.json", lambda c: {**c, "dataset": "shapes"}),
    ),
    late(
        "predict_without_checkpoints",
        PREDICT,
        "--model_dir={run} has no checkpoint in {run}/checkpoints; train first with --mode=train",
        setup=_remove("run/checkpoints/ckpt-*", "run/checkpoints/checkpoint"),
    ),
    late(
        "predict_with_a_checkpoint_that_does_not_fit",
        (*PREDICT, "--dataset=ships:{ships}", "--model=vit_test", "--image_size=16"),
        "checkpoint {run}/checkpoints/ckpt-4 does not fit --model=vit_test --image_size=16",
        setup=_remove("run/checkpoints/config.json"),
    ),
    late(
        "predict_with_damaged_checkpoints",
        PREDICT,
        "no checkpoint in {run}/checkpoints can be read (ckpt-4: ...)",
        setup=_truncate("run/checkpoints/ckpt-*.data-*"),
    ),
    late(
        "predict_with_no_decodable_image",
        (
            "--mode=predict",
            "--dataset=ships:{tmp}/ships",
            "--predict_csv={tmp}/ships/test.csv",
            "--skip_bad_images",
        ),
        "--predict_csv={tmp}/ships/test.csv: no image could be decoded",
        setup=_predict_csv_of_corrupt_images,
    ),
]

# The export is written after training: a mistake found there keeps the checkpoints.
EXPORTS = [
    # No disk is filled: the driver's tf.saved_model.save fails there as on a full disk.
    late(
        "compare_export_without_room",
        "--mode=compare --compare=fp32 --model=tiny --image_size=16 --batch_size=8 "
        "--steps_per_loop=2 --train_steps=2 --train_examples=64 --eval_examples=32 "
        "--model_dir={tmp}/runs --export_dir={tmp}/runs/exp",
        "fp32: the SavedModel could not be written to {tmp}/runs/exp/fp32: [Errno 28] No space "
        "left on device; the last step's checkpoint is saved: fix the folder, then rerun the "
        "same command to export it",
        patch=("no_room_for_exports", "{tmp}/runs/exp"),
        creates="{tmp}/runs",
    ),
]

INPUT_BENCHMARK = [
    flag(
        "input_benchmark_with_too_few_images",
        "--mode=input_benchmark --num_images=3",
        "--num_images must be at least 10 (two of each of five classes), got 3",
        model_dir=False,
    ),
    flag(
        "fit_peer_outside_the_benchmark",
        "--mode=compare --fit_scaling=engine",
        "--fit_scaling applies only to --mode=benchmark; --mode=compare runs no fit peer: drop it",
    ),
    flag(
        "input_benchmark_options_in_training",
        "--num_images=100 --pipeline_batches=5",
        "--num_images, --pipeline_batches apply only to --mode=input_benchmark; --mode=train "
        "times no pipeline: drop them",
    ),
    late(
        "input_benchmark_without_its_data",
        "--mode=input_benchmark --dataset=folder:{tmp}/photos",
        "--dataset=folder:{tmp}/photos: {tmp}/photos/train is not a folder",
        model_dir=False,
    ),
]

MISTAKES = (
    FLAG_VALUES
    + OUT_OF_SCOPE
    + START_UP_PATHS
    + DATA
    + TFDS
    + CACHES
    + CHECKPOINTS
    + STARTING_WEIGHTS
    + PREDICTIONS
    + EXPORTS
    + INPUT_BENCHMARK
)


# --- running the table ---------------------------------------------------------

DRIVER = os.path.join(ROOT, "tests", "mistakes_driver.py")


def _digest(folder):
    """{relative path: what it is} under `folder`: each file's size and SHA-1, links, folders."""
    found = {}
    for parent, folders, files in os.walk(folder):  # symbolic links are not followed
        for name in folders + files:
            path = os.path.join(parent, name)
            key = os.path.relpath(path, folder)
            if os.path.islink(path):
                found[key] = ("link", os.readlink(path))
            elif os.path.isdir(path):
                found[key] = ("folder",)
            else:
                with open(path, "rb") as f:
                    data = f.read()
                found[key] = ("file", len(data), hashlib.sha1(data).hexdigest())
    return found


@dataclasses.dataclass
class Prepared:
    """A mistake made ready in its folder: the job to run, and the folder's files before it."""

    mistake: Mistake
    folder: pathlib.Path
    job: dict
    says: str
    creates: str
    before: dict = None


def _prepare(mistake, folder, shared, finished):
    """Makes `mistake`'s folder: the finished run's copies it names, then its own setup."""
    folder.mkdir(parents=True)
    paths = types.SimpleNamespace(tmp=folder, run=folder / "run", cache=folder / "cache", **shared)
    fields = {name: str(path) for name, path in vars(paths).items()}
    args = [arg.format(**fields) for arg in mistake.args]
    if mistake.model_dir and not any(arg.startswith("--model_dir=") for arg in args):
        args.append(f"--model_dir={paths.run}")
    patch = [part.format(**fields) for part in mistake.patch]
    env = {name: value.format(**fields) for name, value in mistake.env}
    named = " ".join([*args, *patch, *env.values()])
    for copy, source in ((paths.run, finished.run), (paths.cache, finished.cache)):
        if str(copy) in named:
            shutil.copytree(source, copy, symlinks=True)
    if mistake.setup:
        mistake.setup(paths)
    job = dict(kind="main", args=args, cwd=str(folder), env=env, patch=patch)
    prepared = Prepared(
        mistake, folder, job, mistake.says.format(**fields), mistake.creates.format(**fields)
    )
    prepared.before = _digest(folder)
    return prepared


def _run_process(prepared):
    """Runs a mistake found before TensorFlow loads as its own process, as a user would."""
    job = prepared.job
    proc = subprocess.run(
        [sys.executable, *prepared.mistake.command, *job["args"]],
        cwd=job["cwd"],
        env={**os.environ, "PYTHONPATH": ROOT, **job["env"]},  # this tree's modules, not another's
        capture_output=True,
        text=True,
        timeout=120,
    )
    return dict(status=proc.returncode, stdout=proc.stdout, stderr=proc.stderr, traceback=None)


class _Driver:
    """tests/mistakes_driver.py: sends it batches of jobs, reads one answer line per batch."""

    def __init__(self, log_path, *args):
        import queue
        import threading

        self.log_path = log_path
        self.log = open(log_path, "w")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            [sys.executable, DRIVER, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            cwd=ROOT,
        )
        self.answers = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.answers.put(line)
        self.answers.put("")  # the driver ended

    def send(self, jobs):
        self.proc.stdin.write(json.dumps(jobs) + "\n")
        self.proc.stdin.flush()

    def receive(self, timeout):
        import queue

        try:
            line = self.answers.get(timeout=timeout)
        except queue.Empty:
            line = ""
        if not line:
            self.close()
            with open(self.log_path) as f:
                pytest.fail(f"the driver gave no answer within {timeout} s:\n{f.read()[-3000:]}")
        return json.loads(line)

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _selected(request):
    """The mistakes of the table the session runs (all of them, unless some were deselected)."""
    chosen = {
        item.callspec.params["mistake"].id
        for item in request.session.items
        if "mistake" in getattr(getattr(item, "callspec", None), "params", {})
    }
    return [m for m in MISTAKES if m.id in chosen] or MISTAKES


def _make_shared(root, driver, mistakes):
    """The finished run (trained by the driver), the ships tree and TFDS sets entries share."""
    shared = dict(ships=root / "ships", tfds=root / "tfds", tfds_tfrecord=root / "tfds_tfrecord")
    shared["weights"] = root / "small_resnet.weights.h5"
    make_ships_tree(shared["ships"])
    finished = types.SimpleNamespace(run=root / "finished", cache=root / "finished_cache")
    finished.cache.mkdir()
    fields = {name: str(path) for name, path in shared.items()}
    args = [a.format(**fields) for a in FINISHED]
    args += [f"--cache={finished.cache}/", f"--model_dir={finished.run}"]
    jobs = [dict(kind="main", args=args, cwd=str(root))]
    if any("{tfds" in " ".join(m.args) for m in mistakes):
        jobs += [
            dict(kind="tfds", dir=str(shared["tfds"]), format="array_record"),
            dict(kind="tfds", dir=str(shared["tfds_tfrecord"]), format="tfrecord"),
        ]
    if any("{weights}" in " ".join(m.args) for m in mistakes):
        jobs.append(dict(kind="weights", model="small_resnet", path=str(shared["weights"])))
    driver.send(jobs)
    trained = driver.receive(timeout=300)[0]
    assert trained["status"] == 0, trained["stderr"][-3000:] + str(trained["traceback"])
    return shared, finished


def _run_all(prepared, drivers):
    """{mistake id: result}: each mistake run where it belongs, the three kinds at once."""
    late = [p for p in prepared if p.mistake.tf]
    early = [p for p in prepared if not p.mistake.tf and p.mistake.command == (MAIN,)]
    others = [p for p in prepared if not p.mistake.tf and p.mistake.command != (MAIN,)]
    drivers["tensorflow"].send([p.job for p in late])
    drivers["early"].send([p.job for p in early])
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # other commands, beside the drivers
        ran = pool.map(_run_process, others)
        results = {p.mistake.id: result for p, result in zip(others, ran, strict=True)}
    for batch, driver in ((early, drivers["early"]), (late, drivers["tensorflow"])):
        answers = driver.receive(timeout=900)
        results.update(zip((p.mistake.id for p in batch), answers, strict=True))
    return results


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, request):
    """{mistake id: (Prepared, result, the folder's files after)}, and "shared": (before, after)."""
    root = tmp_path_factory.mktemp("mistakes")
    mistakes = _selected(request)
    # One driver loads TensorFlow; the other runs the mistakes refused before it loads.
    drivers = {
        "tensorflow": _Driver(root / "driver.log", "--tensorflow"),
        "early": _Driver(root / "early.log"),
    }
    try:
        shared, finished = _make_shared(root, drivers["tensorflow"], mistakes)
        untouched = {**shared, "finished": finished.run, "finished_cache": finished.cache}
        shared_before = {name: _digest(path) for name, path in untouched.items()}
        prepared = [_prepare(m, root / "entries" / m.id, shared, finished) for m in mistakes]
        results = _run_all(prepared, drivers)
    finally:
        for driver in drivers.values():
            driver.close()
    found = {p.mistake.id: (p, results[p.mistake.id], _digest(p.folder)) for p in prepared}
    found["shared"] = (shared_before, {name: _digest(path) for name, path in untouched.items()})
    return found


def _says(pattern, line):
    """Whether `line` holds `pattern`, each `...` in it standing for any text."""
    return re.search(".*".join(re.escape(part) for part in pattern.split("...")), line)


def _without(files, created):
    """`files` without those under `created` (a path relative to their folder), if given."""
    if not created:
        return files
    return {k: v for k, v in files.items() if k != created and not k.startswith(created + os.sep)}


@pytest.mark.parametrize("mistake", MISTAKES, ids=lambda m: m.id)
def test_a_mistake_is_one_error_line_exit_2_and_loses_nothing(mistake, outcomes):
    prepared, result, after = outcomes[mistake.id]
    output = result["stdout"] + result["stderr"]
    assert result["traceback"] is None, result["traceback"]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in result["stderr"].splitlines() if line.startswith("error:")]
    assert result["status"] == 2 and len(errors) == 1, (result["status"], output[-3000:])
    assert errors[0].startswith("error: ") and _says(prepared.says, errors[0]), errors[0]
    if not mistake.tf and mistake.command == (MAIN,):
        assert not result["tensorflow"], "refused only after TensorFlow loaded"
    created = os.path.relpath(prepared.creates, prepared.folder) if prepared.creates else ""
    assert _without(after, created) == prepared.before


def test_the_shared_data_and_the_finished_run_are_left_as_they_were(outcomes):
    before, after = outcomes["shared"]
    assert before["finished"] and before["ships"]  # something to compare
    assert after == before


# --- every place that raises a user error ----------------------------------------

# Every place in main.py, engine/, input_pipeline/ and models/ that raises a user
# error (or prints one: `_fail`), as "file:function#n", its n-th in that function
# in source order, with the entries of the table that reach it, or the test that
# proves it end to end elsewhere, or why the command line cannot reach it.
RAISE_SITES = {
    "main.py:_parse_flags#1": ("unknown_flag", "missing_flagfile", "unknown_precision"),
    "main.py:main#1": ("stray_arguments",),
    "main.py:main#2": ("zero_batch", "remote_cache", "unwritable_export_dir"),
    "main.py:main#3": ("corrupt_image", "fresh_over_checkpoints", "compare_export_without_room"),
    "main.py:main#4": "not a mistake (exit 3): tests/test_compare.py::"
    "test_compare_goes_on_after_a_divergence_and_exits_3",
    "main.py:main#5": "not a mistake (exit 128 + signal): tests/test_resume.py::"
    "test_a_stop_signal_during_start_up_is_one_line_and_the_run_still_resumes",
    "engine/actions/divergence.py:__call__#1": "not a mistake (exit 3): tests/test_resume.py::"
    "test_forced_divergence_exits_3_and_keeps_the_last_good_checkpoint",
    "engine/modes/compare.py:compare#2": "not a mistake (exit 3): tests/test_compare.py::"
    "test_compare_goes_on_after_a_divergence_and_exits_3",
    "engine/actions/preemption.py:handler#1": "not a mistake (exit 128 + SIGTERM): "
    "tests/test_resume.py::test_a_stop_signal_during_start_up_is_one_line_and_the_run_still_resumes",
    "engine/checkpoints.py:_repair_index#1": ("index_cannot_be_rewritten",),
    "engine/checkpoints.py:prepare_model_dir#1": ("fresh_over_checkpoints",),
    "engine/checkpoints.py:prepare_model_dir#2": ("fresh_overwrite_read_only",),
    "engine/checkpoints.py:prepare_model_dir#3": ("model_dir_a_file",),
    "engine/checkpoints.py:check_writable#1": ("read_only_model_dir",),
    "engine/checkpoints.py:check_classes#1": ("other_classes_on_resume",),
    "engine/checkpoints.py:check_compatible#1": ("resume_with_another_batch",),
    "engine/checkpoints.py:_load_json#1": ("unreadable_config_json",),
    "engine/checkpoints.py:restore_latest#1": ("checkpoints_of_another_model",),
    "engine/checkpoints.py:restore_latest#2": ("no_checkpoint_restorable",),
    "engine/actions/export.py:export_saved_model#1": "elsewhere: tests/test_export.py::"
    "test_an_export_that_cannot_be_written_is_one_error_line_and_a_rerun_exports "
    "(--mode=train; --mode=compare: compare_export_without_room)",
    "engine/validation.py:refuse_out_of_scope#1": tuple(m.id for m in OUT_OF_SCOPE[2:]),
    "engine/validation.py:_check_dataset#1": ("unknown_dataset",),
    "engine/validation.py:_check_dataset#2": ("dataset_without_a_path",),
    "engine/validation.py:_check_counts#1": ("seed_past_32_bits", "negative_warmup"),
    "engine/validation.py:_check_counts#2": ("no_epochs_or_steps",),
    "engine/validation.py:_check_counts#3": ("image_size_below_8",),
    "engine/validation.py:_check_patch_size#1": ("patch_size_on_a_resnet",),
    "engine/validation.py:_check_patch_size#2": ("patch_size_not_dividing",),
    "engine/validation.py:_check_benchmark_and_profile#1": ("zero_benchmark_repeats",),
    "engine/validation.py:_check_benchmark_and_profile#2": ("input_benchmark_with_too_few_images",),
    "engine/validation.py:_check_benchmark_and_profile#3": ("benchmark_steps_across_loops",),
    # main.py's flags with choices are enums: absl refuses a bad one first (unknown_model).
    "engine/validation.py:_check_choice#1": "in-process only: tests/test_mistakes.py::"
    "test_a_config_built_in_code_refuses_a_value_outside_its_choices",
    "engine/validation.py:_check_rates#1": ("learning_rate_past_float32", "infinite_learning_rate"),
    "engine/validation.py:_check_rates#2": ("infinite_clip_norm", "nan_weight_decay"),
    "engine/validation.py:_check_rates#3": ("beta_2_of_1",),
    "engine/validation.py:_check_rates#4": ("label_smoothing_of_1",),
    "engine/validation.py:_check_rates#5": ("stochastic_depth_on_a_resnet",),
    "engine/validation.py:_check_loss_scale#1": ("negative_loss_scale",),
    "engine/validation.py:_check_loss_scale#2": (
        "max_scale_past_float32",
        "min_scale_above_initial",
    ),
    "engine/validation.py:_check_real_data#1": ("eval_fraction_of_1",),
    "engine/validation.py:_check_real_data#2": ("empty_train_split",),
    "engine/validation.py:_check_real_data#3": ("predict_without_a_csv",),
    "engine/validation.py:_check_real_data#4": ("predict_without_model_dir",),
    "engine/validation.py:_check_checkpointing#1": (
        "negative_checkpoint_every",
        "negative_skip_limit",
    ),
    "engine/validation.py:_check_checkpointing#2": ("overwrite_without_fresh",),
    "engine/validation.py:_check_distribution#1": ("batch_not_split_by_micro_batches",),
    "engine/validation.py:_check_tensorboard#1": ("negative_summary_every",),
    "engine/validation.py:check_local_path#1": ("remote_benchmark_json", "remote_predictions_csv"),
    "engine/validation.py:_check_float8#1": ("float8_in_a_benchmark",),
    "engine/validation.py:_check_float8#2": ("float8_on_a_resnet", "float8_compared_on_a_resnet"),
    "engine/validation.py:_check_initialization#1": ("two_starting_weights",),
    "engine/validation.py:_check_initialization#2": ("pretrained_small_resnet",),
    # main.py's flags with choices are enums: absl refuses a bad one first (unknown_model).
    "engine/validation.py:_check_positive_int#1": (
        "zero_batch",
        "huge_image_size",
        "zero_cpu_devices",
    ),
    "engine/validation.py:parse_compare#1": ("unknown_compare_entry",),
    "engine/validation.py:parse_compare#2": ("compare_entry_twice",),
    "engine/validation.py:parse_inject_nonfinite#1": ("inject_step_past_int64",),
    "engine/validation.py:parse_profile_steps#1": ("profile_steps_backwards",),
    "engine/distribute.py:_configure_cpu_devices#1": "unreachable: main.py sets its devices "
    "before TensorFlow's runtime starts (tests/test_distribute.py runs --num_cpu_devices=1 and "
    "2 in fresh processes); a script that started TensorFlow first meets it",
    "engine/distribute.py:create_strategy#1": "unreachable: --strategy is an enum flag, "
    "refused by absl first (unknown_strategy)",
    "engine/distribute.py:create_strategy#2": "elsewhere: tests/test_distribute.py::"
    "test_a_worker_whose_port_is_taken_is_one_line",
    "engine/distribute.py:check_tf_config#1": "elsewhere: tests/test_distribute.py::"
    "test_multi_worker_without_a_cluster_is_one_line",
    "engine/distribute.py:check_tf_config#2": "elsewhere: tests/test_distribute.py::"
    "test_multi_worker_without_a_cluster_is_one_line",
    "engine/extras/inject.py:check_matches#1": ("inject_into_no_variable",),
    "engine/initialization.py:_load_file#1": (
        "init_weights_not_a_weights_file",
        "init_weights_of_another_model",
    ),
    "engine/initialization.py:pretrained_file#1": "unreachable: --pretrained is refused for "
    "any --model but resnet50 first (pretrained_small_resnet), and resnet50 has its weights",
    "engine/initialization.py:pretrained_file#2": ("pretrained_without_network",),
    "engine/initialization.py:_source_config#1": ("init_from_an_empty_folder",),
    "engine/initialization.py:_copy_from_run#1": ("init_from_another_size",),
    "engine/initialization.py:_copy_from_run#2": ("init_from_damaged_run",),
    "engine/modes/benchmark.py:_write_json#1": "in-process only: tests/test_benchmark.py::"
    "test_a_json_file_that_cannot_be_written_keeps_the_table (the folder, checked at start-up, "
    "must vanish while the benchmark's TensorFlow workers run: ~10 s each end to end)",
    "engine/modes/compare.py:compare#1": ("compare_export_without_room",),
    "engine/modes/predict.py:output_path#1": ("default_predictions_csv_a_folder",),
    "engine/modes/predict.py:output_path#2": ("predict_over_its_input",),
    "engine/modes/predict.py:output_path#3": ("predict_into_the_checkpoints",),
    "engine/modes/predict.py:output_path#4": ("predict_over_a_file_of_the_run",),
    "engine/modes/predict.py:with_run_settings#1": ("predict_with_another_model",),
    "engine/modes/predict.py:with_run_settings#2": ("predict_from_a_folder_data_set",),
    "engine/modes/predict.py:check_trained_on_ships#1": ("predict_with_a_run_of_shapes",),
    "engine/modes/predict.py:restore_model#1": ("predict_without_checkpoints",),
    "engine/modes/predict.py:restore_model#2": ("predict_with_a_checkpoint_that_does_not_fit",),
    "engine/modes/predict.py:restore_model#3": ("predict_with_damaged_checkpoints",),
    "engine/modes/predict.py:predict#1": ("predict_with_no_decodable_image",),
    "engine/preflight.py:_check_cache#1": ("remote_cache",),
    "engine/preflight.py:_check_cache#2": (
        "cache_in_a_missing_folder",
        "cache_prefix_in_a_missing_folder",
    ),
    "engine/preflight.py:_check_cache#3": ("unwritable_cache_folder",),
    "engine/preflight.py:_check_output_files#1": ("predictions_csv_a_folder",),
    "engine/preflight.py:_check_output_files#2": (
        "benchmark_json_in_a_missing_folder",
        "benchmark_json_under_a_file",
    ),
    "engine/preflight.py:_check_export_dir#1": ("export_dir_a_file",),
    "engine/preflight.py:_check_export_dir#2": (
        "export_dir_linking_to_nothing",
        "export_dir_linking_to_nothing_slash",
        "export_dir_linking_to_nothing_slashsub",
    ),
    "engine/preflight.py:_check_export_dir#3": ("export_dir_under_a_file",),
    "engine/preflight.py:_check_export_dir#4": ("unwritable_export_dir",),
    "engine/preflight.py:_check_initial_weights#1": ("missing_init_weights_file",),
    "engine/preflight.py:_check_initial_weights#2": ("missing_init_from_folder",),
    "engine/run.py:run#1": ("no_checkpoint_restorable", "checkpoints_of_another_model"),
    "engine/run.py:run#2": ("compare_export_without_room",),
    "engine/run.py:run#3": ("corrupt_image", "fresh_over_checkpoints"),
    "engine/train_run.py:check_batch_sizes#1": ("batch_not_divisible_by_replicas",),
    "engine/train_run.py:check_batch_sizes#2": ("eval_batch_not_divisible_by_replicas",),
    "engine/train_run.py:images_named_if_they_fail#1": ("an_image_broken_after_the_check",),
    "input_pipeline/datasets.py:_check_generated_size#1": ("generated_set_over_the_budget",),
    "input_pipeline/datasets.py:_decodable#1": ("hold_out_without_images",),
    "input_pipeline/datasets.py:_decodable#2": ("every_image_undecodable",),
    "input_pipeline/datasets.py:_decodable#3": ("a_class_left_without_images",),
    "input_pipeline/datasets.py:_tfds_data#1": "unreachable with a set that records its "
    "splits: tfds_source._check_split refuses an empty one first (tfds_empty_train_split)",
    "input_pipeline/folder.py:_unreadable#1": ("unreadable_class_subfolder",),
    "input_pipeline/folder.py:list_split#1": ("no_class_folders",),
    "input_pipeline/folder.py:list_split#2": ("eval_class_not_in_train",),
    "input_pipeline/folder.py:list_split#3": ("class_folder_without_images",),
    "input_pipeline/folder.py:_eval_dir#1": ("missing_eval_split_folder",),
    "input_pipeline/folder.py:load#1": ("missing_train_split_folder",),
    "input_pipeline/preprocessing.py:choose_cache#1": ("cache_memory_over_the_budget",),
    "input_pipeline/preprocessing.py:_cache#1": ("locked_eval_cache",),
    "input_pipeline/preprocessing.py:_record_cache#1": ("failed_cache_write",),
    "input_pipeline/preprocessing.py:_record_cache#2": ("damaged_decoded_cache",),
    "input_pipeline/preprocessing.py:_record_cache#3": ("cache_reader_missing",),
    "input_pipeline/preprocessing.py:_check_room#1": ("no_disk_room_for_the_cache",),
    "input_pipeline/preprocessing.py:_damage_is_an_error#1": ("damaged_eval_cache",),
    "input_pipeline/preprocessing.py:drop_undecodable#1": ("corrupt_image",),
    "input_pipeline/ships.py:_read_rows#1": ("ships_csv_missing", "predict_csv_a_folder"),
    "input_pipeline/ships.py:_read_rows#2": "elsewhere: tests/test_predict.py::"
    "test_a_csv_that_is_not_utf8_is_a_clear_error",
    "input_pipeline/ships.py:_read_rows#3": ("ships_csv_without_category",),
    "input_pipeline/ships.py:resolve_image#1": "elsewhere: tests/test_predict.py::"
    "test_main_bad_ships_csv_is_one_line_and_writes_nothing",
    "input_pipeline/ships.py:resolve_image#2": ("ships_image_missing",),
    "input_pipeline/ships.py:read_labelled#1": ("ships_unknown_category",),
    "input_pipeline/ships.py:read_labelled#2": ("ships_image_twice",),
    "input_pipeline/ships.py:read_labelled#3": ("ships_csv_without_rows",),
    "input_pipeline/ships.py:read_unlabelled#1": ("predict_csv_without_rows",),
    "input_pipeline/ships.py:load#1": ("ships_without_images_folder",),
    "input_pipeline/tfds_source.py:_builder#1": ("tfds_unknown_name",),
    "input_pipeline/tfds_source.py:_image_and_label_keys#1": ("tfds_not_image_classification",),
    "input_pipeline/tfds_source.py:open_builder#1": "elsewhere: tests/test_predict.py::"
    "test_main_unprepared_tfds_is_one_line",
    "input_pipeline/tfds_source.py:_check_split#1": tuple(
        m.id for m in TFDS if m.id.startswith(("tfds_split_", "tfds_unknown_eval"))
    ),
    "input_pipeline/tfds_source.py:_check_split#2": ("tfds_empty_train_split",),
    # The readers' own refusal of a split, in the same words as _check_split's:
    "input_pipeline/tfds_source.py:open_source#1": "unreachable with a set that records its "
    "splits (_check_split refuses first: tfds_split_past_100_percent); a set without them",
    "input_pipeline/tfds_source.py:load_split#1": "unreachable with a set that records its "
    "splits (_check_split refuses first: tfds_split_malformed_tfrecord); a set without them",
    "models/weights.py:load_weights_file#1": ("init_weights_not_a_weights_file",),
    "models/weights.py:_assign#1": ("init_weights_of_another_model",),
}
# What raising or printing a user error looks like: these errors, or `_fail(...)`.
USER_ERRORS = {
    *ONE_LINE_TYPES,
    *SHOWN_THROUGH,
    "_split_error",  # tfds_source: builds the DataError it raises
}


def _raise_sites():
    """{"file:function#n"} of every `raise <user error>(...)` and `_fail(...)` in the project."""
    paths = [os.path.join(ROOT, "main.py")]
    for package in ("engine", "input_pipeline", "models"):
        paths += glob.glob(os.path.join(ROOT, package, "**", "*.py"), recursive=True)
    sites = set()
    for path in sorted(paths):
        with open(path) as f:
            tree = ast.parse(f.read())
        _collect(tree, os.path.relpath(path, ROOT), "<module>", sites, {})
    return sites


def _collect(node, where, function, sites, counts):
    for child in ast.iter_child_nodes(node):
        inside = child.name if isinstance(child, ast.FunctionDef) else function
        call = child.exc if isinstance(child, ast.Raise) else child
        name = ast.unparse(call.func).split(".")[-1] if isinstance(call, ast.Call) else ""
        raised = isinstance(child, ast.Raise) and name in USER_ERRORS
        if raised or (isinstance(child, ast.Call) and name == "_fail"):
            counts[inside] = counts.get(inside, 0) + 1
            sites.add(f"{where}:{inside}#{counts[inside]}")
        _collect(child, where, inside, sites, counts)


def test_every_place_that_raises_a_user_error_is_in_the_table_or_covered_elsewhere():
    assert _raise_sites() == set(RAISE_SITES)
    ids = {m.id for m in MISTAKES}
    for site, covered in RAISE_SITES.items():
        if isinstance(covered, tuple):
            assert covered and set(covered) <= ids, (site, set(covered) - ids)
            continue
        for test_file, test in re.findall(r"(tests/\w+\.py)::(\w+)", covered):
            with open(os.path.join(ROOT, test_file)) as f:
                assert f"def {test}(" in f.read(), (site, test)
        # Only these may stand in for an entry of the table, each saying why.
        assert covered.startswith(
            ("elsewhere: tests/", "unreachable", "not a mistake", "in-process only")
        ), site
