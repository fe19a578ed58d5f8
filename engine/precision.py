"""Precision policies as data: one name decides every dtype and whether to scale."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Policy:
    """What a precision name means.

    Attributes:
      name: the `--precision` value.
      keras_policy: the Keras dtype-policy name given to every layer.
      compute_dtype: dtype of activations and matmuls inside the model.
      variable_dtype: dtype of the weights (always float32 here).
      loss_scaling: whether float16's narrow range needs a loss scale.
      float8: whether the Transformer blocks' matmuls run on float8 operands
        (`engine.float8`, its recipe chosen by `--fp8_recipe`).
    """

    name: str
    keras_policy: str
    compute_dtype: str
    variable_dtype: str
    loss_scaling: bool
    float8: bool = False


POLICIES = {
    "fp32": Policy("fp32", "float32", "float32", "float32", loss_scaling=False),
    "mixed": Policy("mixed", "mixed_float16", "float16", "float32", loss_scaling=True),
    # bfloat16 has float32's exponent range: gradients cannot underflow, so no scale.
    "mixed_bf16": Policy("mixed_bf16", "mixed_bfloat16", "bfloat16", "float32", loss_scaling=False),
    # mixed_bf16, and float8 operands in the ViT blocks' matmuls: the scaling is float8's
    # own, per tensor (or tile), in `engine.float8`; the loss needs none.
    "mixed_fp8": Policy(
        "mixed_fp8", "mixed_bfloat16", "bfloat16", "float32", loss_scaling=False, float8=True
    ),
}


def get_policy(name: str) -> Policy:
    """Returns the policy called `name` (one of `POLICIES`)."""
    try:
        return POLICIES[name]
    except KeyError:
        hint = " (decide 'auto' first: engine.machine.resolve)" if name == "auto" else ""
        raise ValueError(
            f"unknown precision {name!r}; choose one of {', '.join(POLICIES)}{hint}"
        ) from None


def slow_combination_warning(policy: Policy, xla: bool, device_type: str, family="resnet"):
    """One line warning about a combination measured to be slow here, or None.

    `device_type` is "GPU" or "CPU"; `family` the model's, "resnet" or "vit" (XLA pays
    for a ViT on a CPU too). The figures are in BUILD_NOTES.md.
    """
    if device_type != "CPU":
        return None
    if policy.compute_dtype == "float16" and not xla:
        return (
            "float16 without XLA on a CPU runs unfused, unoptimised kernels and is very "
            "slow; add --xla, or use --precision=fp32 on this machine"
        )
    if policy.compute_dtype == "float16":
        return (
            "float16 on a CPU is slower than fp32 even with XLA; mixed precision pays off on GPUs"
        )
    if xla and family != "vit":
        return (
            "XLA on a CPU is usually slower than TensorFlow's oneDNN kernels; drop --xla for speed"
        )
    return None
