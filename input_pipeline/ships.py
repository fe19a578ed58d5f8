"""`ships:PATH`: the "Game of Deep Learning" contest layout.

  PATH/train/images/*.jpg
  PATH/train/train.csv        columns image,category (category 1..5)
  a test CSV                  column image (names inside PATH/train/images)

Category ids 1..5 are labels 0..4; predictions are written back as 1..5.
Every CSV row is checked before training: a name must be a file inside the
images folder, a category one of the five ids. A bad row is an error naming
the CSV line, never a skipped or mislabelled example.
"""

import csv
import io
import os

from input_pipeline import preprocessing
from input_pipeline.preprocessing import DataError

CLASS_NAMES = ("Cargo", "Military", "Carrier", "Cruise", "Tankers")
CATEGORIES = ("1", "2", "3", "4", "5")


def images_dir(root):
    return os.path.join(root, "train", "images")


def train_csv(root):
    return os.path.join(root, "train", "train.csv")


def _read_rows(csv_path, columns):
    """Yields (line number, row dict); checks the header has `columns`."""
    if not os.path.isfile(csv_path):
        what = "is a folder" if os.path.isdir(csv_path) else "does not exist"
        raise DataError(f"{csv_path} {what}; expected a CSV with columns {','.join(columns)}")
    try:
        # Read whole first: a decoding error is then one message, not a half-read split.
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(
            f"{csv_path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8 CSV"
        ) from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = [c.strip() for c in reader.fieldnames or []]
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(
            f"{csv_path} lacks column(s) {', '.join(missing)}; its header must include "
            f"{','.join(columns)} (found {','.join(header) or 'no header'})"
        )
    reader.fieldnames = header
    for row in reader:
        yield reader.line_num, row


def resolve_image(csv_path, line, name, root):
    """The path of image `name` from `csv_path`, which must stay inside the images folder.

    Containment is checked on the name, not on where a symlink points: image
    files linked into a shared store (`cp -rs`, DVC, git-annex) are accepted.

    Raises:
      DataError: the name is empty, absolute, escapes the folder, or the file is missing.
    """
    folder = os.path.abspath(images_dir(root))
    name = (name or "").strip()
    where = f"{csv_path} line {line}"
    relative = os.path.normpath(name)
    if (
        not name
        or os.path.isabs(name)
        or relative == os.pardir
        or relative.startswith(os.pardir + os.sep)
    ):
        raise DataError(
            f"{where}: image name {name!r} is not a file name inside {folder}; "
            "use names relative to that folder (no absolute paths, no '..')"
        )
    path = os.path.join(folder, relative)
    if not os.path.isfile(path):  # follows links: a dangling one is missing too
        raise DataError(f"{where}: image {name!r} does not exist in {folder}")
    return path


def read_labelled(root):
    """(paths, labels, names) from `PATH/train/train.csv`.

    Raises:
      DataError: missing columns, a bad image name or file, an unknown category, no rows.
    """
    csv_path = train_csv(root)
    paths, labels, names, seen = [], [], [], set()
    for line, row in _read_rows(csv_path, ("image", "category")):
        category = (row["category"] or "").strip()
        if category not in CATEGORIES:
            raise DataError(
                f"{csv_path} line {line}: unknown category {category!r}; categories are "
                + ", ".join(f"{c} = {n}" for c, n in zip(CATEGORIES, CLASS_NAMES, strict=True))
            )
        path = resolve_image(csv_path, line, row["image"], root)
        if path in seen:
            raise DataError(f"{csv_path} line {line}: image {row['image']!r} is listed twice")
        seen.add(path)
        paths.append(path)
        labels.append(CATEGORIES.index(category))
        names.append(row["image"].strip())
    if not paths:
        raise DataError(f"{csv_path} has no rows; the train split is empty")
    return paths, labels, names


def read_unlabelled(csv_path, root):
    """(image names as written, paths) from a test CSV with an `image` column."""
    names, paths = [], []
    for line, row in _read_rows(csv_path, ("image",)):
        paths.append(resolve_image(csv_path, line, row["image"], root))
        names.append(row["image"].strip())
    if not paths:
        raise DataError(f"{csv_path} has no rows; nothing to predict")
    return names, paths


def load(root, config):
    """Returns (class_names, (train paths, labels), (eval paths, labels)).

    The eval split is a deterministic stratified hold-out of `--eval_fraction`.
    """
    if not os.path.isdir(images_dir(root)):
        raise DataError(
            f"--dataset=ships:{root}: {images_dir(root)} is not a folder; expected "
            f"{root}/train/images/*.jpg and {root}/train/train.csv"
        )
    paths, labels, names = read_labelled(root)
    train_idx, eval_idx = preprocessing.stratified_holdout(names, labels, config.eval_fraction)
    pick = lambda idx: ([paths[i] for i in idx], [labels[i] for i in idx])
    return CLASS_NAMES, pick(train_idx), pick(eval_idx)
