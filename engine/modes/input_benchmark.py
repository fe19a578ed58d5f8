"""`--mode=input_benchmark`: is the input pipeline fast enough?

`python main.py --mode=input_benchmark` writes `--num_images` generated 210x140
JPEGs in a temporary ships layout (or reads `--dataset`, a folder, ships or TFDS
set of your own), then in one run, for the same model, batch and image size:

  pipeline        images/s of the training pipeline alone, every image read
                  from its file (a TFDS ArrayRecord set: its record), decoded,
                  resized, cropped, flipped and normalised: the streaming path
                  (`--cache=`)
  pipeline+disk   the same from a decoded cache on disk (`--cache=DIR`): for the
                  generated images written first into a temporary folder; for a
                  set of your own, timed when `--cache` names a folder (written
                  there as a training run would, and read by the next one)
  pipeline+cache  the same from memory, when `--cache=auto` holds the images there
  train step      images/s of the training loop on one batch repeated (no input cost)
  end to end      images/s of the training loop fed by the default pipeline

and the ratio pipeline / train step: above 1, decoding alone keeps up with the
step even before the cache helps. Pipeline and step share the same CPU cores,
so the end-to-end figure is lower than both on a small machine. Each pipeline
figure times `--pipeline_batches` batches; each training figure
`--benchmark_steps` steps (0: 40). `--precision=auto` is decided as for training.
"""

import os
import tempfile
import time

import numpy as np
from absl import logging

from engine import config as config_lib

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
    step = create_train_step(
        state.model, state.optimizer, state.loss_scale, config.batch_size, float8=state.float8
    )
    train_loop = loop.create_train_loop(strategy, step, state, loop.LoopStats(), config.xla)
    iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
    train_loop(iterator, tf.constant(2))  # trace and compile, untimed
    start = time.perf_counter()
    train_loop(iterator, tf.constant(steps))
    state.step.numpy()  # wait for the loop to finish
    return steps * config.batch_size / (time.perf_counter() - start)


TRAIN_STEPS = 40  # timed per training figure when --benchmark_steps is 0


def generated(config):
    """Whether the run times generated JPEGs: `--dataset` left at its in-memory default."""
    return config.dataset == config_lib.defaults()["dataset"]


def run_input_benchmark(config):
    """Writes the images (unless `--dataset` names a set), measures, prints the figures."""
    from engine import machine

    with tempfile.TemporaryDirectory() as root:
        if generated(config):
            start = time.perf_counter()
            write_ship_tree(root, config.num_images)
            took = time.perf_counter() - start
            logging.info("wrote %d 210x140 JPEGs in %.1f s", config.num_images, took)
            config = config.replace(dataset=f"ships:{root}")
            disk_cache = os.path.join(root, "decoded-cache") + "/"
            os.makedirs(disk_cache)
        else:
            disk_cache = config.cache if config.cache not in ("", "auto", "memory") else None
        config = machine.resolve(config.replace(cache="auto", eval_fraction=0.1), root)
        figures = _measure(config, disk_cache)
    _report(config, *figures)
    return figures


def _measure(config, disk_cache):
    """(streamed, disk cache or None, memory or None, train step, end to end) images/s."""
    from engine.data import data_config
    from input_pipeline import create_data

    batch, batches = config.batch_size, config.pipeline_batches
    steps = config.benchmark_steps or TRAIN_STEPS
    uncached = create_data(data_config(config).replace(cache=""))
    decode = pipeline_images_per_second(uncached.train_fn(), batches, batch)
    on_disk = None
    if disk_cache:
        start = time.perf_counter()
        train = create_data(data_config(config).replace(cache=disk_cache)).train_fn()
        logging.info("decoded cache on disk ready in %.1f s", time.perf_counter() - start)
        on_disk = pipeline_images_per_second(train, batches, batch)
    data = create_data(data_config(config))
    cached = None
    if data.cache == "memory":
        # Untimed: one epoch and a bit, so any warm-up is over.
        warmup = data.train_size // batch + 2
        cached = pipeline_images_per_second(data.train_fn(), batches, batch, warmup)
    one_batch = lambda ctx: data.train_fn(ctx).take(1).cache().repeat()
    step = train_images_per_second(config, data, one_batch, steps)
    end_to_end = train_images_per_second(config, data, data.train_fn, steps)
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
