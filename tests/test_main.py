"""The command line: flags generated from the options, parsed into one Config.

Each bad value's one error line and exit status 2 are in tests/test_mistakes.py.
"""

import dataclasses

import pytest
from conftest import main_captured, main_flags, run_main

from engine.config import MODELS, Config, ConfigError


def _main(*args, timeout=120):
    return run_main(*args, timeout=timeout)


def test_loss_scale_flags_are_for_float16_and_for_the_runs_that_share_flags():
    Config(precision="mixed", loss_scale="128", initial_scale=4.0).check_precision_flags()
    # compare and benchmark train several precisions with one set of flags.
    Config(mode="compare", precision="fp32", initial_scale=4.0).check_precision_flags()
    Config(mode="benchmark", compare="fp32", initial_scale=4.0).check_precision_flags()
    with pytest.raises(ConfigError, match="--min_scale applies only"):
        Config(precision="fp32", min_scale=0.5).check_precision_flags()


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
def test_a_tilde_in_a_path_flag_is_the_home_folder(tmp_path, monkeypatch, flags, expected):
    # The shell leaves `~` after `=` alone; unexpanded, it would name a folder `~`.
    monkeypatch.setenv("HOME", str(tmp_path))
    proc = main_captured(*flags, f"--model_dir={tmp_path / 'run'}")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert expected.format(home=tmp_path) in errors[0]
