"""Writes small image trees in the folder:PATH and ships:PATH layouts for tests.

Each class has its own colour (red, green, blue, yellow, grey...), so a test can
check from the pixels alone that an example kept its label. Sizes are mixed,
some images are grayscale JPEGs, some are RGB or RGBA PNGs.
"""

import csv
import os

import numpy as np
from PIL import Image

# RGB colour per class index; grey (index 4) is written as a grayscale image.
COLOURS = ((220, 30, 30), (30, 200, 30), (30, 30, 220), (220, 220, 30), (128, 128, 128))
SIZES = ((210, 140), (180, 120), (64, 48), (100, 150))


def write_image(path, label, index, fmt=None):
    """Writes one image of class `label`: its colour plus a little noise."""
    width, height = SIZES[index % len(SIZES)]
    rng = np.random.default_rng(label * 1000 + index)
    pixels = np.clip(
        np.array(COLOURS[label], np.float32) + rng.normal(0, 8, (height, width, 3)), 0, 255
    ).astype(np.uint8)
    image = Image.fromarray(pixels)
    if COLOURS[label][0] == COLOURS[label][1] == COLOURS[label][2]:
        image = image.convert("L")
    elif path.endswith(".png") and index % 2:
        image = image.convert("RGBA")
    image.save(path, format=fmt)


def _file_name(label, index):
    # One PNG per class; the rest JPEG, one with an upper-case extension.
    if index == 1:
        return f"img{label}_{index}.png"
    return f"img{label}_{index}.{'JPG' if index == 2 else 'jpg'}"


def make_folder_tree(root, splits=("train",), per_class=6, classes=("red", "green", "grey")):
    """root/<split>/<class>/*; class i of `classes` gets COLOURS[its colour index]."""
    colour_index = {"red": 0, "green": 1, "blue": 2, "yellow": 3, "grey": 4}
    for split in splits:
        for name in classes:
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                write_image(os.path.join(folder, _file_name(0, i)), colour_index[name], i)
    return str(root)


def make_ships_tree(root, per_class=(8, 6, 5, 4, 7), num_test=5):
    """root/train/images/*.jpg, root/train/train.csv, root/test.csv; returns the rows."""
    images = os.path.join(root, "train", "images")
    os.makedirs(images, exist_ok=True)
    rows = []
    for label, n in enumerate(per_class):
        for i in range(n):
            name = f"{label * 100 + i}.jpg"
            write_image(os.path.join(images, name), label, i, fmt="JPEG")
            rows.append((name, label + 1))
    rows.sort()
    write_csv(os.path.join(root, "train", "train.csv"), ("image", "category"), rows)
    test_rows = []
    for i in range(num_test):
        name = f"test{i}.jpg"
        write_image(os.path.join(images, name), i % 5, i, fmt="JPEG")
        test_rows.append((name,))
    write_csv(os.path.join(root, "test.csv"), ("image",), test_rows)
    return str(root), rows


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def corrupt(path):
    """Overwrites `path` with bytes that are no image."""
    with open(path, "wb") as f:
        f.write(b"this is not a JPEG at all")


def truncate(path):
    """Cuts an image file to half its length (a download that stopped)."""
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
