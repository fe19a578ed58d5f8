"""The engine's entry point: `run(config)`."""

from engine import checkpointing, loop
from engine import config as config_lib
from engine.guards import TrainingDiverged

__all__ = ["TrainingDiverged", "UserError", "run"]


class UserError(Exception):
    """A problem the user can fix (data, directory); reported as one line."""


def run(config):
    """Trains and evaluates `config`; returns a `loop.RunResult`."""
    model_dir = config.model_dir or config_lib.default_model_dir(config)
    if config.mode != "train":
        raise UserError(f"--mode={config.mode} is not available yet; use --mode=train")
    try:
        return loop.train_and_evaluate(config, model_dir)
    except checkpointing.DamagedCheckpoints as e:
        raise UserError(str(e)) from e
    except ValueError as e:
        if isinstance(e, config_lib.ConfigError):
            raise UserError(str(e)) from e
        raise
