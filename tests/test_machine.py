"""`--precision=auto`: chosen for the machine, logged, recorded, kept on resume."""

import json
import os

import pytest
from conftest import tiny_config

from engine import machine, train
from engine.config import ConfigError


@pytest.mark.parametrize(
    "gpus, bf16, expected",
    [
        ([(8, 0), (7, 5)], False, ("mixed", True)),  # tensor cores: float16 + XLA
        ([(6, 1)], True, ("fp32", False)),  # a GPU without them
        ([], True, ("mixed_bf16", False)),  # AVX512_BF16 / AMX with oneDNN
        ([], False, ("fp32", False)),
    ],
)
def test_auto_picks_what_suits_the_machine(gpus, bf16, expected):
    precision, xla, reason = machine.choose(gpus, bf16)
    assert (precision, xla) == expected and reason


@pytest.mark.parametrize(
    "gpus, bf16, expected",
    [
        ([(8, 0)], False, ("mixed", True)),  # a GPU keeps its rule
        ([], True, ("fp32", True)),  # XLA's fusion beats bfloat16's kernels on a CPU
        ([], False, ("fp32", True)),
    ],
)
def test_auto_picks_per_model_family_and_says_why(gpus, bf16, expected, monkeypatch, caplog):
    monkeypatch.setattr(machine, "machine", lambda: (gpus, bf16))
    with caplog.at_level("INFO", logger="absl"):
        resolved = machine.resolve(tiny_config(model="vit_test", precision="auto", xla=None), "/x")
    assert (resolved.precision, resolved.xla) == expected
    (line,) = [r.getMessage() for r in caplog.records if "--precision=auto" in r.getMessage()]
    assert ("Vision Transformer" in line) == (not gpus), line


def test_auto_is_decided_once_recorded_and_kept_on_another_machine(tmp_path, monkeypatch):
    model_dir = str(tmp_path / "run")
    monkeypatch.setattr(machine, "machine", lambda: ([], False))  # a plain CPU: fp32
    config = tiny_config(precision="auto", xla=None, train_steps=2)
    train.train_and_evaluate(config, model_dir)
    with open(os.path.join(model_dir, "checkpoints", "config.json")) as f:
        saved = json.load(f)
    assert (saved["precision"], saved["xla"]) == ("fp32", False)
    with open(os.path.join(model_dir, "flags.txt")) as f:
        lines = f.read().split()
    assert "--precision=fp32" in lines and "--noxla" in lines
    # Resumed where auto would pick float16 + XLA: the run keeps what it started with.
    monkeypatch.setattr(machine, "machine", lambda: ([(8, 0)], False))
    assert machine.resolve(config, model_dir).precision == "fp32"
    assert machine.resolve(config.replace(xla=True), model_dir).xla  # XLA may change
    fresh = machine.resolve(config, str(tmp_path / "new"))
    assert (fresh.precision, fresh.xla) == ("mixed", True)
    assert machine.resolve(config.replace(xla=False), str(tmp_path / "new")).xla is False


def test_explicit_precisions_are_kept_and_loss_scale_flags_need_mixed():
    config = tiny_config(precision="mixed", xla=None)
    resolved = machine.resolve(config, "/nonexistent")
    assert (resolved.precision, resolved.xla) == ("mixed", False)
    with pytest.raises(ConfigError, match="set --precision=mixed"):
        tiny_config(precision="auto", initial_scale=1024.0).check_precision_flags()


@pytest.mark.parametrize(
    "precision, xla, family, warns",
    [
        ("mixed", False, "resnet", "float16 without XLA on a CPU"),
        ("mixed", True, "vit", "float16 on a CPU is slower than fp32 even with XLA"),
        ("mixed_bf16", True, "resnet", "drop --xla for speed"),
        ("mixed_bf16", True, "vit", None),  # XLA pays for a ViT (and auto takes it)
        ("fp32", True, "vit", None),
        ("mixed_bf16", False, "resnet", None),
    ],
)
def test_a_slow_combination_on_a_cpu_is_a_warning_but_xla_for_a_vit(precision, xla, family, warns):
    from engine.precision import get_policy, slow_combination_warning

    warning = slow_combination_warning(get_policy(precision), xla, "CPU", family)
    assert (warning is None) if warns is None else (warns in warning)
    assert slow_combination_warning(get_policy(precision), xla, "GPU", family) is None
