"""`DataConfig`: what the input pipelines read, and nothing else (no TensorFlow)."""

import dataclasses


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """The pipelines' settings. Field names (and meanings) are main.py's flags.

    No defaults: those are declared once, with the flags; the engine builds one
    from its `Config` (`engine.data.data_config`).
    """

    dataset: str  # shapes | synthetic | tfds:NAME | folder:PATH | ships:PATH
    image_size: int
    batch_size: int  # global: each input pipeline batches its share of it
    eval_batch_size: int
    seed: int
    deterministic: bool  # same batches in the same order, for an exact resume
    train_examples: int  # generated sets only
    eval_examples: int  # generated sets only
    train_split: str
    eval_split: str
    eval_fraction: float  # the stratified hold-out when there is no eval split
    data_dir: str  # TFDS' data directory
    download: bool  # let TFDS download a missing set
    cache: str  # "auto", "", "memory", a folder or a file-path prefix (`paths.cache_prefix`)
    augment: bool
    skip_bad_images: bool
    class_weighting: bool

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)
