"""Vision Transformers (ViT): the standard Ti and S widths, a CPU-sized one, a test one.

Pre-norm blocks (LayerNorm -> self-attention -> residual add, LayerNorm -> GELU
MLP -> residual add), learned position embeddings, mean pooling over the
patches, and a float32 head. The layers take the ambient Keras dtype policy (see
`registry.create_model`), so under `mixed` they compute in float16. Three places
compute in float32 all the same, because float16 fails there:

  * the attention logits and their softmax (`SelfAttention`): q·k summed over a
    head's width reaches float16's 65504 as soon as activations grow (a logit of
    256 from two vectors of 64 values of 2), and an inf logit turns the softmax
    into nan; the logits are computed from float32 q and k, the softmax is
    float32, and only the probabilities go back to float16 for the product with v;
  * LayerNorm statistics: Keras' `LayerNormalization` computes the mean and
    variance of half inputs in float32 (`keras.ops.layer_normalization`), as a
    variance of float16 values underflows and loses precision;
  * the head: logits, softmax and the loss in float32, as in every model here.

The residual stream stays in the compute dtype, as in the usual mixed-precision
ViT; the loss scale handles the small gradients deep in the stack.

Stochastic depth (`stochastic_depth` > 0) drops each block's two residual branches
per example while training, with a probability rising linearly from 0 in the first
block to `stochastic_depth` in the last.
"""

import keras
from keras import layers, ops

from models.layers import head, model_inputs

# name: (width, depth, heads, mlp width)
SIZES = {
    "vit_test": (32, 2, 2, 64),
    "vit_mini": (128, 6, 4, 512),
    "vit_tiny": (192, 12, 3, 768),
    "vit_small": (384, 12, 6, 1536),
}


def default_patch_size(image_size):
    """An 8 by 8 grid of patches up to 128 px (4 px at 32 px), 16-pixel patches above."""
    return image_size // 8 if image_size <= 128 else 16


@keras.saving.register_keras_serializable(package="models")
class SelfAttention(layers.Layer):
    """Multi-head self-attention whose logits and softmax are float32 under any policy."""

    def __init__(self, num_heads, width, **kwargs):
        super().__init__(**kwargs)
        self.num_heads, self.width = num_heads, width
        self.qkv = layers.Dense(3 * width, name="qkv")
        self.out = layers.Dense(width, name="out")

    def build(self, input_shape):
        self.qkv.build(input_shape)
        self.out.build((*input_shape[:-1], self.width))

    def call(self, x):
        tokens, head_width = ops.shape(x)[1], self.width // self.num_heads
        qkv = ops.reshape(self.qkv(x), (-1, tokens, 3, self.num_heads, head_width))
        q, k, v = (ops.transpose(qkv[:, :, i], (0, 2, 1, 3)) for i in range(3))  # [b, h, t, d]
        q = ops.cast(q, "float32") * (head_width**-0.5)
        logits = ops.einsum("bhqd,bhkd->bhqk", q, ops.cast(k, "float32"))
        probabilities = ops.cast(ops.softmax(logits, axis=-1), v.dtype)
        attended = ops.einsum("bhqk,bhkd->bhqd", probabilities, v)
        attended = ops.reshape(ops.transpose(attended, (0, 2, 1, 3)), (-1, tokens, self.width))
        return self.out(attended)

    def forward_flops(self, tokens):
        """FLOPs of one example's forward pass: projections and both attention products."""
        projections = 2 * tokens * self.width * 4 * self.width  # q, k, v and out
        return projections + 2 * 2 * tokens * tokens * self.width  # q·k and p·v

    def get_config(self):
        return super().get_config() | {"num_heads": self.num_heads, "width": self.width}


@keras.saving.register_keras_serializable(package="models")
class PositionEmbedding(layers.Layer):
    """Adds a learned embedding per token position."""

    def build(self, input_shape):
        self.embedding = self.add_weight(
            shape=(1, *input_shape[1:]),
            initializer=keras.initializers.RandomNormal(stddev=0.02),
            name="embedding",
        )

    def call(self, x):
        return x + ops.cast(self.embedding, x.dtype)


@keras.saving.register_keras_serializable(package="models")
class StochasticDepth(layers.Layer):
    """Zeroes a residual branch for a `rate` share of the examples while training.

    The kept examples' branches are scaled by 1 / (1 - rate), so the expected sum
    is the inference-time one. The draws come from a Keras `SeedGenerator`, whose
    state the engine checkpoints (`engine.checkpoints.random_states`): a resumed run
    draws the same masks.
    """

    def __init__(self, rate, **kwargs):
        super().__init__(**kwargs)
        self.rate = rate
        self.seed_generator = keras.random.SeedGenerator()

    def call(self, x, training=False):
        if not training or not self.rate:
            return x
        shape = (ops.shape(x)[0],) + (1,) * (len(x.shape) - 1)
        keep = keras.random.uniform(shape, seed=self.seed_generator) >= self.rate
        return x * ops.cast(keep, x.dtype) / ops.cast(1.0 - self.rate, x.dtype)

    def get_config(self):
        return super().get_config() | {"rate": self.rate}


def _residual(x, branch, rate, name, index):
    if rate:
        branch = StochasticDepth(rate, name=f"{name}_drop{index}")(branch)
    return layers.Add(name=f"{name}_add{index}")([x, branch])


def _block(x, width, heads, mlp, name, drop=0.0):
    y = layers.LayerNormalization(epsilon=1e-6, name=f"{name}_norm1")(x)
    x = _residual(x, SelfAttention(heads, width, name=f"{name}_attn")(y), drop, name, 1)
    y = layers.LayerNormalization(epsilon=1e-6, name=f"{name}_norm2")(x)
    y = layers.Dense(mlp, activation="gelu", name=f"{name}_mlp1")(y)
    y = layers.Dense(width, name=f"{name}_mlp2")(y)
    return _residual(x, y, drop, name, 2)


def create_vit(name, num_classes, image_size, preprocess=None, patch_size=0, stochastic_depth=0.0):
    """ViT `name` (a key of `SIZES`) for `image_size`² images; `patch_size` 0: the default."""
    width, depth, heads, mlp = SIZES[name]
    patch = patch_size or default_patch_size(image_size)
    if image_size % patch:
        raise ValueError(f"patch size {patch} does not divide image size {image_size}")
    inputs, x = model_inputs(image_size, preprocess)
    x = layers.Conv2D(width, patch, strides=patch, name="patch_embedding")(x)
    x = layers.Reshape(((image_size // patch) ** 2, width), name="tokens")(x)
    x = PositionEmbedding(name="position_embedding")(x)
    for i in range(depth):
        drop = stochastic_depth * i / max(depth - 1, 1)
        x = _block(x, width, heads, mlp, name=f"block{i}", drop=drop)
    x = layers.LayerNormalization(epsilon=1e-6, name="final_norm")(x)
    x = layers.GlobalAveragePooling1D(name="pool")(x)
    return keras.Model(inputs, head(x, num_classes), name=name)
