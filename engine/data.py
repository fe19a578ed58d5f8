"""The engine's `Config` as the input pipeline's own `DataConfig`."""

import dataclasses

from input_pipeline.config import DataConfig


def data_config(config):
    """The `input_pipeline.DataConfig` holding `config`'s values of its fields."""
    return DataConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(DataConfig)})
