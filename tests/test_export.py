"""--export_dir: a float32 SavedModel that a fresh process serves like the trained model."""

import os
import subprocess
import sys

import numpy as np
import tensorflow as tf
from conftest import ROOT, tiny_config

from engine import checkpointing, loop
from engine.precision import get_policy
from input_pipeline import create_data
from models import create_model

PRECISIONS = ("fp32", "mixed", "mixed_bf16")
# What a fresh process does with an exported model: load it and call the signature.
SERVE = """
import sys, numpy as np, tensorflow as tf
images = np.load(sys.argv[1])
out = {}
for name, path in zip(sys.argv[3::2], sys.argv[4::2]):
    serve = tf.saved_model.load(path).signatures["serving_default"]
    result = serve(images=tf.constant(images))
    assert list(result) == ["probabilities"] and result["probabilities"].dtype == tf.float32
    out[name] = result["probabilities"].numpy()
np.savez(sys.argv[2], **out)
"""


def _trained_probabilities(config, model_dir, images):
    """The trained model, rebuilt and restored from its final checkpoint, as probabilities."""
    policy = get_policy(config.precision).keras_policy
    model = create_model(config.model, create_data(config).num_classes, config.image_size, policy)
    path = tf.train.latest_checkpoint(checkpointing.checkpoint_dir(model_dir))
    tf.train.Checkpoint(model=model).restore(
        path
    ).expect_partial().assert_existing_objects_matched()
    return tf.nn.softmax(tf.cast(model(images, training=False), tf.float32)).numpy()


def test_exported_model_serves_float32_probabilities_like_the_trained_model(tmp_path):
    images = tf.random.stateless_uniform([6, 16, 16, 3], [0, 1]).numpy()
    expected, args = {}, []
    for precision in PRECISIONS:
        export_dir = str(tmp_path / f"export_{precision}")
        model_dir = str(tmp_path / precision)
        config = tiny_config(precision=precision, export_dir=export_dir, train_steps=3)
        loop.train_and_evaluate(config, model_dir)
        expected[precision] = _trained_probabilities(config, model_dir, images)
        args += [precision, export_dir]
    np.save(tmp_path / "images.npy", images)
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            SERVE,
            str(tmp_path / "images.npy"),
            str(tmp_path / "out.npz"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    served = np.load(tmp_path / "out.npz")
    for precision in PRECISIONS:
        np.testing.assert_allclose(np.sum(served[precision], axis=-1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(served[precision], expected[precision], rtol=1e-5, atol=1e-6)
