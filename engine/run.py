"""The engine's entry point: `run(config)`."""

from engine import config as config_lib
from engine import loop, predict
from input_pipeline.preprocessing import DataError


class UserError(Exception):
    """A problem the user can fix (data, directory); reported as one line."""


def run(config):
    """Trains and evaluates `config` (a `loop.RunResult`), or predicts (the CSV's path)."""
    model_dir = config.model_dir or config_lib.default_model_dir(config)
    if config.mode == "benchmark":
        from engine import benchmark

        return benchmark.run_benchmark(config)
    entry_points = {"train": loop.train_and_evaluate, "predict": predict.predict}
    if config.mode not in entry_points:
        raise UserError(f"--mode={config.mode} is not available yet; use --mode=train")
    try:
        return entry_points[config.mode](config, model_dir)
    except ValueError as e:
        if isinstance(e, (config_lib.ConfigError, DataError)):
            raise UserError(str(e)) from e
        raise
