"""The options: each declared once, validated without touching the disk."""

import builtins
import dataclasses
import os

import pytest

from engine import config as config_lib
from engine import preflight
from engine.config import Config, ConfigError


def test_every_option_declares_a_help_text_and_its_enum_choices():
    for field in dataclasses.fields(Config):
        assert field.metadata["help"].strip(), field.name
        assert field.type in (bool, int, float, str), field.name
        choices = field.metadata["choices"]
        assert not choices or (field.type is str and field.default in choices), field.name


def test_the_applies_only_to_lists_come_from_the_declarations():
    assert config_lib.LOSS_SCALE_FLAGS == (
        "loss_scale",
        "initial_scale",
        "growth_interval",
        "min_scale",
        "max_scale",
    )
    assert config_lib.FLOAT8_FLAGS == ("fp8_recipe", "fp8_amax_history")
    assert config_lib.SPLIT_FLAGS == ("train_split", "eval_split")
    assert set(config_lib.BENCHMARK_REFUSED_FLAGS) == {
        "precision",
        "xla",
        "strategy",
        "num_cpu_devices",
        "grad_accum_steps",
        "class_weighting",
        "precision_diagnostics",
        "inject_nonfinite",
        "deterministic",
        "bn_recalibration_examples",
        "preprocessing",
        "label_smoothing",
        "stochastic_depth",
    }
    assert set(config_lib.RESUME_FIELDS) == {
        "model",
        "precision",
        "loss_scale",
        "optimizer",
        "dataset",
        "image_size",
        "batch_size",
        "train_examples",
        "seed",
        "train_split",
        "eval_split",
        "eval_fraction",
        "skip_bad_images",
        "augment",
        "lr_schedule",
        "preprocessing",
        "patch_size",
        "stochastic_depth",
        "fp8_recipe",
        "fp8_amax_history",
    }


@pytest.mark.parametrize(
    "name, value",
    [("loss_scale", "128"), ("initial_scale", 4.0), ("growth_interval", 10), ("min_scale", 0.5)],
)
def test_a_loss_scale_option_without_float16_is_refused_by_its_declaration(name, value):
    with pytest.raises(ConfigError) as e:
        Config(precision="fp32", **{name: value}).check_precision_flags()
    assert str(e.value) == (
        f"--{name} applies only to --precision=mixed (float16); "
        "--precision=fp32 has no loss scale: drop it"
    )


def test_an_option_applies_where_its_scope_covers_the_settings():
    # check_compatible skips what a saved run's settings put out of scope.
    assert config_lib.applies("loss_scale", {"precision": "mixed"})
    assert not config_lib.applies("loss_scale", {"precision": "fp32"})
    assert config_lib.applies("train_split", {"dataset": "folder:/data"})
    assert not config_lib.applies("train_split", {"dataset": "ships:/data"})
    assert not config_lib.applies("train_split", {})
    assert config_lib.applies("precision", {"mode": "train"})
    assert config_lib.applies("seed", {})


@pytest.mark.parametrize(
    "name, value, reason",
    [
        (
            "profile_steps",
            "2,4",
            "traces training steps; use it with --mode=train or --mode=compare",
        ),
        ("init_weights", "w.h5", "sets the weights a training run starts from; --mode=predict "),
        ("pretrained", "imagenet", "sets the weights a training run starts from; --mode=predict "),
        ("init_from", "run", "sets the weights a training run starts from; --mode=predict "),
        ("freeze_steps", 5, "trains only the head for a training run's first steps; --mode=pre"),
    ],
)
def test_training_options_are_refused_outside_training_runs_each_with_its_reason(
    name, value, reason
):
    # Declared once, with its scope: train and compare accept it, predict refuses it.
    given = {name: value, "model": "resnet50"}
    for mode in ("train", "compare"):
        Config(mode=mode, **given)
    with pytest.raises(ConfigError) as e:
        Config(mode="predict", dataset="ships:x", predict_csv="t.csv", model_dir="r", **given)
    assert str(e.value).startswith(f"--{name} {reason}")
    assert "--mode=train or --mode=compare" in str(e.value)


def test_validation_touches_no_disk(monkeypatch, tmp_path):
    paths = dict(
        dataset="folder:/nope",
        cache="/no/such/dir/c",
        export_dir="/no/such/export",
        benchmark_json="/no/such/b.json",
        predictions_csv="/no/such/p.csv",
        model_dir="/no/such/run",
    )

    def no_disk(*args, **kwargs):
        raise AssertionError(f"validation touched the disk: {args}")

    with monkeypatch.context() as m:
        for name in ("stat", "lstat", "access", "listdir", "scandir", "readlink"):
            m.setattr(os, name, no_disk)
        m.setattr(builtins, "open", no_disk)
        config = Config(**paths).replace(seed=3)
    with pytest.raises(ConfigError, match="--cache=/no/such/dir/c: folder /no/such/dir does not"):
        preflight.check(config)


def test_the_float8_flags_are_for_mixed_fp8_and_the_amax_history_for_delayed_alone():
    Config(model="vit_test", precision="mixed_fp8", fp8_recipe="delayed", fp8_amax_history=16)
    Config(mode="compare", fp8_recipe="block").check_precision_flags()  # shared flags
    with pytest.raises(ConfigError) as e:
        Config(precision="mixed_bf16", fp8_recipe="block").check_precision_flags()
    assert str(e.value) == (
        "--fp8_recipe applies only to --precision=mixed_fp8; --precision=mixed_bf16 has no "
        "float8 matmuls: drop it"
    )
    with pytest.raises(ConfigError) as e:
        Config(model="vit_test", precision="mixed_fp8", fp8_amax_history=16)
    assert str(e.value) == (
        "--fp8_amax_history applies only to --fp8_recipe=delayed; --fp8_recipe=current keeps "
        "no amax history: drop it"
    )
    delayed = Config(model="vit_test", precision="mixed_fp8", fp8_recipe="delayed")
    other = delayed.replace(precision="mixed_bf16").without_other_precisions_flags()
    assert (other.fp8_recipe, other.fp8_amax_history) == ("current", 1024)


@pytest.mark.parametrize(
    "overrides, says",
    [
        (dict(precision="mixed_fp8"), "--precision=mixed_fp8 quantizes the matmuls of "),
        (dict(mode="compare", compare="mixed_bf16,mixed_fp8"), "--model=small_resnet has none"),
        (
            dict(mode="benchmark", compare="mixed_fp8", model="vit_test", fit_scaling="engine"),
            "--fit_scaling=engine does not run float8",
        ),
    ],
)
def test_mixed_fp8_is_refused_where_there_is_no_transformer_block(overrides, says):
    with pytest.raises(ConfigError, match=says):
        Config(**overrides)
    Config(**{**overrides, "model": "vit_test", "fit_scaling": "keras"})  # then it runs
