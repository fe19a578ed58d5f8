"""`--mode=benchmark`: the seed's comparison table, measured on the machine at hand.

Each configuration (precision x XLA, plus TensorFlow's graph-rewrite mixed
precision) runs in a fresh process, so no policy, XLA or grappler setting leaks
from one row into the next. Inside that process the engine and Keras
`model.fit` train the same model on the same data with the same optimizer, and
their timed windows are interleaved (fit, engine, fit, engine, ...: one `fit`
call whose callback runs the engine between its windows) so machine drift hits
both alike; `vs_fit` is the median of the paired ratios.

Run as `python main.py --mode=benchmark [--model=... --image_size=... --batch_size=...]`;
`--compare=fp32,mixed_bf16+xla` measures only those configurations.
"""

import contextlib
import dataclasses
import json
import math
import os
import platform
import re
import resource
import signal
import statistics
import subprocess
import sys
import time

from absl import logging

from engine import config as config_lib
from engine import files, validation
from engine.actions import preemption
from engine.data import data_config

# (runner label, precision, xla, graph rewrite). The graph rewrite is grappler's
# automatic mixed precision on an fp32 model: float16 on a GPU, oneDNN bfloat16 on a CPU.
CONFIGURATIONS = (
    ("engine", "fp32", False, False),
    ("engine", "fp32", True, False),
    ("engine", "mixed", False, False),
    ("engine", "mixed", True, False),
    ("engine", "mixed_bf16", False, False),
    ("engine", "mixed_bf16", True, False),
    ("graph_rewrite", "fp32", False, True),
)
_WORKER_TIMEOUT_S = 600


def benchmark_configurations(config):
    """The `CONFIGURATIONS` entries to measure.

    `--compare` at its default gives the whole table, grappler's graph rewrite
    included; a chosen list gives the engine configurations it names, in its order.
    """
    if config.compare == config_lib.DEFAULT_COMPARE:
        return CONFIGURATIONS
    return tuple(("engine", p, xla, False) for p, xla in validation.parse_compare(config.compare))


def _machine():
    import keras
    import tensorflow as tf

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    gpus = tf.config.list_physical_devices("GPU")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpus": [g.name for g in gpus],
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "python": platform.python_version(),
    }


def measure_peak_gflops(dtype, size=2048, repeats=7):
    """Best of plain and XLA-compiled square matmuls in `dtype`, as GFLOP/s.

    Each is timed `repeats` times and its fastest call counts: another process
    busy at that moment slows some calls, never speeds one up.
    """
    import tensorflow as tf

    a = tf.random.stateless_normal([size, size], [1, 2], dtype=tf.float32)
    a = tf.cast(a, dtype)
    flops = 2.0 * size**3
    best = 0.0
    for jit in (False, True):
        matmul = tf.function(lambda x: tf.reduce_sum(tf.matmul(x, x)), jit_compile=jit)
        matmul(a).numpy()  # trace, compile, warm the caches
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            matmul(a).numpy()
            times.append(time.perf_counter() - t0)
        best = max(best, flops / min(times) / 1e9)
    return best


def measure_peaks():
    """{dtype: matmul peak GFLOP/s} for the three compute dtypes (see `measure_peak_gflops`)."""
    return {d: measure_peak_gflops(d) for d in ("float32", "bfloat16", "float16")}


def count_train_flops_per_example(model):
    """Counted FLOPs of one training example: 3 x the forward FLOPs of the matmuls.

    Forward FLOPs of a layer are 2 x its multiply-accumulates: Conv2D, Dense (at
    every position it is applied to: each token of a Transformer) and a ViT's
    self-attention (its projections and both attention products). The backward
    pass costs about twice the forward (gradients for inputs and for weights),
    the usual convention for MFU. Elementwise ops, normalisation, softmax and
    pooling are left out (a few percent).
    """
    import keras

    from models import all_layers
    from models.vit import SelfAttention

    forward = 0
    # Nested models are walked into; they are neither Conv2D nor Dense themselves.
    for layer in all_layers(model):
        if isinstance(layer, keras.layers.Conv2D):
            out = layer.output.shape  # (None, H, W, C_out)
            k_h, k_w = layer.kernel_size
            c_in = layer.kernel.shape[2]
            forward += 2 * out[1] * out[2] * out[3] * k_h * k_w * c_in // layer.groups
        elif isinstance(layer, keras.layers.Dense):
            positions = math.prod(layer.output.shape[1:-1])  # 1 for a head's vector
            forward += 2 * positions * layer.kernel.shape[0] * layer.kernel.shape[1]
        elif isinstance(layer, SelfAttention):
            forward += layer.forward_flops(layer.output.shape[1])
    return 3 * forward


# --------------------------------------------------------------------------- worker


def _engine_runner(config, data, loss_scale_override=None):
    """Returns (window(steps) -> seconds, first-call seconds, model)."""
    import tensorflow as tf

    from engine import loop, train_run
    from engine.extras import create_train_step

    strategy = tf.distribute.get_strategy()
    state = train_run.build_state(config, data, strategy)
    if loss_scale_override is not None:
        state.loss_scale = loss_scale_override
    # Timed from here, like fit's first call: the step, the loop and the
    # iterator are built, traced and compiled, and one step runs (as in training).
    start = time.perf_counter()
    stats = loop.LoopStats()
    step = create_train_step(
        state.model, state.optimizer, state.loss_scale, config.batch_size, config.clip_norm
    )
    train_loop = loop.create_train_loop(strategy, step, state, stats, config.xla)
    iterator = iter(strategy.distribute_datasets_from_function(data.train_fn))
    n = tf.constant(config.steps_per_loop, tf.int32)

    def window(steps):
        t0 = time.perf_counter()
        for _ in range(steps // config.steps_per_loop):
            train_loop(iterator, n)
        state.step.numpy()  # wait for the last loop to finish
        return time.perf_counter() - t0

    train_loop(iterator, tf.constant(1, tf.int32))  # n is a tensor: no second trace
    state.step.numpy()
    return window, time.perf_counter() - start, state.model


def _compiled_for_fit(config, data):
    """The model of `config`, compiled for `fit` as the engine would train it."""
    import keras

    from engine import optimizers, train_run
    from engine.precision import get_policy

    policy = get_policy(config.precision)
    model = train_run.create_model_for(config, data.num_classes)
    optimizer = optimizers.create_optimizer(config, config.train_steps or 10**6)
    # Like the engine, clip the unscaled gradients by their global norm: a
    # LossScaleOptimizer unscales them before its inner optimizer clips.
    optimizer.global_clipnorm = config.clip_norm or None
    if policy.loss_scaling and config.loss_scale != "dynamic":
        # Keras 3's static scale is the optimizer's own factor (LossScaleOptimizer
        # is dynamic only); it skips no step, but the engine's check runs in every row.
        optimizer.loss_scale_factor = float(config.loss_scale)
    elif policy.loss_scaling:
        optimizer = keras.optimizers.LossScaleOptimizer(
            optimizer,
            initial_scale=config.initial_scale,
            dynamic_growth_steps=config.growth_interval,
        )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=config.xla,
        steps_per_execution=config.steps_per_loop,
        auto_scale_loss=False,  # would wrap a static scale in a dynamic LossScaleOptimizer
    )
    return model


def _fit_interleaved(config, data, repeats, steps, between_windows):
    """Keras `fit` on the same model, data, optimizer, policy, loss scale and clipping.

    A callback closes a timed window of `fit` every `steps` steps and then calls
    `between_windows()`, which runs the engine's windows: the runners alternate
    A B A B at the granularity of one window, with no `fit` start-up in any
    window. Returns (fit's window seconds, first-call seconds, model).

    Fit's first call is timed alone, one step on a one-batch data set, as the
    engine's: with `steps_per_execution` steps in it, its time would be
    compilation plus steps to subtract, which noise can turn into nothing.
    """
    import keras

    model = _compiled_for_fit(config, data)
    loops_per_window = steps // config.steps_per_loop
    windows = []
    start = time.perf_counter()
    model.fit(data.train_fn().take(1), epochs=1, steps_per_epoch=1, verbose=0)
    first = time.perf_counter() - start

    class _Interleave(keras.callbacks.Callback):
        # With steps_per_execution, a batch-end callback fires once per execution.
        def on_train_begin(self, logs=None):
            self.executions = 0

        def on_train_batch_end(self, batch, logs=None):
            now = time.perf_counter()
            self.executions += 1
            if self.executions == 1:
                pass  # a warm-up: another iterator may have cost fit a second trace
            elif (self.executions - 1) % loops_per_window:
                return
            else:
                windows.append(now - self.window_start)
            if len(windows) < repeats:
                between_windows()
            self.window_start = time.perf_counter()

    model.fit(
        data.train_fn(),
        epochs=1,
        steps_per_epoch=config.steps_per_loop * (1 + repeats * loops_per_window),
        shuffle=False,
        verbose=0,
        callbacks=[_Interleave()],
    )
    if len(windows) != repeats:
        raise RuntimeError(f"fit stopped after {len(windows)} of {repeats} timed windows")
    return windows, first, model


def _warm_up(config, data):
    """One forward and backward pass of a throwaway copy of the model.

    Whichever runner goes first would otherwise also pay for starting the
    runtime (and XLA's), and for oneDNN building its kernels for these shapes, and the
    second would find them ready: time to first step should be tracing and
    compilation alone, for both.
    """
    import tensorflow as tf

    from engine import train_run

    model = train_run.create_model_for(config, data.num_classes)
    images, _ = next(iter(data.train_fn()))

    @tf.function
    def forward_backward(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(x, training=True))
        return tape.gradient(loss, model.trainable_variables)

    forward_backward(images)
    if config.xla:
        # XLA's compiler and runtime start once per process, on the first
        # compiled function: start them here, not inside the first runner's step.
        tf.function(lambda x: tf.reduce_sum(x * x), jit_compile=True)(images)


def _peak_rss_mb():
    # Linux keeps ru_maxrss across fork and exec, so a worker would report at
    # least its parent's peak; VmHWM belongs to this process's own memory.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_worker(config, graph_rewrite, repeats, steps):
    """Measures one configuration in this process; returns a list of row dicts.

    The engine's first call (tracing and compilation) runs before `fit` starts;
    then `fit` trains and, between each of its timed windows, the engine (and,
    for mixed + XLA, its no-op-scale twin) runs one window of the same length.
    `vs_fit` is the median of the per-window ratios fit/engine.
    """
    import keras
    import tensorflow as tf

    from engine.loss_scale import NoOpLossScale
    from input_pipeline import create_data

    if graph_rewrite:
        option = (
            "auto_mixed_precision"
            if tf.config.list_physical_devices("GPU")
            else ("auto_mixed_precision_onednn_bfloat16")
        )
        tf.config.optimizer.set_experimental_options({option: True})
    keras.utils.set_random_seed(config.seed)
    data = create_data(data_config(config))
    _warm_up(config, data)
    engine_window, engine_first, model = _engine_runner(config, data)
    engine_rss = _peak_rss_mb()
    flops = count_train_flops_per_example(model)
    noop_window = None
    if config.precision == "mixed" and config.xla:
        noop_window, _, _ = _engine_runner(config, data, loss_scale_override=NoOpLossScale())
    engine_t, noop_t = [], []

    def between_windows():
        engine_t.append(engine_window(steps))
        if noop_window:
            noop_t.append(noop_window(steps))

    fit_t, fit_first, _ = _fit_interleaved(config, data, repeats, steps, between_windows)
    runner = "graph_rewrite" if graph_rewrite else "engine"
    engine_row = _row(runner, config, engine_t, steps, engine_first, engine_rss, flops)
    engine_row["graph_rewrite"] = graph_rewrite
    engine_row["vs_fit"] = statistics.median(f / e for e, f in zip(engine_t, fit_t, strict=True))
    if noop_t:
        engine_row["loss_scale_overhead"] = statistics.median(
            (d - n) / d for d, n in zip(engine_t, noop_t, strict=True)
        )
    fit_row = _row("keras_fit", config, fit_t, steps, fit_first, _peak_rss_mb(), flops)
    fit_row["graph_rewrite"] = graph_rewrite
    return [engine_row, fit_row]


def _row(runner, config, times, steps, first_call_s, rss_mb, flops_per_example):
    rates = [steps * config.batch_size / t for t in times]
    step_s = statistics.median(times) / steps
    return {
        "runner": runner,
        "model": config.model,
        "precision": config.precision,
        "xla": config.xla,
        "batch_size": config.batch_size,
        "image_size": config.image_size,
        "steps_per_loop": config.steps_per_loop,
        "windows": len(times),
        "steps_per_window": steps,
        "examples_per_sec": statistics.median(rates),
        "examples_per_sec_min": min(rates),
        "examples_per_sec_max": max(rates),
        "step_ms": 1000.0 * step_s,
        "first_step_s": first_call_s,
        "peak_rss_mb": rss_mb,
        "train_gflop_per_example": flops_per_example / 1e9,
        # "dynamic" or a static scale; None where the precision scales no loss.
        "loss_scale": config.loss_scale if config.precision == "mixed" else None,
    }


# --------------------------------------------------------------------------- parent


def _worker_command(config, graph_rewrite, repeats, steps):
    payload = json.dumps(
        {
            "config": dataclasses.asdict(config),
            "graph_rewrite": graph_rewrite,
            "repeats": repeats,
            "steps": steps,
        }
    )
    return [sys.executable, "-m", "engine.modes.benchmark", payload]


def _is_pathological(precision, xla, on_gpu):
    return precision == "mixed" and not xla and not on_gpu


def run_benchmark(config):
    """Runs every configuration, prints the markdown table, writes JSON if asked."""
    import tensorflow as tf

    from input_pipeline import create_data

    # Bad data is the user's one-line error here, not a skipped row per configuration.
    create_data(data_config(config))
    on_gpu = bool(tf.config.list_physical_devices("GPU"))
    machine = _machine()
    before = measure_peaks()
    rows, skipped, interrupted = _measure_configurations(config, on_gpu)
    # Measured again after the rows, the best of both kept: a busy moment at
    # either end lowers one measurement, and a low peak inflates every MFU.
    after = before if interrupted else measure_peaks()
    peaks = {dtype: max(before[dtype], after[dtype]) for dtype in before}
    logging.info("measured matmul peak GFLOP/s: %s", {k: round(v, 1) for k, v in peaks.items()})
    result = {
        "machine": machine,
        "peak_gflops": peaks,
        "rows": rows,
        "skipped": skipped,
        "loss_scale_overhead": next(
            (r["loss_scale_overhead"] for r in rows if "loss_scale_overhead" in r), None
        ),
    }
    _report(config, result, interrupted)
    if interrupted:
        logging.error("interrupted: the table above holds the configurations measured so far")
        raise SystemExit(interrupted)  # 128 + the signal's number, as a shell reports it
    return result


def _measure_configurations(config, on_gpu):
    """Each configuration in its worker: (rows, skipped, exit status of a stop or 0)."""
    rows, skipped, interrupted = [], [], 0
    label = None  # the configuration being measured
    # From the first worker to the last, SIGTERM is handled like Ctrl-C: the
    # running worker is killed and the rows measured so far are kept.
    with preemption.terminate_as_interrupt():
        try:
            for runner, precision, xla, rewrite in benchmark_configurations(config):
                cfg, repeats, steps, reduced_budget = _budget(config, precision, xla, on_gpu)
                label = f"{runner} {precision}{' +xla' if xla else ''}"
                logging.info("benchmarking %s (%d x %d steps)", label, repeats, steps)
                measured, reason = _run_worker_process(cfg, rewrite, repeats, steps)
                if reason:
                    skipped.append({"configuration": label, "reason": reason})
                for row in measured:
                    if reduced_budget:
                        row["reduced_budget"] = reduced_budget
                rows.extend(measured)
                label = None
        except (KeyboardInterrupt, preemption.Terminated) as e:
            # `subprocess.run` has killed a running worker (a Ctrl-C reached it too).
            interrupted = 143 if isinstance(e, preemption.Terminated) else 130
            if label:
                reason = "stopped by SIGTERM" if interrupted == 143 else "interrupted (Ctrl-C)"
                skipped.append({"configuration": label, "reason": reason})
    return rows, skipped, interrupted


def _budget(config, precision, xla, on_gpu):
    """(the worker's config, timed windows, steps per window, why reduced or None)."""
    # Without the JSON path: the parent writes it.
    cfg = config.replace(precision=precision, xla=xla, mode="train", benchmark_json="")
    repeats = config.benchmark_repeats
    if not _is_pathological(precision, xla, on_gpu):
        return cfg, repeats, config.benchmark_steps or config.steps_per_loop, None
    # float16 kernels without XLA on a CPU take up to seconds a step:
    # two windows (or fewer, if asked) of one one-step loop, for both runners.
    r = min(2, repeats)
    why = (
        f"too slow on this device for the full budget: "
        f"{r} window{'s' if r > 1 else ''} of one 1-step loop"
    )
    return cfg.replace(steps_per_loop=1), r, 1, why


def _report(config, result, interrupted):
    """Prints the table and writes the JSON, with stop signals held back meanwhile."""
    with _signals_deferred():
        _add_derived(result["rows"], result["peak_gflops"])
        # The table first: a file that cannot be written must not take it along.
        print(format_table(result["rows"], result["skipped"]), flush=True)
        if config.benchmark_json:
            try:
                _write_json(config.benchmark_json, result)
            except config_lib.ConfigError as e:
                if not interrupted:
                    raise
                logging.error("%s", e)  # the exit status still says what stopped the run


def _run_worker_process(config, graph_rewrite, repeats, steps):
    """One configuration in a fresh process: (its rows, None) or ([], why it has none)."""
    try:
        proc = subprocess.run(
            _worker_command(config, graph_rewrite, repeats, steps),
            capture_output=True,
            text=True,
            timeout=_WORKER_TIMEOUT_S,
            env=_worker_env(),  # the user's folder: relative paths mean the same
        )
    except subprocess.TimeoutExpired:
        return [], f"timed out after {_WORKER_TIMEOUT_S} s"
    if proc.returncode != 0:
        return [], _failure_reason(proc)
    return json.loads(proc.stdout.strip().splitlines()[-1]), None


def _write_json(path, result):
    try:
        with files.written_whole(path) as f:
            json.dump(result, f, indent=2, allow_nan=False)
    except OSError as e:  # checked at start-up, but the folder may have gone since
        raise config_lib.ConfigError(
            f"--benchmark_json={path} could not be written ({e.strerror or e}); "
            "the table above holds the results"
        ) from None


@contextlib.contextmanager
def _signals_deferred():
    """Holds SIGTERM and SIGINT back while the results are printed and written."""
    held = {signal.SIGTERM, signal.SIGINT}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _worker_env():
    # The repository's root, three levels up from engine/modes/benchmark.py.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=root + (os.pathsep + path if path else ""))


def _failure_reason(proc):
    """One line for a worker that failed: how it ended and its last own message."""
    how = (
        f"killed by signal {-proc.returncode}"
        if proc.returncode < 0
        else f"exited with status {proc.returncode}"
    )
    # TensorFlow's own log lines (I0000 ..., W1128 ...) say nothing about the failure.
    own = [
        line
        for line in proc.stderr.strip().splitlines()
        if line.strip() and not re.match(r"^([IWEF]\d{4} |WARNING: All log messages)", line)
    ]
    return f"worker {how}: {own[-1].strip()}" if own else f"worker {how}"


def _add_derived(rows, peaks):
    base = {
        r["model"]: r["examples_per_sec"]
        for r in rows
        if r["runner"] == "engine" and r["precision"] == "fp32" and not r["xla"]
    }
    for row in rows:
        dtype = {"fp32": "float32", "mixed": "float16", "mixed_bf16": "bfloat16"}[row["precision"]]
        if row.get("graph_rewrite"):  # grappler rewrote the fp32 graph to bfloat16 (CPU)
            dtype = "bfloat16"
        gflops = row["examples_per_sec"] * row["train_gflop_per_example"]
        # Above 1 is impossible: the peak was measured low (a busy machine), and
        # then no MFU of this row is a result (None; the table says why).
        row["mfu"] = gflops / peaks[dtype] if gflops <= peaks[dtype] else None
        row["mfu_vs_fp32_peak"] = gflops / peaks["float32"]
        # None (JSON null) when the fp32 baseline did not run: JSON has no NaN.
        fp32 = base.get(row["model"])
        row["speedup_vs_fp32"] = row["examples_per_sec"] / fp32 if fp32 else None


def _mfu(mfu):
    return "peak disturbed" if mfu is None else f"{100 * mfu:.1f}%"


def format_table(rows, skipped=()):
    """The markdown table printed at the end of a benchmark."""
    lines = [
        "| runner | model | precision | xla | ex/s (median, min-max) | step ms | vs fp32 | "
        "first step s | peak RSS MB | MFU | engine/fit |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        vs_fit = f"{r['vs_fit']:.2f}" if "vs_fit" in r else ""
        speedup = "n/a" if r["speedup_vs_fp32"] is None else f"{r['speedup_vs_fp32']:.2f}x"
        runner = r["runner"]
        if r.get("graph_rewrite") and runner == "keras_fit":
            runner += " (rewrite)"
        lines.append(
            f"| {runner} | {r['model']} {r['image_size']}px b{r['batch_size']} | "
            f"{r['precision']} | {'on' if r['xla'] else 'off'} | "
            f"{r['examples_per_sec']:.1f} ({r['examples_per_sec_min']:.1f}-"
            f"{r['examples_per_sec_max']:.1f}) | {r['step_ms']:.1f} | "
            f"{speedup} | {r['first_step_s']:.1f} | {r['peak_rss_mb']:.0f} | "
            f"{_mfu(r['mfu'])} | {vs_fit} |"
        )
    for s in skipped:
        lines.append(f"| skipped: {s['configuration']} | {s['reason']} |||||||||")
    reduced = {
        (r["precision"], r["xla"]): r["reduced_budget"] for r in rows if "reduced_budget" in r
    }
    for (precision, xla), why in reduced.items():
        lines.append(f"\n{precision}{' +xla' if xla else ''}: {why}")
    measured = [r for r in rows if "loss_scale_overhead" in r]
    if measured:
        scale = measured[0].get("loss_scale", "dynamic")
        kind = "dynamic" if scale == "dynamic" else f"static ({scale})"
        overhead = measured[0]["loss_scale_overhead"]
        # The scaled step does more work than its no-op twin: a negative figure
        # means this run's timing noise was larger than the overhead.
        noise = " (negative: below the noise of this run)" if overhead < 0 else ""
        lines.append(
            f"\n{kind} loss scaling overhead (mixed +xla): "
            f"{100 * overhead:.1f}% of step time{noise}"
        )
    return "\n".join(lines)


def main(argv):
    payload = json.loads(argv[1])
    config = config_lib.Config(**payload["config"])
    rows = run_worker(config, payload["graph_rewrite"], payload["repeats"], payload["steps"])
    print(json.dumps(rows))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main(sys.argv)
