"""`--mode=compare`: one short job under several precision x XLA settings, side by side.

Each configuration of `--compare` trains as its own run in `<model_dir>/<name>`
(name `fp32`, `mixed-xla`, ...), so `tensorboard --logdir <model_dir>` overlays
the curves and the HParams dashboard lines the runs up. The table of training
time and final accuracy is printed and written as a text summary in
`<model_dir>` itself.

A configuration that diverges is a row of the table, not the end of the
comparison: the others still run, and the command then fails as a diverged
training run does (`divergence.TrainingDiverged`, exit status 3). Its folder keeps
its last good checkpoint, so rerunning the comparison resumes it from there
like any unfinished configuration.

A stop signal ends the comparison, with the table of what ran so far. Caught
by a configuration's training loop, it saves and the command exits 0, or, if
a configuration diverged (that one too, in the loop the signal came in), ends
as interrupted (main.py: exit 128 + N), not as diverged: the rest never ran,
and a rerun trains them. Outside that loop
(start-up, the final eval, the export) it unwinds at once: the configuration is
an `unfinished` row and the command ends as interrupted.

A configuration whose SavedModel cannot be written (`export.ExportError`) ends
the comparison the same way, as an `export failed` row: the command ends with
the error's one line (exit 2), and a rerun exports it and trains the rest.
"""

import math
import os

from absl import logging

from engine import run_paths, train, validation
from engine.actions import divergence, export, preemption, summaries

HEADER = (
    "configuration",
    "steps",
    "train time (s)",
    "first step (s)",
    "examples/s",
    "skipped steps",
    "final loss scale",
    "eval accuracy",
)

STEPS_NOTE = (
    "steps: those this call trained, which the timings cover; `a-b`: resumed from "
    "a checkpoint at step a-1; `(trained before)`: finished by an earlier call, "
    "nothing timed now (its own timings are in its HParams `final/*`); "
    "`(stopped by SIG...)`: stopped early, eval accuracy is from its last eval (— if none "
    "ran); `diverged at step N`: the divergence guard stopped it there, without saving "
    "(a rerun resumes it from its last good checkpoint), so no eval accuracy; `unfinished "
    "(stopped by SIG...)`: a signal ended it outside its training loop (start-up, final eval, "
    "export) or a second one inside it, so no figures (a rerun resumes it from its last "
    "checkpoint); `export failed`: trained and saved, but its SavedModel could not be written "
    "(the error line says why), so no figures (a rerun trains nothing more and exports it)"
)


class ExportFailed(export.ExportError):
    """A configuration's export failed; `rerun`: what rerunning the comparison does."""

    def __init__(self, message, rerun):
        super().__init__(message)
        self.rerun = rerun


def run_name(precision, xla):
    return f"{precision}-xla" if xla else precision


def _steps_cell(r):
    if r.diverged:
        return f"diverged at step {r.steps} ({r.diverged})"
    start = r.steps - r.trained_steps
    if r.trained_steps == 0:
        cell = f"{r.steps}" if r.stopped_by else f"{r.steps} (trained before)"
    elif start > 0:
        cell = f"{start + 1}-{r.steps}"
    else:
        cell = f"{r.steps}"
    return f"{cell} (stopped by {r.stopped_by})" if r.stopped_by else cell


def _figure(value, spec):
    return "—" if math.isnan(value) else format(value, spec)


def table_rows(results):
    """One row per (name, `train.RunResult`), formatted for `HEADER`.

    Timings cover the steps this call trained (see `STEPS_NOTE`): "—" where
    nothing was timed, never a zero that reads as a measurement.
    """
    rows = []
    for name, r in results:
        timed = r.trained_steps > 0
        rows.append(
            (
                name,
                _steps_cell(r),
                f"{r.train_seconds:.1f}" if timed else "—",
                f"{r.first_step_seconds:.1f}" if timed else "—",
                # The first step is timed apart: one step alone gives no rate.
                f"{r.examples_per_sec:.0f}" if r.examples_per_sec else "—",
                r.skipped_steps,
                _figure(r.loss_scale, "g"),
                # nan: no eval yet (stopped first), or none of the diverged weights.
                _figure(r.eval_accuracy, ".4f"),
            )
        )
    return rows


def compare(config, model_dir):
    """Trains `config` once per `--compare` entry; returns [(run name, RunResult)].

    Raises:
      KeyboardInterrupt, preemption.Terminated: after the table, if a stop signal
        ended a configuration outside its training loop, or stopped the
        comparison after a configuration diverged.
      ExportFailed: after the table, if a configuration's export failed.
      divergence.TrainingDiverged: after the table, if a configuration diverged.
    """
    results = []
    configurations = list(_configurations(config, model_dir))
    for name, run_config in configurations:
        try:
            result = _train(run_config, name)
        except (KeyboardInterrupt, preemption.Terminated) as e:
            # On its way to main.py, which ends the command: what ran is reported first.
            stopped_by = "SIGINT" if isinstance(e, KeyboardInterrupt) else "SIGTERM"
            _report(results, model_dir, unfinished=(name, f"unfinished (stopped by {stopped_by})"))
            _warn_diverged(results, len(results) + 1)
            raise
        except export.ExportError as e:
            _report(results, model_dir, unfinished=(name, "export failed"))
            _warn_diverged(results, len(results) + 1)
            rest = len(configurations) > len(results) + 1
            # run.py's one line: exit 2, and what the same command then does.
            rerun = "export it and train the rest" if rest else "export it"
            raise ExportFailed(f"{name}: {e}", rerun) from e
        results.append((name, result))
        if result.stopped_by:
            # The signal was for the whole comparison, not one configuration.
            logging.info(
                "%s: stopped; %s and train the rest",
                result.stopped_by,
                run_paths.resume_hint(config, model_dir),
            )
            break
    _report(results, model_dir)
    stopped_by = results[-1][1].stopped_by
    if stopped_by and _warn_diverged(results, len(results)):
        # Interrupted, not exit 3 ("do not retry"): the rest never ran, a rerun trains them.
        raise KeyboardInterrupt if stopped_by == "SIGINT" else preemption.Terminated()
    diverged = _diverged(results, len(results))
    if diverged:
        # As a diverged training run ends: exit status 3, one line.
        raise divergence.TrainingDiverged(f"{diverged}; see the table above")
    return results


def _configurations(config, model_dir):
    """(run name, its training `Config`) for each `--compare` entry."""
    for precision, xla in validation.parse_compare(config.compare):
        name = run_name(precision, xla)
        run_config = config.replace(
            mode="train",
            precision=precision,
            xla=xla,
            model_dir=os.path.join(model_dir, name),
            # One SavedModel per configuration: a shared folder kept only the last.
            export_dir=os.path.join(config.export_dir, name) if config.export_dir else "",
        )
        # The loss-scale flags are float16's, the float8 flags mixed_fp8's: another
        # precision's run keeps the defaults, so its flags.txt replays and its folder
        # resumes alone.
        yield name, run_config.without_other_precisions_flags()


def _report(results, model_dir, unfinished=None):
    """Prints the table and writes it as `compare/table` in `model_dir`.

    `unfinished`: (run name, steps cell) of a configuration that returned no
    `RunResult` (a signal outside its training loop, a failed export), a row
    with no figures.
    """
    rows = table_rows(results)
    if unfinished:
        name, cell = unfinished
        rows.append((name, cell, *["—"] * 6))
    table = summaries.markdown_table(HEADER, rows) + "\n\n" + STEPS_NOTE
    # print, not logging: the table is the command's output, even at --verbosity=-1.
    print(f"comparison of {len(rows)} configurations under {model_dir}:\n{table}", flush=True)
    writer = summaries.SummaryWriter(model_dir)
    writer.text(0, "compare/table", table)
    writer.close()


def _diverged(results, configurations):
    """One line naming those of `configurations` (a count) that diverged, or "" if none did."""
    diverged = [f"{name} (step {r.steps}: {r.diverged})" for name, r in results if r.diverged]
    if not diverged:
        return ""
    return (
        f"training diverged in {len(diverged)} of {configurations} configurations: "
        f"{', '.join(diverged)}"
    )


def _warn_diverged(results, configurations):
    """Logs what diverged where a stop ends the command (its line names only the signal)."""
    diverged = _diverged(results, configurations)
    if diverged:
        logging.warning("%s; the comparison was stopped before the rest ran", diverged)
    return diverged


def _train(run_config, name):
    """One configuration's `RunResult`; a divergence becomes a row, not the end."""
    try:
        return train.train_and_evaluate(run_config, run_config.model_dir)
    except divergence.TrainingDiverged as e:
        logging.warning("%s: %s", name, e)  # the whole message: why, what to try, last checkpoint
        nan = float("nan")
        return train.RunResult(
            model_dir=run_config.model_dir,
            steps=e.step,
            skipped_steps=e.skipped_steps,
            loss_scale=e.loss_scale,
            train_loss=nan,
            eval_loss=nan,
            eval_accuracy=nan,
            train_seconds=0.0,
            first_step_seconds=0.0,
            examples_per_sec=0.0,
            # A stop in the loop that diverged still stops the comparison.
            stopped_by=e.stopped_by,
            diverged=e.reason,
        )
