"""Input pipelines: `create_data(DataConfig)` returns a `DataSpec` for any `--dataset`.

Its names load on first use, so `input_pipeline.paths` and `input_pipeline.config`
import without TensorFlow: `engine/config.py` checks flags before TensorFlow loads.
"""

import importlib

__all__ = ["DataConfig", "DataError", "DataSpec", "create_data"]
_HOMES = {
    "DataConfig": "config",
    "DataError": "preprocessing",
    "DataSpec": "datasets",
    "create_data": "datasets",
}


def __getattr__(name):
    if name not in _HOMES:
        raise AttributeError(f"module 'input_pipeline' has no attribute {name!r}")
    return getattr(importlib.import_module(f"input_pipeline.{_HOMES[name]}"), name)
