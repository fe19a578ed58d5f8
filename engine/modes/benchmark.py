"""`--mode=benchmark`: the seed's comparison table, measured on the machine at hand.

Each configuration (precision x XLA, plus TensorFlow's graph-rewrite mixed
precision) runs in a fresh process, so no policy, XLA or grappler setting leaks
from one row into the next (`engine.modes.benchmark_worker`, which prints its
rows). Inside that process the engine and Keras
`model.fit` train the same model on the same data with the same optimizer, and
their timed windows are interleaved (fit, engine, fit, engine, ...: one `fit`
call whose callback runs the engine between its windows) so machine drift hits
both alike; `vs_fit` is the median of the paired ratios.

Run as `python main.py --mode=benchmark [--model=... --image_size=... --batch_size=...]`;
`--compare=fp32,mixed_bf16+xla` measures only those configurations. This module
is the parent: it starts the workers, keeps their rows through a stop signal,
measures the matmul peak before and after them, and prints the table.
"""

import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys

from absl import logging

from engine import config as config_lib
from engine import files, validation
from engine.actions import preemption
from engine.data import data_config
from engine.modes import benchmark_worker
from engine.precision import get_policy

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


def _worker_command(config, graph_rewrite, repeats, steps, fit_scaling="keras"):
    payload = json.dumps(
        {
            "config": dataclasses.asdict(config),
            "graph_rewrite": graph_rewrite,
            "repeats": repeats,
            "steps": steps,
            "fit_scaling": fit_scaling,
        }
    )
    return [sys.executable, "-m", "engine.modes.benchmark_worker", payload]


def _is_pathological(precision, xla, on_gpu):
    return precision == "mixed" and not xla and not on_gpu


def run_benchmark(config):
    """Runs every configuration, prints the markdown table, writes JSON if asked."""
    import tensorflow as tf

    from input_pipeline import create_data

    # Bad data is the user's one-line error here, not a skipped row per configuration.
    create_data(data_config(config))
    on_gpu = bool(tf.config.list_physical_devices("GPU"))
    machine = benchmark_worker.machine()
    before = benchmark_worker.measure_peaks()
    rows, skipped, interrupted = _measure_configurations(config, on_gpu)
    # Measured again after the rows, the best of both kept: a busy moment at
    # either end lowers one measurement, and a low peak inflates every MFU.
    after = before if interrupted else benchmark_worker.measure_peaks()
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
                measured, reason = _run_worker_process(
                    cfg, rewrite, repeats, steps, config.fit_scaling
                )
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
    # A training run's config: the benchmark's own options go to the worker apart.
    cfg = config.replace(
        precision=precision, xla=xla, mode="train", benchmark_json="", fit_scaling="keras"
    )
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


def _run_worker_process(config, graph_rewrite, repeats, steps, fit_scaling="keras"):
    """One configuration in a fresh process: (its rows, None) or ([], why it has none)."""
    try:
        proc = subprocess.run(
            _worker_command(config, graph_rewrite, repeats, steps, fit_scaling),
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
        # mixed_fp8 against bfloat16's peak, its compute dtype (its float8 is emulated here).
        dtype = get_policy(row["precision"]).compute_dtype
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
        if r.get("fit_scaling") == "engine":
            runner += " (engine scaling)"
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
