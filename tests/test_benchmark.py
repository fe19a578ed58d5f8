"""Speed tooling: FLOP counting, the profile trace, no retracing, the benchmark worker."""

import json
import logging
import math
import os
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import ROOT, tiny_config

from engine import float8, loop, train, train_run
from engine.config import Config, ConfigError
from engine.data import data_config
from engine.modes import benchmark, benchmark_worker
from input_pipeline import create_data


def test_counted_flops_match_a_hand_count():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)  # 8*8*4 outputs x 3*3*3 MACs
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(5)(x)  # 4*5 MACs
    model = keras.Model(inputs, outputs)
    forward = 2 * (8 * 8 * 4 * 27 + 4 * 5)
    assert benchmark_worker.count_train_flops_per_example(model) == 3 * forward


def test_resnet50_at_96px_costs_about_4_gflop_per_training_image():
    from models import create_model

    gflop = benchmark_worker.count_train_flops_per_example(create_model("resnet50", 5, 96)) / 1e9
    assert 3.8 < gflop < 4.8  # TF's profiler reports ~4.27 for the same model


def test_a_run_traces_its_inner_loop_once_and_again_only_where_freeze_steps_rebuilds_it(
    tmp_path, monkeypatch
):
    built = []  # (the tf.function, the loop lengths it ran), per inner loop the run built
    create_train_loop, create_eval_loop = loop.create_train_loop, loop.create_eval_loop

    def kept(*args, **kwargs):
        function, lengths = create_train_loop(*args, **kwargs), []
        built.append((function, lengths))

        def train_loop(iterator, num_steps):
            lengths.append(int(num_steps))
            return function(iterator, num_steps)

        return train_loop

    evals = []

    def kept_eval(*args, **kwargs):
        evals.append(create_eval_loop(*args, **kwargs))
        return evals[-1]

    monkeypatch.setattr(loop, "create_train_loop", kept)
    monkeypatch.setattr(loop, "create_eval_loop", kept_eval)
    # Through the real path: four steps an epoch (evals at 4, 8 and 12), saves
    # every 3 steps, and the step rebuilt over every weight at --freeze_steps=5.
    config = tiny_config(
        train_steps=12,
        steps_per_loop=3,
        train_examples=64,
        checkpoint_every=3,
        freeze_steps=5,
        xla=True,
    )
    assert train.train_and_evaluate(config, str(tmp_path)).steps == 12
    (frozen, frozen_lengths), (unfrozen, unfrozen_lengths) = built
    # Loops of several lengths, cut at every eval, save and the boundary...
    assert frozen_lengths == [1, 2, 1, 1] and unfrozen_lengths == [1, 2, 1, 3]
    # ...one trace each: the one new trace is the rebuilt step's.
    assert frozen.experimental_get_tracing_count() == 1
    assert unfrozen.experimental_get_tracing_count() == 1
    (eval_loop,) = evals
    assert eval_loop.experimental_get_tracing_count() == 1  # over the three evals


def test_profile_steps_writes_a_trace(tmp_path):
    train.train_and_evaluate(tiny_config(train_steps=6, profile_steps="2,4"), str(tmp_path))
    assert list((tmp_path / "plugins" / "profile").rglob("*.xplane.pb"))


def _traced_steps(tmp_path, monkeypatch, caplog, **overrides):
    """Trains; returns the steps run between the profiler's start and stop, and the log."""
    events = []  # "start", "stop", or the number of steps an inner-loop call ran
    monkeypatch.setattr(tf.profiler.experimental, "start", lambda logdir: events.append("start"))
    monkeypatch.setattr(tf.profiler.experimental, "stop", lambda: events.append("stop"))
    create_train_loop = loop.create_train_loop

    def counted(*args, **kwargs):
        train_loop = create_train_loop(*args, **kwargs)

        def run(iterator, num_steps):
            events.append(int(num_steps))
            return train_loop(iterator, num_steps)

        return run

    monkeypatch.setattr(loop, "create_train_loop", counted)
    with caplog.at_level(logging.INFO, logger="absl"):
        train.train_and_evaluate(tiny_config(**overrides), str(tmp_path))
    traced, done, tracing = [], 0, False
    for event in events:
        if event in ("start", "stop"):
            tracing = event == "start"
        else:
            if tracing:
                traced += range(done + 1, done + event + 1)  # step numbers as the console's
            done += event
    return traced, [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("spec, steps", [("2,4", [2, 3, 4]), ("1,1", [1]), ("6,9", [6])])
def test_profile_steps_trace_steps_start_to_end_numbered_from_1(
    tmp_path, monkeypatch, caplog, spec, steps
):
    traced, log = _traced_steps(
        tmp_path, monkeypatch, caplog, train_steps=6, steps_per_loop=4, profile_steps=spec
    )
    assert traced == steps
    assert any(m.startswith(f"profiling steps {steps[0]}-{steps[-1]} ") for m in log), log


def test_profile_steps_beyond_the_run_are_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        train.train_and_evaluate(tiny_config(train_steps=4, profile_steps="10,20"), str(tmp_path))
    assert any(
        "--profile_steps=10,20: this run trains steps 1-4, so no" in r.getMessage()
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]
    assert not (tmp_path / "plugins" / "profile").exists()


@pytest.mark.parametrize("spec", ["4,2", "x", "3", "-1,2", "0,2"])
def test_bad_profile_steps_are_rejected(spec):
    with pytest.raises(ConfigError, match="--profile_steps"):
        tiny_config(profile_steps=spec)


def test_worker_measures_engine_and_fit_rows():
    config = tiny_config(precision="mixed", xla=True, steps_per_loop=2, train_steps=100)
    rows = benchmark_worker.run_worker(config, graph_rewrite=False, repeats=3, steps=4)
    engine, fit = rows
    assert engine["runner"] == "engine" and fit["runner"] == "keras_fit"
    for row in rows:
        assert row["windows"] == 3 and row["steps_per_window"] == 4
        assert row["examples_per_sec"] > 0 and row["step_ms"] > 0 and row["peak_rss_mb"] > 0
        assert row["examples_per_sec_min"] <= row["examples_per_sec"] <= row["examples_per_sec_max"]
    assert engine["vs_fit"] > 0
    # (dynamic - no-op) / dynamic: below 1 as long as the no-op run took any
    # time; on a tiny model timing noise alone can make it very negative.
    assert math.isfinite(engine["loss_scale_overhead"]) and engine["loss_scale_overhead"] < 1.0
    benchmark._add_derived(rows, {"float32": 100.0, "float16": 50.0, "bfloat16": 100.0})
    assert engine["mfu"] > 0
    table = benchmark.format_table(rows)
    assert "| engine |" in table and "| keras_fit |" in table


def test_the_fit_peer_can_train_with_the_engines_scaling():
    from engine.keras_fit import LossScaledModel

    config = tiny_config(precision="mixed", initial_scale=256.0, steps_per_loop=2)
    _, _, model = benchmark_worker._fit_interleaved(
        config, create_data(data_config(config)), 2, 4, lambda: None, fit_scaling="engine"
    )
    assert isinstance(model, LossScaledModel)
    assert not isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    # The first call, one warm-up execution of --steps_per_loop steps, two windows of 4.
    assert int(model.optimizer.iterations) == 1 + 2 + 2 * 4
    assert float(model.loss_scale.value) == 256.0 and int(model.skipped_steps) == 0
    row = dict(_ROW, runner="keras_fit", fit_scaling="engine", speedup_vs_fp32=1.0, mfu=0.01)
    assert "| keras_fit (engine scaling) |" in benchmark.format_table([row])


def test_mixed_fp8_is_timed_against_keras_float8_dense_in_fit():
    config = tiny_config(model="vit_test", precision="mixed_fp8", steps_per_loop=2)
    data = create_data(data_config(config))
    window, _, engine_model = benchmark_worker._engine_runner(config, data)
    _, _, fit_model = benchmark_worker._fit_interleaved(config, data, 1, 2, lambda: window(2))

    def float8_layers(model):  # walked as Keras' quantize walks them
        layers = list(model._flatten_layers())
        quantizable = [layer for layer in layers if float8.default_predicate(layer)]
        return quantizable, [layer.name for layer in layers if layer.quantization_mode]

    # The engine's recipe took the ViT blocks' Dense layers; Keras' float8 Dense the same ones.
    quantized, keras_float8 = float8_layers(engine_model)
    assert len(quantized) == 8 and keras_float8 == []
    assert float8_layers(fit_model)[1] == [layer.name for layer in quantized]
    # Keras' delayed scaling ran: its input scales moved from 1.
    scales = [v for v in fit_model.variables if v.path.endswith("inputs_scale")]
    assert len(scales) == 8 and all(float(v.numpy()) != 1.0 for v in scales)
    rows = [dict(_ROW, precision=p, train_gflop_per_example=1.0) for p in ("fp32", "mixed_fp8")]
    benchmark._add_derived(rows, {"float32": 100.0, "float16": 50.0, "bfloat16": 40.0})
    assert rows[1]["mfu"] == 10.0 / 40.0  # against bfloat16's peak, its compute dtype


def test_fit_and_engine_windows_alternate():
    config = tiny_config(steps_per_loop=2, train_steps=100)
    calls = []

    def engine_window():
        calls.append(time.perf_counter())
        time.sleep(0.2)

    windows, first, model = benchmark_worker._fit_interleaved(
        config, create_data(data_config(config)), 3, 4, engine_window
    )
    assert len(windows) == 3 and len(calls) == 3 and first > 0
    # The timed first call is one step alone, then a warm-up loop and 3 windows of 2 loops.
    assert int(model.optimizer.iterations) == 1 + 2 * (1 + 3 * 2)
    for i in range(2):
        # fit's window i ran between engine windows i and i+1, and excludes them.
        gap = calls[i + 1] - calls[i]
        assert 0 < windows[i] <= gap - 0.2


@pytest.mark.parametrize("steps", [3, -2])
def test_bad_benchmark_steps_are_rejected(steps):
    with pytest.raises(ConfigError, match="--benchmark_steps"):
        tiny_config(steps_per_loop=2, benchmark_steps=steps)


# One measured row, as a worker returns it (before `_add_derived`).
_ROW = {
    "runner": "engine",
    "model": "tiny",
    "image_size": 16,
    "batch_size": 8,
    "precision": "mixed",
    "xla": False,
    "examples_per_sec": 10.0,
    "examples_per_sec_min": 10.0,
    "examples_per_sec_max": 10.0,
    "step_ms": 800.0,
    "first_step_s": 1.0,
    "peak_rss_mb": 100.0,
}


def test_table_says_which_rows_ran_on_a_reduced_budget():
    row = dict(_ROW, speedup_vs_fp32=0.2, mfu=0.01)
    assert "reduced" not in benchmark.format_table([row])
    table = benchmark.format_table([dict(row, reduced_budget="1 repeat, reduced")])
    assert table.splitlines()[-1] == "mixed: 1 repeat, reduced"


def test_a_worker_reports_its_own_peak_memory_not_its_parents():
    # Linux keeps ru_maxrss across fork and exec: a worker started from a parent
    # that once held 400 MB would report at least that.
    held = np.ones(50_000_000)  # 400 MB, touched
    code = "from engine.modes.benchmark_worker import _peak_rss_mb; print(_peak_rss_mb())"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert float(out.stdout) < 200, out.stdout
    assert benchmark_worker._peak_rss_mb() > 400
    del held


def test_a_failed_worker_is_named_with_how_it_ended():
    tf_noise = "I0000 00:00:1.0 123 cudart_stub.cc:31] Could not find cuda drivers"
    killed = subprocess.CompletedProcess([], -9, "", f"{tf_noise}\nValueError: bad shape\n")
    assert benchmark._failure_reason(killed) == "worker killed by signal 9: ValueError: bad shape"
    quiet = subprocess.CompletedProcess([], 1, "", tf_noise)
    assert benchmark._failure_reason(quiet) == "worker exited with status 1"


def test_rows_without_an_fp32_baseline_stay_valid_json():
    row = dict(_ROW, precision="mixed_bf16", train_gflop_per_example=1.0)
    benchmark._add_derived([row], {"float32": 100.0, "float16": 50.0, "bfloat16": 100.0})
    assert row["speedup_vs_fp32"] is None
    json.dumps(row, allow_nan=False)  # NaN would make the file invalid JSON
    assert "| n/a |" in benchmark.format_table([row])


def _fake_benchmark(setup):
    """A script running `run_benchmark` after `setup` has faked parts of it.

    Its first argument is the JSON path. The matmul peaks are faked in every one:
    they are not what these tests are about.
    """
    return f"""
import json, os, signal, sys
from engine import config as config_lib
from engine.modes import benchmark, benchmark_worker
benchmark_worker.measure_peak_gflops = lambda dtype: 1.0
{setup}
config = config_lib.Config(
    mode="benchmark", model="tiny", dataset="synthetic", image_size=16,
    train_examples=64, eval_examples=32, benchmark_json=sys.argv[1],
)
benchmark.run_benchmark(config)
"""


_STOPPED_BENCHMARK = _fake_benchmark(
    """
pid_file = sys.argv[2]
worker = "import os, time; open(%r, 'w').write(str(os.getpid())); time.sleep(120)" % pid_file
benchmark._worker_command = lambda *args: [sys.executable, "-c", worker]
"""
)


def test_sigterm_to_the_benchmark_stops_its_worker_and_keeps_the_table(tmp_path):
    pid_file, result = tmp_path / "worker.pid", tmp_path / "bench.json"
    parent = subprocess.Popen(
        [sys.executable, "-c", _STOPPED_BENCHMARK, str(result), str(pid_file)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (pid_file.exists() and pid_file.read_text()):
            assert parent.poll() is None, parent.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the worker never started"
            time.sleep(0.2)
        worker = int(pid_file.read_text())
        parent.terminate()  # SIGTERM, as a scheduler or `kill` sends it
        _, err = parent.communicate(timeout=60)
    finally:
        parent.kill()
    assert parent.returncode == 143, err[-2000:]
    # The worker went with it, instead of measuring for nobody.
    with pytest.raises(ProcessLookupError):
        for _ in range(50):
            os.kill(worker, 0)
            time.sleep(0.1)
    written = json.loads(result.read_text())
    assert written["skipped"] == [{"configuration": "engine fp32", "reason": "stopped by SIGTERM"}]


_STOPPED_BETWEEN_WORKERS = _fake_benchmark(
    """
row = json.dumps([dict(json.loads(sys.argv[2]), precision="fp32", train_gflop_per_example=0.1)])
benchmark._worker_command = lambda *a: [sys.executable, "-c", "import sys; print(sys.argv[1])", row]
calls = []
is_pathological = benchmark._is_pathological

def between_workers(*args):  # asked in the parent before each worker starts
    calls.append(args)
    if len(calls) == 2:  # the first worker has returned its row
        signal.raise_signal(signal.SIGTERM)
    return is_pathological(*args)

benchmark._is_pathological = between_workers
"""
)


def test_sigterm_between_workers_keeps_the_rows_measured_so_far(tmp_path):
    result = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-c", _STOPPED_BETWEEN_WORKERS, str(result), json.dumps(_ROW)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 143, proc.stderr[-2000:]
    written = json.loads(result.read_text())
    assert [r["precision"] for r in written["rows"]] == ["fp32"]
    assert "| engine | tiny 16px b8 | fp32 |" in proc.stdout


def test_the_json_file_is_replaced_whole_or_not_at_all(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text('{"rows": ["an earlier complete run"]}')
    with pytest.raises(ValueError):  # NaN is not JSON: the write fails half-way
        benchmark._write_json(str(path), {"rows": [1.0, float("nan")]})
    assert json.loads(path.read_text()) == {"rows": ["an earlier complete run"]}
    benchmark._write_json(str(path), {"rows": [1.0]})
    assert json.loads(path.read_text()) == {"rows": [1.0]}


def _fake_run(monkeypatch, row=None):
    """`run_benchmark` with faked peaks and workers; returns the worker calls made.

    Each worker returns `row` (by default `_ROW` in the worker's precision and XLA).
    """
    calls = []

    def worker(cfg, rewrite, repeats, steps, fit_scaling):
        assert cfg.mode == "train" and cfg.fit_scaling == "keras"  # a training run's config
        calls.append((cfg.precision, cfg.xla, rewrite, repeats, steps, fit_scaling))
        measured = row or dict(_ROW, precision=cfg.precision, xla=cfg.xla)
        return [dict(measured, train_gflop_per_example=0.1)], None

    monkeypatch.setattr(benchmark_worker, "measure_peak_gflops", lambda dtype: 1.0)
    monkeypatch.setattr(benchmark, "_run_worker_process", worker)
    return calls


def _benchmark_config(**overrides):
    # The benchmark chooses precision and XLA itself: both stay at their defaults.
    base = dict(mode="benchmark", precision="auto", dataset="synthetic", benchmark_repeats=1)
    return tiny_config(**{**base, **overrides})


def test_a_json_file_that_cannot_be_written_keeps_the_table(tmp_path, monkeypatch, capsys):
    _fake_run(monkeypatch)
    folder = tmp_path / "results"
    folder.mkdir()
    config = _benchmark_config(benchmark_json=str(folder / "bench.json"))
    folder.rmdir()  # checked at start-up, gone by the end
    with pytest.raises(ConfigError, match=r"bench.json could not be written .*the table above"):
        benchmark.run_benchmark(config)
    assert "| engine | tiny 16px b8 | fp32 |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "name, value",
    [
        ("precision", "fp32"),
        ("xla", True),
        ("strategy", "mirrored"),
        ("num_cpu_devices", 4),
        ("grad_accum_steps", 2),
        ("class_weighting", True),
        ("precision_diagnostics", True),
        ("inject_nonfinite", "3"),
        ("deterministic", True),
    ],
)
def test_flags_the_benchmark_cannot_honour_are_refused(name, value):
    # Class weights need a data set with counted classes (shapes' are uniform).
    flag = {name: value, **({"dataset": "folder:data"} if name == "class_weighting" else {})}
    with pytest.raises(ConfigError, match=rf"^--{name} does not apply to --mode=benchmark"):
        _benchmark_config(**flag)
    tiny_config(**flag)  # a training run takes it


def test_compare_chooses_the_configurations_to_benchmark(monkeypatch, capsys):
    calls = _fake_run(monkeypatch)
    benchmark.run_benchmark(_benchmark_config(compare="mixed_bf16+xla,fp32"))
    assert [c[:3] for c in calls] == [("mixed_bf16", True, False), ("fp32", False, False)]
    assert capsys.readouterr().out.count("| engine |") == 2
    calls.clear()
    benchmark.run_benchmark(_benchmark_config())  # the default: the whole table
    assert [c[:3] for c in calls] == [c[1:] for c in benchmark.CONFIGURATIONS]
    assert {c[5] for c in calls} == {"keras"}
    calls.clear()
    benchmark.run_benchmark(_benchmark_config(compare="fp32", fit_scaling="engine"))
    assert [c[5] for c in calls] == ["engine"]  # the worker is told, its config stays a run's


def _fit_once(monkeypatch, **overrides):
    """Runs `_fit_interleaved` (four steps); returns (model, its initial trainable weights)."""
    initial, create = [], train_run.create_model_for

    def create_and_keep(config, num_classes):
        model = create(config, num_classes)
        initial.extend(w.numpy() for w in model.trainable_weights)
        return model

    monkeypatch.setattr(train_run, "create_model_for", create_and_keep)
    config = tiny_config(steps_per_loop=2, train_steps=100, **overrides)
    _, _, model = benchmark_worker._fit_interleaved(
        config, create_data(data_config(config)), 1, 2, lambda: None
    )
    return model, initial


@pytest.mark.parametrize("precision", ["fp32", "mixed"])
def test_fit_clips_gradients_like_the_engine(monkeypatch, precision):
    clip, lr = 1e-3, 1.0
    model, initial = _fit_once(
        monkeypatch,
        precision=precision,
        clip_norm=clip,
        optimizer="sgd",
        learning_rate=lr,
        lr_schedule="constant",
    )
    moved = [w.numpy() - w0 for w, w0 in zip(model.trainable_weights, initial, strict=True)]
    # The first call, one warm-up execution of --steps_per_loop steps, one window of two:
    # five steps (fewer applied where float16 overflowed and the step was skipped).
    steps = int(model.optimizer.iterations)
    assert 1 <= steps <= 5 and (precision == "mixed" or steps == 5)
    # Plain SGD steps on gradients clipped to `clip` move the weights at most this far.
    assert 0 < math.sqrt(sum(float(np.sum(d * d)) for d in moved)) <= steps * lr * clip * 1.001


def test_fit_uses_a_static_loss_scale_like_the_engine(monkeypatch):
    model, _ = _fit_once(monkeypatch, precision="mixed", loss_scale="128")
    assert not isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert model.optimizer.loss_scale_factor == 128.0
    model, _ = _fit_once(monkeypatch, precision="mixed")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)


def test_the_overhead_line_names_a_static_scale():
    row = dict(_ROW, speedup_vs_fp32=1.0, mfu=0.01, loss_scale_overhead=0.02)
    assert "dynamic loss scaling overhead (mixed +xla): 2.0%" in benchmark.format_table([row])
    static = benchmark.format_table([dict(row, loss_scale="128")])
    assert "static (128) loss scaling overhead (mixed +xla): 2.0%" in static


def test_the_reduced_float16_budget_never_exceeds_the_requested_repeats(monkeypatch, capsys):
    monkeypatch.setattr(benchmark, "_is_pathological", lambda *args: True)
    calls = _fake_run(monkeypatch)
    benchmark.run_benchmark(_benchmark_config(compare="mixed"))
    assert [c[3:5] for c in calls] == [(1, 1)]  # --benchmark_repeats=1: one window of one step
    assert (
        "mixed: too slow on this device for the full budget: 1 window of" in capsys.readouterr().out
    )
    calls.clear()
    benchmark.run_benchmark(_benchmark_config(compare="mixed", benchmark_repeats=7))
    assert [c[3:5] for c in calls] == [(2, 1)]


def test_a_negative_overhead_is_shown_as_below_the_noise():
    row = dict(_ROW, speedup_vs_fp32=1.0, mfu=0.01, loss_scale_overhead=-2.837)
    assert benchmark.format_table([row]).endswith(
        "dynamic loss scaling overhead (mixed +xla): -283.7% of step time "
        "(negative: below the noise of this run)"
    )
    positive = benchmark.format_table([dict(row, loss_scale_overhead=0.006)])
    assert positive.endswith("overhead (mixed +xla): 0.6% of step time")


def test_an_mfu_above_100_percent_is_never_printed_as_a_result():
    # A peak measured while another process ran is too low: a row's MFU then
    # comes out above 100%, which the table must not show as a figure.
    rows = [dict(_ROW, precision="fp32", examples_per_sec=1000.0, train_gflop_per_example=1.0)]
    benchmark._add_derived(rows, {"float32": 500.0, "bfloat16": 900.0, "float16": 400.0})
    assert rows[0]["mfu"] is None
    assert "| peak disturbed |" in benchmark.format_table(rows)
    rows = [dict(_ROW, precision="fp32", examples_per_sec=100.0, train_gflop_per_example=1.0)]
    benchmark._add_derived(rows, {"float32": 500.0, "bfloat16": 900.0, "float16": 400.0})
    assert rows[0]["mfu"] == pytest.approx(0.2)
    assert "| 20.0% |" in benchmark.format_table(rows)


def test_the_peak_is_the_best_of_before_and_after_the_rows(monkeypatch, tmp_path):
    measured = iter([100.0, 300.0, 200.0, 250.0, 150.0, 50.0])  # fp32, bf16, fp16; twice
    monkeypatch.setattr(benchmark_worker, "measure_peak_gflops", lambda dtype: next(measured))
    monkeypatch.setattr(benchmark, "_measure_configurations", lambda config, gpu: ([], [], 0))
    config = Config(mode="benchmark", dataset="synthetic", compare="fp32")
    result = benchmark.run_benchmark(config)
    assert result["peak_gflops"] == {"float32": 250.0, "bfloat16": 300.0, "float16": 200.0}
