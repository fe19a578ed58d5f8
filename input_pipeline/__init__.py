"""Input pipelines: `create_data(config)` returns a `DataSpec` for any `--dataset`."""

from input_pipeline.datasets import DataSpec, create_data
from input_pipeline.preprocessing import DataError

__all__ = ["DataError", "DataSpec", "create_data"]
