"""Model families: which family a model is, and the defaults it trains better with.

A leaf module (no TensorFlow): `engine.validation` asks which family a model is,
main.py fills in the family's defaults for the options the command line leaves unset.
"""

# Where the defaults of `engine.config` would train a model family worse, its own, taken
# for every option the command line does not give (`with_family_defaults`). ViTs: the
# usual ViT recipe, AdamW with weight decay, a lower peak rate after a warm-up, gradients
# clipped at norm 1, a squared-gradient average over ~100 steps rather than Keras' ~1,000,
# which outlast a short run (mixed + XLA, 600 steps: 0.901 against 0.847), and four
# times the generated examples, as a ViT, without a CNN's locality, overfits 4,096.
# Measured on vit_mini, mixed_bf16: 0.8955 eval accuracy against 0.825 with the ResNets'.
FAMILY_DEFAULTS = {
    "vit": {
        "optimizer": "adamw",
        "learning_rate": 2e-3,
        "weight_decay": 0.05,
        "warmup_steps": 60,
        "clip_norm": 1.0,
        "beta_2": 0.99,
        "train_examples": 16384,
    },
}


def model_family(model):
    """ "vit" for the Vision Transformers, "resnet" for the rest."""
    return "vit" if model.startswith("vit_") else "resnet"


def with_family_defaults(config, given):
    """`config` with its model family's `FAMILY_DEFAULTS` for every option not in `given`.

    `given` holds the names of the options the user set (main.py: the flags present
    on the command line or in a flagfile); a `Config` built in code keeps its values.
    """
    family = FAMILY_DEFAULTS.get(model_family(config.model), {})
    return config.replace(**{k: v for k, v in family.items() if k not in given})
