"""One benchmark worker: what `--mode=benchmark` measures for one configuration.

`engine.modes.benchmark` starts this module once per configuration
(`python -m engine.modes.benchmark_worker <json>`), so no policy, XLA or grappler
setting leaks from one row into the next; it prints its rows as one JSON line.
Here: the engine's runner and Keras `fit`'s, their interleaved timed windows,
the model's counted FLOPs, the matmul peak and the process's peak memory.
"""

import json
import math
import os
import platform
import resource
import statistics
import sys
import time

from engine import config as config_lib
from engine.data import data_config


def machine():
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
        state.model,
        state.optimizer,
        state.loss_scale,
        config.batch_size,
        config.clip_norm,
        float8=state.float8,
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


def _compiled_for_fit(config, data, fit_scaling="keras"):
    """The model of `config`, compiled for `fit` as the engine would train it."""
    import keras

    from engine import optimizers, train_run
    from engine.precision import get_policy

    policy = get_policy(config.precision)
    model = train_run.create_model_for(config, data.num_classes)
    if policy.float8:  # the anchor: Keras' float8 Dense (delayed scaling), on the same layers
        from engine import float8

        model.quantize("float8", filters=float8.default_predicate)
    optimizer = optimizers.create_optimizer(config, config.train_steps or 10**6)
    # Like the engine, clip the unscaled gradients by their global norm: a
    # LossScaleOptimizer unscales them before its inner optimizer clips.
    optimizer.global_clipnorm = config.clip_norm or None
    compile_args = dict(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=config.xla,
        steps_per_execution=config.steps_per_loop,
    )
    if fit_scaling == "engine":  # the engine's step inside fit (engine.keras_fit)
        from engine import keras_fit

        scale = dict(initial_scale=config.initial_scale, growth_interval=config.growth_interval)
        if config.loss_scale != "dynamic":
            scale = float(config.loss_scale)
        return keras_fit.compile_for_fit(model, optimizer, loss_scale=scale, **compile_args)
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
    # auto_scale_loss: it would wrap a static scale in a dynamic LossScaleOptimizer.
    model.compile(optimizer=optimizer, auto_scale_loss=False, **compile_args)
    return model


def _fit_interleaved(config, data, repeats, steps, between_windows, fit_scaling="keras"):
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

    model = _compiled_for_fit(config, data, fit_scaling)
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


def run_worker(config, graph_rewrite, repeats, steps, fit_scaling="keras"):
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

    fit_t, fit_first, _ = _fit_interleaved(
        config, data, repeats, steps, between_windows, fit_scaling
    )
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
    fit_row["fit_scaling"] = fit_scaling
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


def main(argv):
    payload = json.loads(argv[1])
    config = config_lib.Config(**payload["config"])
    rows = run_worker(
        config,
        payload["graph_rewrite"],
        payload["repeats"],
        payload["steps"],
        payload["fit_scaling"],
    )
    print(json.dumps(rows))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main(sys.argv)
