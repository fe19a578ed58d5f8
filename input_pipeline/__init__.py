"""Input pipelines: `create_data(config)` returns a `DataSpec` for any `--dataset`."""

from input_pipeline.datasets import DataSpec, create_data

__all__ = ["DataSpec", "create_data"]
