"""`--precision=auto`: the precision and XLA setting that suit the machine at hand.

Decided once, when a run starts, from what TensorFlow reports (GPUs and their
compute capability; oneDNN) and the CPU's bfloat16 instructions; logged with the
reason and recorded in config.json and flags.txt, so a resumed run, or a
replayed flags.txt on another machine, keeps what the run started with.
"""

from absl import logging

from engine import checkpoints, families


def choose(gpu_capabilities, onednn_bf16, family="resnet"):
    """(precision, xla, reason) that `--precision=auto` takes on a machine.

    Args:
      gpu_capabilities: the (major, minor) CUDA compute capability of each GPU
        TensorFlow sees (empty on a CPU-only machine).
      onednn_bf16: TensorFlow runs oneDNN kernels and the CPU has bfloat16
        instructions (AVX512_BF16 or AMX_BF16).
      family: the model's (`engine.families.model_family`): "resnet" or "vit".
    """
    if gpu_capabilities:
        if min(gpu_capabilities) >= (7, 0):
            return "mixed", True, "GPUs with tensor cores (compute capability 7.0 or more)"
        return "fp32", False, "GPUs without tensor cores (compute capability below 7.0)"
    if family == "vit":
        # Measured (BUILD_NOTES): on a CPU, XLA's fusion of LayerNorm, GELU, softmax and
        # the residual adds pays more than bfloat16's kernels on a ViT's small matmuls.
        return "fp32", True, "a Vision Transformer on a CPU (XLA fuses its elementwise work)"
    if onednn_bf16:
        # Measured by the project's benchmark (BUILD_NOTES): bfloat16 1.5-1.7x fp32
        # on oneDNN's kernels, XLA slower than them on convolutions.
        return "mixed_bf16", False, "a CPU with bfloat16 instructions and oneDNN"
    return "fp32", False, "a CPU without bfloat16 instructions (or oneDNN off)"


def machine():
    """What `choose` needs, as TensorFlow and the CPU report it."""
    import tensorflow as tf
    from tensorflow.python.util import _pywrap_util_port

    capabilities = []
    for gpu in tf.config.list_physical_devices("GPU"):
        capabilities.append(
            tuple(tf.config.experimental.get_device_details(gpu).get("compute_capability", (0, 0)))
        )
    return capabilities, _pywrap_util_port.IsMklEnabled() and _cpu_has_bf16()


def _cpu_has_bf16():
    """The CPU flags TensorFlow's feature guard also logs (Linux's /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


def resolve(config, model_dir):
    """`config` with `--precision=auto` (and an unset `--xla`) decided.

    A resumed run keeps the precision its config.json records (and its XLA
    setting, unless `--xla`/`--noxla` is given: XLA may change on resume).
    """
    if config.precision != "auto":
        return config.replace(xla=bool(config.xla))
    saved = checkpoints.resumed_config(model_dir, config.fresh) or {}
    if saved.get("precision", "auto") != "auto":
        xla = saved.get("xla", False) if config.xla is None else config.xla
        logging.info(
            "--precision=auto: %s%s, as the run in %s started",
            saved["precision"],
            " + XLA" if xla else "",
            model_dir,
        )
        return config.replace(precision=saved["precision"], xla=bool(xla))
    precision, xla, reason = choose(*machine(), families.model_family(config.model))
    if config.xla is not None:
        xla = config.xla
    logging.info("--precision=auto: %s%s, for %s", precision, " + XLA" if xla else "", reason)
    return config.replace(precision=precision, xla=xla)
