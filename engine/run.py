"""The engine's entry point: `run(config)`."""

from engine import compare, loop
from engine import config as config_lib


class UserError(Exception):
    """A problem the user can fix (data, directory); reported as one line."""


def run(config):
    """Trains and evaluates `config`; returns a `loop.RunResult`.

    `--mode=compare` returns [(run name, `loop.RunResult`)], one per `--compare` entry.
    """
    model_dir = config.model_dir or config_lib.default_model_dir(config)
    if config.mode not in ("train", "compare"):
        raise UserError(f"--mode={config.mode} is not available yet; use --mode=train")
    try:
        if config.mode == "compare":
            return compare.compare(config, model_dir)
        return loop.train_and_evaluate(config, model_dir)
    except ValueError as e:
        if isinstance(e, config_lib.ConfigError):
            raise UserError(str(e)) from e
        raise
