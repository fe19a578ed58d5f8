"""Is the input pipeline fast enough? `python -m engine.modes.input_benchmark`.

Writes `--num_images` generated 210x140 JPEGs in a temporary ships layout (or
reads `--dataset`, a folder, ships or TFDS set of your own), then in one run,
for the same model, batch and image size:

  pipeline        images/s of the training pipeline alone, every image read
                  from its file (a TFDS ArrayRecord set: its record), decoded,
                  resized, cropped, flipped and normalised: the streaming path
                  (`--cache=`)
  pipeline+disk   the same from a decoded cache on disk (`--cache=DIR`, written
                  first into a temporary folder; on for the generated images)
  pipeline+cache  the same from memory, when `--cache=auto` holds the images there
  train step      images/s of the training loop on one batch repeated (no input cost)
  end to end      images/s of the training loop fed by the default pipeline

and the ratio pipeline / train step: above 1, decoding alone keeps up with the
step even before the cache helps. Pipeline and step share the same CPU cores,
so the end-to-end figure is lower than both on a small machine.
"""

import os
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

flags.DEFINE_integer("num_images", 3000, "Generated 210x140 JPEGs.")
flags.DEFINE_string("dataset", "", "A data set of your own (folder:, ships:, tfds:) instead.")
flags.DEFINE_string("data_dir", "", "Where TFDS finds tfds: sets (default: its own).")
flags.DEFINE_string("model", "small_resnet", "Model (see --model of main.py).")
flags.DEFINE_integer("image_size", 32, "Input height and width.")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_string("precision", "fp32", "auto, fp32, mixed or mixed_bf16.")
flags.DEFINE_bool("xla", False, "Compile the training step with XLA.")
flags.DEFINE_bool(
    "disk_cache",
    None,
    "Also time --cache=DIR: writes the decoded training images into the temporary folder "
    "(default: on for the generated images, off for --dataset).",
)
flags.DEFINE_integer("pipeline_batches", 60, "Batches timed for each pipeline figure.")
flags.DEFINE_integer("train_steps", 40, "Steps timed for each training figure.")
FLAGS = flags.FLAGS

CATEGORIES = 5


def write_ship_tree(root, num_images, seed=0):
    """root/train/images/*.jpg (210x140, some grayscale) and root/train/train.csv."""
    from PIL import Image

    images = os.path.join(root, "train", "images")
    os.makedirs(images)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(num_images):
        label = i % CATEGORIES
        sky = rng.integers(60, 200, 3)
        pixels = np.broadcast_to(sky, (140, 210, 3)).astype(np.float32)
        pixels = pixels + rng.normal(0, 6, (140, 210, 3))
        top, left = rng.integers(40, 90), rng.integers(10, 60)
        pixels[top : top + 25, left : left + 60 + 20 * label] = rng.integers(0, 80, 3)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        if i % 10 == 0:
            image = image.convert("L")  # the contest set has some grayscale photos
        image.save(os.path.join(images, f"{i}.jpg"), quality=90)
        rows.append(f"{i}.jpg,{label + 1}")
    with open(os.path.join(root, "train", "train.csv"), "w") as f:
        f.write("image,category\n" + "\n".join(rows) + "\n")


def pipeline_images_per_second(dataset, batches, batch_size, warmup=3):
    """Images/s over `batches` batches, after `warmup` untimed ones (thread pools, cache)."""
    iterator = iter(dataset)
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - start)


def train_images_per_second(config, data, dataset_fn, steps):
    """Images/s of the engine's inner training loop fed by `dataset_fn`."""
    import tensorflow as tf

    from engine import loop, train_run
    from engine.extras import create_train_step

    strategy = tf.distribute.get_strategy()
    state = train_run.build_state(config, data, strategy)
    step = create_train_step(state.model, state.optimizer, state.loss_scale, config.batch_size)
    train_loop = loop.create_train_loop(strategy, step, state, loop.LoopStats(), config.xla)
    iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
    train_loop(iterator, tf.constant(2))  # trace and compile, untimed
    start = time.perf_counter()
    train_loop(iterator, tf.constant(steps))
    state.step.numpy()  # wait for the loop to finish
    return steps * config.batch_size / (time.perf_counter() - start)


def _fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv):
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    from engine.config import Config, ConfigError

    if FLAGS.num_images < 2 * CATEGORIES and not FLAGS.dataset:
        _fail(f"--num_images must be at least {2 * CATEGORIES}, got {FLAGS.num_images}")
    with tempfile.TemporaryDirectory() as root:
        try:  # before writing any image
            config = Config(
                dataset=FLAGS.dataset or f"ships:{root}",
                data_dir=FLAGS.data_dir,
                model=FLAGS.model,
                image_size=FLAGS.image_size,
                batch_size=FLAGS.batch_size,
                precision=FLAGS.precision,
                xla=FLAGS.xla,
                train_steps=FLAGS.train_steps,
                eval_fraction=0.1,
            )
        except ConfigError as e:
            _fail(str(e))
        from engine import machine

        config = machine.resolve(config, root)  # --precision=auto, as main.py would

        if not FLAGS.dataset:
            start = time.perf_counter()
            write_ship_tree(root, FLAGS.num_images)
            took = time.perf_counter() - start
            print(f"wrote {FLAGS.num_images} 210x140 JPEGs in {took:.1f} s")
        from input_pipeline import DataError

        try:
            figures = _measure(config, root)
        except DataError as e:
            _fail(str(e))

    _report(config, *figures)


def _measure(config, root):
    """(streamed, disk cache or None, memory or None, train step, end to end) images/s."""
    from engine.data import data_config
    from input_pipeline import create_data

    batch = config.batch_size
    uncached = create_data(data_config(config).replace(cache=""))
    decode = pipeline_images_per_second(uncached.train_fn(), FLAGS.pipeline_batches, batch)
    on_disk = None
    if FLAGS.disk_cache or (FLAGS.disk_cache is None and not FLAGS.dataset):
        folder = os.path.join(root, "decoded-cache")
        os.makedirs(folder)
        start = time.perf_counter()
        train = create_data(data_config(config).replace(cache=folder + "/")).train_fn()
        print(f"wrote the decoded cache on disk in {time.perf_counter() - start:.1f} s")
        on_disk = pipeline_images_per_second(train, FLAGS.pipeline_batches, batch)
    data = create_data(data_config(config))
    cached = None
    if data.cache == "memory":
        # Untimed: one epoch and a bit, so any warm-up is over.
        warmup = data.train_size // batch + 2
        train = data.train_fn()
        cached = pipeline_images_per_second(train, FLAGS.pipeline_batches, batch, warmup)
    one_batch = lambda ctx: data.train_fn(ctx).take(1).cache().repeat()
    step = train_images_per_second(config, data, one_batch, FLAGS.train_steps)
    end_to_end = train_images_per_second(config, data, data.train_fn, FLAGS.train_steps)
    return decode, on_disk, cached, step, end_to_end


def _report(config, decode, on_disk, cached, step, end_to_end):
    """Prints the figures; `on_disk` and `cached` are None where not measured."""
    print(
        f"model {config.model}, image_size {config.image_size}, batch {config.batch_size}, "
        f"precision {config.precision}{' + XLA' if config.xla else ''}, "
        f"{os.cpu_count()} CPU cores"
    )
    print(f"pipeline (streamed from the files):  {decode:9.1f} images/s")
    if on_disk is not None:
        print(f"pipeline (decoded cache on disk):    {on_disk:9.1f} images/s")
    if cached is not None:
        print(f"pipeline (memory cache):              {cached:9.1f} images/s")
    else:
        print("pipeline (memory cache):              not held: --cache=auto streams this set")
    print(f"train step alone (one batch):         {step:9.1f} images/s")
    print(f"end to end (--cache=auto):            {end_to_end:9.1f} images/s")
    ratio = f"{decode / step:.1f}x streamed"
    if on_disk is not None:
        ratio += f", {on_disk / step:.1f}x from the disk cache"
    if cached is not None:
        ratio += f", {cached / step:.1f}x cached"
    print(f"ratio pipeline / train step: {ratio}")


if __name__ == "__main__":
    app.run(main)
