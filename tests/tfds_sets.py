"""A small TFDS image set built and prepared locally (no network): `tfds:colour_shapes`.

Each class has its own colour (`image_trees.COLOURS`), so a test can check from
the pixels alone that an example read by index kept its label. Sizes are mixed
and the classes imbalanced, as in a user's photos. Once prepared, the set is
found by name in any process (TFDS reads it back from its files).
"""

import numpy as np
import tensorflow_datasets as tfds
from image_trees import COLOURS, SIZES

NAME = "colour_shapes"
CLASSES = ("red", "green", "blue")
COUNTS = {"train": (20, 9, 5), "test": (6, 4, 3)}  # per class


class ColourShapes(tfds.core.GeneratorBasedBuilder):
    """Images of one colour (plus noise) per class, at mixed sizes."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "label": tfds.features.ClassLabel(names=CLASSES),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(split) for split in COUNTS}

    def _generate_examples(self, split):
        for label, count in enumerate(COUNTS[split]):
            for i in range(count):
                width, height = SIZES[i % len(SIZES)]
                rng = np.random.default_rng([label, i, split == "test"])
                noise = rng.normal(0, 8, (height // 4, width // 4, 3))
                pixels = np.clip(np.array(COLOURS[label], np.float32) + noise, 0, 255)
                yield f"{label}-{i}", {"image": pixels.astype(np.uint8), "label": label}


def prepare(data_dir, file_format="array_record"):
    """Prepares the set in `data_dir` as `file_format`; returns the total examples per split."""
    ColourShapes(data_dir=str(data_dir), file_format=file_format).download_and_prepare()
    return {split: sum(counts) for split, counts in COUNTS.items()}
