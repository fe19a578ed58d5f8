"""Float8 matmuls, by hand: the formats, the scaling recipes and their state.

TensorFlow has no float8 matmul kernel: a quantized matmul quantizes each
operand to float8 with a scale s, dequantizes it to float32 and multiplies in
float32. For a Dense layer, x flattened to [M, K] and its kernel W [K, N]:

    q(t) = float32(float8(clip(t * s, -max, max))) * (1 / s)   # TF's cast does not saturate
    forward:   y = q(x) @ q(W)                                  # x, W: E4M3 (max 448)
    backward:  dx = q(dy) @ q(W)^T,  dW = q(x)^T @ q(dy)        # dy: E5M2 (max 57344)

The scale multiplies (Transformer Engine's convention; Keras stores 1 / s); a nan
stays nan, an inf becomes +-max. A scale comes from an amax (the largest |value|):
scale(a) = max / a * 2**-margin (margin 0 by default), or 1 where a is 0 or not
finite (delayed: the previous scale, as Keras). The recipes share one interface,
`NoFloat8` its no-op twin, so the step reads the same with float8 off; evaluation
(`training=False`) quantizes alike and records nothing:

    current:  s = scale(this tensor's amax now), per tensor.
    delayed:  per tensor, in the order of Keras' float8 Dense (matched bit for bit):
                  quantize with the stored s;  pending = this tensor's amax now
              then commit(finite), after the step applied or skipped its update:
                  where finite and pending is finite:
                      s = scale(max(history))        # the history before this step
                      history = roll(history), pending written in
              so s follows the amaxes two steps late (Transformer Engine's PyTorch
              order: one). A skipped step's amaxes may be inf or nan and would pin
              the scale for N steps: it leaves s and the history as they were, and
              so does a non-finite amax on an applied step (an inf that saturated).
    block:    all E4M3; one s per tile along each matmul's contraction axis, from
              the tile's amax now (DeepSeek-V3): x and dy per 1 x 128 values of a
              row for y and dx, per 128 x 1 values of a column for dW (which sums
              over M), W per 128 x 128 block. A dimension that is not a multiple
              of 128 is padded with zeros, which change no amax: a smaller last tile.
    unscaled: s = 1 (an ablation: what float8 does without the scales).

Choices. Operands are dequantized to float32 and summed in float32 (TF 2.21's
`matmul(output_type=float32)` of bfloat16 runs under XLA only). Measured on the
2-core EPYC at ViT-mini size (x [64, 16, 128], W [128, 512]), a step's three float32
matmuls take what bfloat16's do under XLA (5.4 ms) and 4.9 against 2.7 ms without.
The kernel is quantized from its float32 master copy (one rounding; dW comes back
float32). Scales are rounded down to a power of two, making the dequantize exact,
only with `power_of_two=True`: the anchor does not round. Statistics count each
tensor once a step (block: the tiles for y and dx, and the smallest tile scale, what
a per-tensor scale would be); they cost ~3 of that Dense step's 11 ms under XLA:
`statistics=False` drops them.

Replicas. Delayed scales are state carried across steps: `commit` takes the max of
the pending amaxes over replicas, so all replicas keep one history and quantize with
the same scales, which a checkpoint (replica 0's copy) holds. The per-step recipes
need no collective: each replica scales its own activations and gradients (kernels,
identical everywhere, get identical scales), and that replicas use different scales
is harmless, as only the all-reduced sum of their gradients reaches the update.

State. `recipe.state` (a `tf.Module` for the engine's checkpoint) holds the delayed
histories and scales, outside the model's variables and the gradients (Keras passes
new scales as gradients: here they would be unscaled, summed, clipped, checked).
Pending amaxes and `recipe.statistics` are scratch; all are per-replica (`ON_READ`).

XLA. The float8 converts stay in front of each dot in the optimized HLO (tested).
XLA's GPU compiler can rewrite convert, scale and dot into a float8 cuBLASLt GEMM
on compute capability 8.9 and newer for scalar scales (current, delayed), unless
both operands are E5M2; block scales do not fit, so block stays emulated there.
"""

import collections

import keras
import numpy as np
import tensorflow as tf
from keras.src.backend import AutocastScope

Format = collections.namedtuple("Format", ["name", "dtype", "max", "overflow"])
Format.__doc__ = "A float8 format; `overflow`: where rounding would go past `max`."
E4M3 = Format("e4m3", tf.dtypes.experimental.float8_e4m3fn, 448.0, 464.0)
E5M2 = Format("e5m2", tf.dtypes.experimental.float8_e5m2, 57344.0, 61440.0)
KINDS = ("inputs", "kernels", "gradients")
TILE = 128
_ON_READ = dict(
    trainable=False,
    synchronization=tf.VariableSynchronization.ON_READ,
    aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
)


def quantize(x, scale, fmt):
    """`x * scale` in float32, saturated at +-`fmt.max`, rounded to `fmt` (to nearest even)."""
    scaled = tf.cast(x, tf.float32) * scale
    return tf.cast(tf.clip_by_value(scaled, -fmt.max, fmt.max), fmt.dtype)


def quantize_dequantize(x, scale, fmt, dtype=None):
    """`x` through float8 and back, in `dtype` (default `x.dtype`); `scale` broadcasts to x."""
    return tf.cast(tf.cast(quantize(x, scale, fmt), tf.float32) * (1.0 / scale), dtype or x.dtype)


def scale_from_amax(amax, fmt_max, margin=0, power_of_two=False, fallback=1.0):
    """`fmt_max / amax * 2**-margin` (float32); `fallback` where `amax` is 0 or not finite."""
    amax = tf.cast(amax, tf.float32)
    # A tiny amax gives an inf scale, and 0 * inf is nan.
    scale = tf.minimum(fmt_max / amax * 2.0**-margin, np.finfo(np.float32).max)
    if power_of_two:  # dropping the mantissa bits rounds down, exactly
        scale = tf.bitcast(tf.bitcast(scale, tf.int32) & 0x7F800000, tf.float32)
    return tf.where((amax > 0) & tf.math.is_finite(amax), scale, fallback)


def _qdq_counted(x, scale, fmt):
    """(float32 x through float8, [clipped, underflowed, nonzero] counts) for float32 x."""
    scaled = x * scale
    q = tf.cast(tf.cast(tf.clip_by_value(scaled, -fmt.max, fmt.max), fmt.dtype), tf.float32)
    nonzero = tf.not_equal(x, 0.0)
    counts = [tf.abs(scaled) > fmt.overflow, nonzero & tf.equal(q, 0.0), nonzero]
    return q * (1.0 / scale), tf.stack([tf.reduce_sum(tf.cast(c, tf.float32)) for c in counts])


class Float8State(tf.Module):
    """The float8 state a checkpoint holds (the delayed recipe's; empty for the others)."""

    def __init__(self):
        super().__init__(name="float8")


class Float8Statistics(tf.Module):
    """Per layer and kind since the last reset, not checkpointed: the largest amax, the last
    step's scale, and the sums of clipped, underflowed, nonzero and all values."""

    def __init__(self, num_layers):
        super().__init__(name="float8_statistics")
        self._strategy = tf.distribute.get_strategy()
        self.amax = tf.Variable(tf.zeros([num_layers, 3]), name="amax", **_ON_READ)
        self.scale = tf.Variable(tf.zeros([num_layers, 3]), name="scale", **_ON_READ)
        self.counts = tf.Variable(tf.zeros([num_layers, 3, 4]), name="counts", **_ON_READ)

    def record(self, index, kind, amax, scale, counts):
        """In the graph: one tensor's figures for this step."""
        at = [[index, kind]]
        self.amax.assign(tf.tensor_scatter_nd_max(self.amax, at, [amax]))
        self.scale.assign(tf.tensor_scatter_nd_update(self.scale, at, [scale]))
        self.counts.assign(tf.tensor_scatter_nd_add(self.counts, at, [counts]))

    def read(self, per_layer=False):
        """On the host: {tag: [a value per layer] or [one over all]}; {} if none recorded."""

        def copies(var):
            return np.stack([c.numpy() for c in self._strategy.experimental_local_results(var)])

        amax, scale, counts = (copies(v) for v in (self.amax, self.scale, self.counts))
        amax, scale, counts = amax.max(0), scale.min(0), counts.sum(0)
        if not counts[..., 3].any():
            return {}
        if not per_layer:
            amax, scale = amax.max(0, keepdims=True), scale.min(0, keepdims=True)
            counts = counts.sum(0, keepdims=True)
        out = {}
        for k, kind in enumerate(KINDS):
            clipped, underflowed, nonzero, values = np.moveaxis(counts[:, k], -1, 0)
            out[f"float8/{kind}_scale"] = scale[:, k]
            out[f"float8/{kind}_amax"] = amax[:, k]
            out[f"float8/{kind}_clipped_fraction"] = clipped / np.maximum(values, 1.0)
            out[f"float8/{kind}_underflow_fraction"] = underflowed / np.maximum(nonzero, 1.0)
        return out

    def reset(self):
        for var in (self.amax, self.scale, self.counts):
            var.assign(tf.zeros(var.shape))


class NoFloat8:
    """The recipe of every precision but float8: quantizes, holds and records nothing."""

    name = "none"

    def __init__(self):
        self.state = Float8State()
        self.statistics = None
        self.layer_names = []

    def build(self, layer_names):
        """Creates the variables for these layers (`quantize_model` calls it)."""
        self.layer_names = list(layer_names)

    def commit(self, finite):
        """After the step applied (`finite`) or skipped its update."""
        del finite

    def read_and_reset(self):
        """On the host, once per summary: {tag: float} since the last call (see DESCRIPTIONS)."""
        return {}

    def read_per_layer(self):
        """{tag: array with one value per layer (`layer_names` order)}, without resetting."""
        return {}


class CurrentScaling(NoFloat8):
    """Per-tensor scales from each tensor's amax now (the module docstring has the algorithm).

    Args:
      margin: scales are `max / amax * 2**-margin`.
      power_of_two: round scales down to a power of two.
      statistics: record statistics for TensorBoard.
    """

    name = "current"
    formats = (E4M3, E4M3, E5M2)  # inputs, kernels, output gradients

    def __init__(self, margin=0, power_of_two=False, statistics=True):
        super().__init__()
        self.margin, self.power_of_two, self._collect = margin, power_of_two, statistics

    def build(self, layer_names):
        if self.layer_names:
            raise ValueError(f"this recipe already serves {len(self.layer_names)} layers")
        super().build(layer_names)
        if self._collect:
            self.statistics = Float8Statistics(len(self.layer_names))

    def matmul(self, x, kernel, index, training=True):
        """`x @ kernel` from float8 operands, float32 out; `training` records amaxes and statistics.

        x: [..., K] in the compute dtype; kernel: [K, N] float32. Its gradient is
        float8's too (see the module docstring), dx in x's dtype, dW float32.
        """
        k, n = kernel.shape

        def record(kind, amax, scale, counts):
            if training:
                self._record(index, kind, amax, scale, counts)

        @tf.custom_gradient
        def quantized_matmul(x, kernel):
            x2 = tf.reshape(tf.cast(x, tf.float32), [-1, k])
            qx, qw = self._forward(x2, kernel, index, record)

            def grad(dy):
                dy2 = tf.reshape(tf.cast(dy, tf.float32), [-1, n])
                a, b, c, d = self._backward(dy2, x2, qx, qw, index, record)
                dx = tf.reshape(tf.matmul(a, b, transpose_b=True), tf.shape(x))
                return tf.cast(dx, x.dtype), tf.matmul(c, d, transpose_a=True)

            y = tf.reshape(tf.matmul(qx, qw), tf.concat([tf.shape(x)[:-1], [n]], 0))
            return tf.ensure_shape(y, x.shape[:-1].concatenate([n])), grad

        return quantized_matmul(x, kernel)

    def _forward(self, x2, w, index, record):
        """(q(x), q(W)) for y, dequantized to float32."""
        return self._quantize(x2, index, 0, record), self._quantize(w, index, 1, record)

    def _backward(self, dy2, x2, qx, qw, index, record):
        """The operands of dx = a @ b^T and dW = c^T @ d."""
        qdy = self._quantize(dy2, index, 2, record)
        return qdy, qw, qx, qdy

    def _quantize(self, x, index, kind, record):
        fmt = self.formats[kind]
        amax = tf.reduce_max(tf.abs(x))
        scale = self._scale(amax, fmt, index, kind)
        dequantized, counts = _qdq_counted(x, scale, fmt)
        record(kind, amax, scale, tf.concat([counts, [tf.cast(tf.size(x), tf.float32)]], 0))
        return dequantized

    def _scale(self, amax, fmt, index, kind):
        return scale_from_amax(amax, fmt.max, self.margin, self.power_of_two)

    def _record(self, index, kind, amax, scale, counts):
        if self.statistics is not None:
            self.statistics.record(index, kind, amax, tf.reduce_min(scale), counts)

    def read_and_reset(self):
        if self.statistics is None:
            return {}
        found = self.statistics.read()
        self.statistics.reset()
        return {tag: float(value[0]) for tag, value in found.items()}

    def read_per_layer(self):
        return {} if self.statistics is None else self.statistics.read(per_layer=True)


class DelayedScaling(CurrentScaling):
    """Per-tensor scales from an amax history of `amax_history` steps, in Keras' order.

    Args:
      amax_history: steps of amaxes kept per tensor (Keras' default 1024).
      margin, power_of_two, statistics: as `CurrentScaling`.
    """

    name = "delayed"

    def __init__(self, amax_history=1024, margin=0, power_of_two=False, statistics=True):
        if amax_history < 1:
            raise ValueError(f"amax_history must be at least 1, got {amax_history}")
        super().__init__(margin, power_of_two, statistics)
        self.amax_history = int(amax_history)

    def build(self, layer_names):
        super().build(layer_names)
        self._strategy = tf.distribute.get_strategy()
        n = len(self.layer_names)
        self.state.amax_history = tf.Variable(
            tf.zeros([n, 3, self.amax_history]), name="amax_history", **_ON_READ
        )
        self.state.scale = tf.Variable(tf.ones([n, 3]), name="scale", **_ON_READ)
        self.pending = tf.Variable(tf.zeros([n, 3]), name="pending_amax", **_ON_READ)

    def _scale(self, amax, fmt, index, kind):
        return self.state.scale[index, kind]

    def _record(self, index, kind, amax, scale, counts):
        self.pending.assign(tf.tensor_scatter_nd_update(self.pending, [[index, kind]], [amax]))
        super()._record(index, kind, amax, scale, counts)

    def commit(self, finite):
        """Rolls each pending amax into its history and updates the scales, on a finite step.

        Call once per step after the apply-or-skip, in replica context (one
        replica, or each of several) or in cross-replica context.
        """
        pending = self._max_over_replicas(self.pending)
        record = tf.logical_and(finite, tf.math.is_finite(pending))
        history, scale = self.state.amax_history, self.state.scale
        maxima = tf.constant([f.max for f in self.formats])
        new_scale = scale_from_amax(
            tf.reduce_max(history, -1), maxima, self.margin, self.power_of_two, fallback=scale
        )
        rolled = tf.roll(history, -1, axis=-1)
        new_history = tf.concat([pending[..., None], rolled[..., 1:]], -1)
        scale.assign(tf.where(record, new_scale, scale))
        history.assign(tf.where(record[..., None], new_history, history))

    def _max_over_replicas(self, var):
        ctx = tf.distribute.get_replica_context()
        if ctx is not None and ctx.num_replicas_in_sync > 1:  # ReduceOp has no MAX
            return tf.reduce_max(ctx.all_gather(tf.convert_to_tensor(var)[None], axis=0), 0)
        # Every copy is readable here. (Outside the strategy's scope the context looks like
        # one replica's, and reading `var` itself would give replica 0's copy alone.)
        copies = self._strategy.experimental_local_results(var)
        return tf.reduce_max(tf.stack([tf.convert_to_tensor(c) for c in copies]), 0)


class BlockScaling(CurrentScaling):
    """Scales per 1 x 128 tile of activations and gradients, per 128 x 128 block of kernels."""

    name = "block"
    formats = (E4M3, E4M3, E4M3)

    def _forward(self, x2, w, index, record):
        return self._tiles(x2, (1, TILE), 0, record), self._tiles(w, (TILE, TILE), 1, record)

    def _backward(self, dy2, x2, qx, qw, index, record):
        # dW sums over M: x and dy are tiled down the columns for it, not as for y and dx.
        unrecorded = lambda *args: None
        return (
            self._tiles(dy2, (1, TILE), 2, record),
            qw,
            self._tiles(x2, (TILE, 1), 0, unrecorded),
            self._tiles(dy2, (TILE, 1), 2, unrecorded),
        )

    def _tiles(self, x, tile, kind, record):
        """2-D float32 `x` through E4M3 with one scale per `tile` (rows, columns) of values."""
        fmt = self.formats[kind]
        m, k = tf.shape(x)[0], x.shape[1]
        rows, cols = tile
        padded_k = k + (-k) % cols
        padded = tf.pad(x, [[0, (-m) % rows], [0, padded_k - k]])
        tiles = tf.reshape(padded, [-1, rows, padded_k // cols, cols])
        amax = tf.reduce_max(tf.abs(tiles), axis=[1, 3], keepdims=True)
        scale = scale_from_amax(amax, fmt.max, self.margin, self.power_of_two)
        dequantized, counts = _qdq_counted(tiles, scale, fmt)
        size = tf.cast(tf.size(x), tf.float32)
        record(kind, tf.reduce_max(amax), scale, tf.concat([counts, [size]], 0))
        return tf.reshape(dequantized, [-1, padded_k])[:m, :k]


class Unscaled(CurrentScaling):
    """Scale 1: each operand cast as it is, saturated at the format's max. An ablation, to
    see what the scales are for: output gradients below E5M2's smallest value (2**-16)
    become zero, and the statistics count them."""

    name = "unscaled"

    def _scale(self, amax, fmt, index, kind):
        return tf.ones_like(amax)


RECIPES = {r.name: r for r in (NoFloat8, CurrentScaling, DelayedScaling, BlockScaling, Unscaled)}


def create_recipe(name, amax_history=1024, **kwargs):
    """The recipe `name` (of `RECIPES`); `amax_history` for "delayed", `kwargs` but for "none"."""
    if name not in RECIPES:
        raise ValueError(f"unknown float8 recipe {name!r}; choose one of {', '.join(RECIPES)}")
    if name == "delayed":
        kwargs["amax_history"] = amax_history
    return RECIPES[name](**kwargs) if name != "none" else NoFloat8()


def default_predicate(layer):
    """Dense layers with a 2-D kernel, not the head (`logits`) nor a patch embedding."""
    return (
        isinstance(layer, keras.layers.Dense)
        and len(layer.kernel.shape) == 2
        and layer.name not in ("head", "logits", "patch_embedding")
        and layer.quantization_mode is None
        and not layer.lora_enabled
    )


def quantize_model(model, recipe, predicate=default_predicate):
    """Makes the matmuls of `model`'s selected Dense layers (nested ones too) float8, in place.

    Only each layer's `call` changes: weights, names, config and checkpoints stay Keras'.
    Call it on a built model, in the strategy scope it was built in; a recipe serves one
    model. Returns the number of layers quantized (0: none; `NoFloat8` quantizes none).
    """
    if type(recipe) is NoFloat8:
        return 0
    # Layers held as attributes (SelfAttention's qkv, out) are not in `model.layers`.
    layers = [layer for layer in model._flatten_layers(include_self=False) if predicate(layer)]
    if layers:
        recipe.build([layer.path for layer in layers])
    for index, layer in enumerate(layers):
        layer.call = _float8_dense_call(layer, recipe, index)
    return len(layers)


def _float8_dense_call(layer, recipe, index):
    """Keras' `Dense.call` with the matmul replaced by `recipe.matmul`."""

    def call(inputs, training=None):
        # The float32 master kernel, not the bfloat16 copy Keras' autocast hands out.
        with AutocastScope(None):
            kernel = tf.convert_to_tensor(layer.kernel)
        outputs = recipe.matmul(inputs, kernel, index, training=bool(training))
        outputs = tf.cast(outputs, layer.compute_dtype)
        if layer.use_bias:
            outputs = outputs + layer.bias
        return outputs if layer.activation is None else layer.activation(outputs)

    return call


def _described(kind, what):
    since = "since the last write"
    return {
        f"float8/{kind}_scale": f"Smallest float8 scale of the {what} at the last step, over "
        "layers and tiles: max / amax (current, block) or from the amax history (delayed).",
        f"float8/{kind}_amax": f"Largest |value| of the {what} {since}, over layers.",
        f"float8/{kind}_clipped_fraction": f"Share of the values of the {what} that exceeded "
        f"the format's max once scaled and were saturated at it, {since}.",
        f"float8/{kind}_underflow_fraction": f"Share of the nonzero values of the {what} that "
        f"became zero in float8, {since}.",
    }


DESCRIPTIONS = {
    **_described("inputs", "quantized layers' inputs (E4M3)"),
    **_described("kernels", "quantized layers' kernels (E4M3)"),
    **_described("gradients", "output gradients (E5M2; E4M3 for block)"),
}

# Histograms over the quantized layers, one value per layer, at each summary.
BY_LAYER_DESCRIPTIONS = {
    f"{tag}_by_layer": f"One value per quantized layer: {text[0].lower()}{text[1:]}"
    for tag, text in DESCRIPTIONS.items()
}

# A custom-scalars category in the shape of `engine.actions.dashboard.LAYOUT`'s entries.
LAYOUT = (
    "Float8",
    [
        ("Scale", [r"^float8/\w+_scale$"]),
        ("Amax", [r"^float8/\w+_amax$"]),
        ("Clipped at the format's max", [r"^float8/\w+_clipped_fraction$"]),
        ("Underflowed to zero", [r"^float8/\w+_underflow_fraction$"]),
    ],
)
