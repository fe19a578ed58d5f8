"""`--strategy`: TensorFlow's own distribution engine, and who writes what.

  default       one device, no strategy scope of its own (what a plain script gets)
  one_device    `OneDeviceStrategy` on the first GPU, else the CPU
  mirrored      `MirroredStrategy` over the local GPUs; with no GPU, over
                `--num_cpu_devices` logical CPU devices (how the tests run two
                replicas on one CPU)
  multi_worker  `MultiWorkerMirroredStrategy`, cluster from the `TF_CONFIG` variable

Only the chief writes summaries, checkpoints and exports. Every worker must still
take part in saving (saving reads mirrored variables collectively), so the
others write to a private temporary folder that is deleted when they finish.
"""

import json
import os
import shutil
import tempfile

import tensorflow as tf
from absl import logging

from engine.config import STRATEGIES, ConfigError
from engine.files import first_line


def _configure_cpu_devices(num_cpu_devices):
    cpus = tf.config.list_physical_devices("CPU")
    current = tf.config.get_logical_device_configuration(cpus[0])
    if current is not None and len(current) == num_cpu_devices:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * num_cpu_devices
        )
    except RuntimeError as e:  # the runtime was already initialised
        raise ConfigError(
            f"--num_cpu_devices={num_cpu_devices} must be set before TensorFlow starts "
            f"(the process already has {len(tf.config.list_logical_devices('CPU'))})"
        ) from e


def create_strategy(name, num_cpu_devices=1):
    """Returns the `tf.distribute.Strategy` called `name`.

    Raises:
      ConfigError: `multi_worker` without a usable TF_CONFIG, or devices that
        cannot be configured any more (messages name the fix).
    """
    gpus = tf.config.list_physical_devices("GPU")
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    if name == "mirrored":
        if gpus:
            return tf.distribute.MirroredStrategy()
        _configure_cpu_devices(num_cpu_devices)
        devices = [f"/cpu:{i}" for i in range(num_cpu_devices)]
        return tf.distribute.MirroredStrategy(devices)
    if name == "multi_worker":
        check_tf_config()
        try:
            return tf.distribute.MultiWorkerMirroredStrategy()
        except tf.errors.UnknownError as e:  # gRPC could not bind this task's address
            raise ConfigError(
                f"--strategy=multi_worker: this worker cannot start its server ({first_line(e)}); "
                "the address TF_CONFIG gives it must be a free port on this machine"
            ) from None
    raise ConfigError(f"--strategy={name!r} is not one of: {', '.join(STRATEGIES)}")


def replicated(strategy):
    """True for strategies whose variables are mirrored and updated via `merge_call`.

    Decided by the strategy's kind, not its replica count: a `MirroredStrategy` on
    one GPU, or a one-worker `MultiWorkerMirroredStrategy`, still mirrors its
    variables, and their updates cannot run inside the compiled one-replica step.
    """
    return isinstance(
        strategy, (tf.distribute.MirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy)
    )


def check_tf_config():
    """Raises ConfigError unless TF_CONFIG describes a cluster with this task in it."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise ConfigError(
            "--strategy=multi_worker needs the TF_CONFIG environment variable "
            '(e.g. {"cluster": {"worker": ["host1:port", "host2:port"]}, '
            '"task": {"type": "worker", "index": 0}})'
        )
    try:
        spec = json.loads(raw)
        task = spec["task"]
        assert task["index"] < len(spec["cluster"][task["type"]])
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        raise ConfigError(f"TF_CONFIG is not a valid cluster spec ({e!r}): {raw}") from e


def is_chief(strategy):
    """True for the one task that writes summaries, checkpoints and exports."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "worker" and task_id == 0 and not has_chief


class WriteDir:
    """Where this task writes: `model_dir` on the chief, a private temp dir elsewhere."""

    def __init__(self, model_dir, strategy):
        self.chief = is_chief(strategy)
        self.path = model_dir if self.chief else tempfile.mkdtemp(prefix="worker-")
        if not self.chief:
            logging.info("not the chief: writing to temporary %s, deleted at the end", self.path)

    def cleanup(self):
        if not self.chief:
            shutil.rmtree(self.path, ignore_errors=True)
