"""The command line: bad flags are one line and a non-zero exit, before TensorFlow loads."""

import dataclasses
import os

import pytest
from conftest import main_flags, run_main

from engine.config import MODELS, Config, ConfigError


def _main(*args, timeout=120):
    return run_main(*args, timeout=timeout)


@pytest.mark.parametrize(
    "flag, expected",
    [
        ("--precision=fp8", "fp32|mixed|mixed_bf16"),
        ("--batch_size=0", "--batch_size must be a positive integer below 2**31, got 0"),
        ("--image_size=100000000000000000000", "--image_size must be a positive integer below"),
        ("--seed=4294967296", "--seed must be >= 0 and below 2**32, got 4294967296"),
        ("--learning_rate=1e39", "--learning_rate must be a positive finite number (float32"),
        ("--clip_norm=1e39", "--clip_norm must be a finite number >= 0"),
        ("--max_scale=1e39", "--max_scale <= 3.4e38 (float32)"),
        ("--model=vgg", "tiny|small_resnet|resnet50"),
        ("--loss_scale=-3", "--loss_scale must be 'dynamic' or a positive number"),
        ("--dataset=imagenet", "--dataset='imagenet' is not known"),
        ("--nonsense=1", "Unknown command line flag 'nonsense'"),
        ("--epochs=0", "set --epochs or --train_steps"),
        ("--grad_accum_steps=3", "must be a multiple of --grad_accum_steps (3)"),
        ("--strategy=tpu", "default|one_device|mirrored|multi_worker"),
        (
            "--clip_norm=inf",
            "--clip_norm must be a finite number >= 0 (0 turns it off; float32: at most 3.4e38), "
            "got inf",
        ),
        ("--weight_decay=nan", "--weight_decay must be a finite number >= 0"),
        ("--beta_2=1", "--beta_2 must be >= 0 and below 1, got 1.0"),
        ("--learning_rate=inf", "--learning_rate must be a positive finite number (float32"),
        ("--clip_norm=-1", "--clip_norm must be a finite number >= 0"),
        ("--inject_nonfinite=99999999999999999999", "--inject_nonfinite='99999999999999999999'"),
        ("--mode=benchmark --profile_steps=2,4", "use it with --mode=train, not --mode=benchmark"),
        ("--benchmark_json=/nonexistent/x.json", "folder /nonexistent does not exist; create it"),
        ("--predictions_csv=/tmp", "--predictions_csv=/tmp is a folder; give a file path"),
        ("--export_dir=main.py", "--export_dir=main.py is a file; give a folder path"),
        ("--export_dir=main.py/export", "main.py is a file, so the folder cannot be made"),
        ("--benchmark_json=main.py/b.json", "main.py is a file, not a folder"),
        ("--benchmark_json=gs://bucket/b.json", "--benchmark_json=gs://bucket/b.json must be a "),
        ("--predictions_csv=s3://b/p.csv", "must be a local path: the file is written with"),
        ("--flagfile=/nonexistent/f.txt", "error: Unable to open flagfile"),
        ("--precision=fp32 --loss_scale=128", "--loss_scale applies only to --precision=mixed"),
        (
            "--mode=benchmark --strategy=mirrored --grad_accum_steps=2 --xla",
            "--xla, --strategy, --grad_accum_steps do not apply to --mode=benchmark, which times "
            "the single-device training step of each --compare configuration against Keras fit: "
            "drop them (choose precisions and XLA with --compare, e.g. --compare=fp32,",
        ),
        (
            "--class_weighting",
            "--class_weighting applies only to tfds:, folder: and ships: data; "
            "--dataset=shapes draws its classes uniformly: drop it",
        ),
        ("--dataset=synthetic --class_weighting", "--dataset=synthetic draws its classes"),
        (
            "--dataset=synthetic --eval_split=val",
            "--eval_split applies only to --dataset=tfds:NAME and folder:PATH; "
            "--dataset=synthetic has no named splits: drop it",
        ),
        (
            "--precision=mixed_bf16 --initial_scale=4 --growth_interval=10",
            "--initial_scale, --growth_interval apply only to --precision=mixed (float16); "
            "--precision=mixed_bf16 has no loss scale: drop them",
        ),
    ],
)
def test_bad_flag_is_one_line_and_nonzero_exit(flag, expected):
    proc = _main(*flag.split())
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and expected in lines[0]
    assert "Traceback" not in proc.stderr


def test_loss_scale_flags_are_for_float16_and_for_the_runs_that_share_flags():
    Config(precision="mixed", loss_scale="128", initial_scale=4.0).check_loss_scale_flags()
    # compare and benchmark train several precisions with one set of flags.
    Config(mode="compare", precision="fp32", initial_scale=4.0).check_loss_scale_flags()
    Config(mode="benchmark", compare="fp32", initial_scale=4.0).check_loss_scale_flags()
    with pytest.raises(ConfigError, match="--min_scale applies only"):
        Config(precision="fp32", min_scale=0.5).check_loss_scale_flags()


def test_split_flags_are_refused_where_no_data_set_reads_them():
    Config(dataset="tfds:beans", train_split="train[:90%]", eval_split="validation")
    Config(dataset="folder:data", train_split="training", eval_split="val")
    for dataset in ("shapes", "synthetic", "ships:data"):
        Config(dataset=dataset)  # the defaults are no choice of split
        with pytest.raises(ConfigError, match=rf"^--train_split applies only .*={dataset} has"):
            Config(dataset=dataset, train_split="train[:50%]")
    with pytest.raises(ConfigError, match=r"--train_split, --eval_split apply only .*drop them$"):
        Config(dataset="ships:data", train_split="a", eval_split="b")


def test_an_eta_beyond_any_calendar_still_prints():
    from engine.actions.summaries import format_eta

    assert format_eta(90) == "0:01:30"
    assert format_eta(1e15) == "11574074 days, 1:46:40"  # clamped to 1e12 s: timedelta ends
    assert format_eta(float("nan")) == format_eta(float("inf")) == format_eta(1e15)
    assert format_eta(float("-inf")) == format_eta(-5) == "0:00:00"


def test_flag_defaults_are_the_config_defaults():
    with main_flags() as main:
        assert main.config_from_flags() == Config()


def test_every_option_has_a_generated_flag_with_its_default_and_help():
    import main

    kinds = {bool: "bool", int: "int", float: "float", str: "string"}
    for field in dataclasses.fields(Config):
        flag = main.FLAGS[field.name]
        assert flag.default == field.default, field.name
        assert flag.help.endswith(field.metadata["help"]), field.name  # enums: "<a|b>: help"
        expected = "string enum" if field.metadata["choices"] else kinds[field.type]
        assert flag.flag_type() == expected, field.name


@pytest.mark.parametrize(
    "name", [f.name for f in dataclasses.fields(Config) if f.metadata["choices"]]
)
def test_an_enum_flag_rejects_a_value_outside_its_choices_in_one_line(name, capsys):
    with main_flags() as main, pytest.raises(SystemExit) as exit_:
        main._parse_flags(["main.py", f"--{name}=bogus"])
    (field,) = (f for f in dataclasses.fields(Config) if f.name == name)
    choices = "|".join(field.metadata["choices"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (
        f"error: flag --{name}=bogus: value should be one of <{choices}>\n"
    )


def test_config_and_model_registry_agree():
    from models import MODEL_NAMES

    assert MODEL_NAMES == MODELS


def test_config_rejects_inconsistent_scale_bounds():
    with pytest.raises(ConfigError, match="--min_scale"):
        Config(min_scale=4.0, initial_scale=2.0)


def test_flagfile_is_read(tmp_path):
    flagfile = tmp_path / "flags.txt"
    flagfile.write_text("--batch_size=-4\n")
    proc = _main(f"--flagfile={flagfile}")
    assert (
        proc.returncode == 2
        and "--batch_size must be a positive integer below 2**31, got -4" in proc.stderr
    )


def test_main_trains_end_to_end(tmp_path):
    proc = _main(
        "--model=tiny",
        "--image_size=16",
        "--train_steps=3",
        "--train_examples=64",
        "--eval_examples=32",
        f"--model_dir={tmp_path}",
        "--precision=mixed",
        "--xla",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "done: 3 steps" in proc.stderr
    assert list(tmp_path.glob("events.out.tfevents.*"))


def test_benchmark_on_missing_data_is_one_error_line_before_any_worker():
    # Found after TensorFlow loads, so TF's start-up lines may precede it.
    proc = _main("--mode=benchmark", "--dataset=folder:nonexistent")
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "nonexistent/train is not a folder" in errors[0]
    assert "Traceback" not in proc.stderr and "benchmarking" not in proc.stderr


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--dataset=folder:~/data"], "{home}/data/train is not a folder"),
        (["--dataset=tfds:mnist", "--data_dir=~/tfds"], "is not prepared in {home}/tfds/mnist"),
    ],
)
def test_a_tilde_in_a_path_flag_is_the_home_folder(tmp_path, flags, expected):
    # The shell leaves `~` after `=` alone; unexpanded, it would name a folder `~`.
    env = {**os.environ, "HOME": str(tmp_path)}
    proc = run_main(*flags, f"--model_dir={tmp_path / 'run'}", env=env, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert expected.format(home=tmp_path) in errors[0]
