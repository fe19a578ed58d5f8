"""The engine's entry point: `run(config)`."""

from absl import logging

from engine import checkpoints, preflight, run_paths, train
from engine import config as config_lib
from engine.actions import export
from engine.actions.divergence import TrainingDiverged
from engine.actions.preemption import Terminated, terminate_as_interrupt
from engine.files import one_line
from engine.modes import compare, predict
from input_pipeline.preprocessing import DataError

__all__ = ["Terminated", "TrainingDiverged", "UserError", "run", "terminate_as_interrupt"]


class UserError(Exception):
    """A problem the user can fix (data, directory); reported as one line.

    One line by construction (`engine.files.one_line`): it carries the text of
    the errors `run` turns into it, a library's among them.
    """

    def __init__(self, message):
        super().__init__(one_line(message))


def run(config, model_dir=None):
    """Runs `config.mode` in `model_dir` and returns what it produced.

    `model_dir` defaults to `config.model_dir`, else a new `default_model_dir`.
    train: a `train.RunResult`; predict: the CSV's path; compare: [(run name,
    `train.RunResult`)], one per `--compare` entry; benchmark: the results dict;
    input_benchmark: its figures.
    The paths it will write are checked first (`engine.preflight.check`).
    """
    model_dir = model_dir or config.model_dir or run_paths.default_model_dir(config)
    entry_points = {
        "train": _train,
        "predict": predict.predict,
        "compare": compare.compare,
        "benchmark": _benchmark,
        "input_benchmark": _input_benchmark,
    }
    try:
        preflight.check(config)
        return entry_points[config.mode](config, model_dir)
    except checkpoints.DamagedCheckpoints as e:
        raise UserError(str(e)) from e
    except export.ExportError as e:
        # Raised after the last step was saved: a rerun trains nothing and exports
        # (a comparison's also trains the configurations after it).
        purpose = e.rerun if isinstance(e, compare.ExportFailed) else "export"
        hint = run_paths.resume_hint(config, model_dir, purpose=purpose)
        raise UserError(
            f"{e}; the last step's checkpoint is saved: fix the folder, then {hint}"
        ) from e
    except ValueError as e:
        if isinstance(e, (config_lib.ConfigError, DataError)):
            raise UserError(str(e)) from e
        raise


def _train(config, model_dir):
    result = train.train_and_evaluate(config, model_dir)
    if result.stopped_by:
        hint = run_paths.resume_hint(config, model_dir)
        logging.info("%s: stopped; %s", result.stopped_by, hint)
    return result


def _benchmark(config, model_dir):
    del model_dir  # each configuration runs in a worker and writes no run folder
    from engine.modes import benchmark  # only this mode needs it

    return benchmark.run_benchmark(config)


def _input_benchmark(config, model_dir):
    del model_dir  # it times the pipeline in a temporary folder and writes no run folder
    from engine.modes import input_benchmark  # only this mode needs it

    return input_benchmark.run_input_benchmark(config)
