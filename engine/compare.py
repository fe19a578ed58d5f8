"""`--mode=compare`: one short job under several precision x XLA settings, side by side.

Each configuration of `--compare` trains as its own run in `<model_dir>/<name>`
(name `fp32`, `mixed-xla`, ...), so `tensorboard --logdir <model_dir>` overlays
the curves and the HParams dashboard lines the runs up. The table of training
time and final accuracy is printed and written as a text summary in
`<model_dir>` itself.
"""

import os

from engine import config as config_lib
from engine import loop, summaries

HEADER = (
    "configuration",
    "train time (s)",
    "first step (s)",
    "examples/s",
    "skipped steps",
    "final loss scale",
    "eval accuracy",
)


def run_name(precision, xla):
    return f"{precision}-xla" if xla else precision


ALREADY_TRAINED = (
    "—: already trained by an earlier run in this folder, so nothing was timed now; "
    "its timings are in that run's TensorBoard HParams (final/*)"
)


def table_rows(results):
    """One row per (name, `loop.RunResult`), formatted for `HEADER`.

    A run resumed already finished trained nothing in this call: its timing columns
    show "—" instead of the zeros it measured; the rest is read from its checkpoint.
    """
    rows = []
    for name, r in results:
        timed = r.trained_steps > 0
        rows.append(
            (
                name,
                f"{r.train_seconds:.1f}" if timed else "—",
                f"{r.first_step_seconds:.1f}" if timed else "—",
                f"{r.examples_per_sec:.0f}" if timed else "—",
                r.skipped_steps,
                f"{r.loss_scale:g}",
                f"{r.eval_accuracy:.4f}",
            )
        )
    return rows


def compare(config, model_dir):
    """Trains `config` once per `--compare` entry; returns [(run name, RunResult)]."""
    results = []
    for precision, xla in config_lib.parse_compare(config.compare):
        name = run_name(precision, xla)
        run_config = config.replace(
            mode="train",
            precision=precision,
            xla=xla,
            model_dir=os.path.join(model_dir, name),
            # One SavedModel per configuration: a shared folder kept only the last.
            export_dir=os.path.join(config.export_dir, name) if config.export_dir else "",
        )
        results.append((name, loop.train_and_evaluate(run_config, run_config.model_dir)))
    table = summaries.markdown_table(HEADER, table_rows(results))
    if any(r.trained_steps == 0 for _, r in results):
        table += "\n\n" + ALREADY_TRAINED
    # print, not logging: the table is the command's output, even at --verbosity=-1.
    print(f"comparison of {len(results)} configurations under {model_dir}:\n{table}", flush=True)
    writer = summaries.SummaryWriter(model_dir)
    writer.text(0, "compare/table", table)
    writer.close()
    return results
