"""`folder:PATH`: a tree `PATH/<split>/<class>/**/*.{jpg,jpeg,png}`.

Class names are the train split's folder names, sorted, so label ids are the
same on every machine. A class's images may sit in subfolders of its folder
(`train/cat/2019/x.jpg`), at any depth, as Keras' `image_dataset_from_directory`
reads them; symlinked subfolders are followed, each real folder once. Names
starting with `.` are skipped at every level (dot-files counted as ignored).

An eval split comes from `--eval_split` or the first of `EVAL_FOLDERS` that
exists and holds class folders; without one, a stratified hold-out of the
train split (`--eval_fraction`).
"""

import os

from absl import logging

from input_pipeline import preprocessing
from input_pipeline.preprocessing import DataError

EVAL_FOLDERS = ("val", "validation", "eval", "test")


def _class_folders(split_dir):
    return sorted(
        e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith(".")
    )


def _class_files(class_dir):
    """Paths relative to `class_dir` of every file below it, dot-folders skipped, sorted.

    Sorting the relative paths (not each folder's listing) gives one order on
    every machine, whatever the file system lists first.
    """
    names, seen = [], set()
    for folder, subfolders, files in os.walk(class_dir, onerror=_unreadable, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a symlink loop, or a second link to one folder
            subfolders[:] = []
            continue
        seen.add(real)
        # Sorted in place, so the walk (and which link wins) is the same everywhere.
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        rel = os.path.relpath(folder, class_dir)
        names.extend(os.path.normpath(os.path.join(rel, f)) for f in files)
    return sorted(names)


def _unreadable(error):
    # os.walk would skip the folder silently, and with it its images.
    raise DataError(f"cannot list {error.filename} ({error.strerror}); make it readable")


def list_split(split_dir, class_names):
    """(paths, labels) of every image under `split_dir/<class>/`, subfolders included, sorted.

    Raises:
      DataError: no class folders, an empty class folder, or a class folder
        whose name is not one of `class_names`.
    """
    folders = _class_folders(split_dir)
    if not folders:
        raise DataError(
            f"{split_dir} has no class folders; expected {split_dir}/<class>/*.jpg|jpeg|png"
        )
    paths, labels, ignored = [], [], 0
    for name in folders:
        if name not in class_names:
            raise DataError(
                f"class folder {os.path.join(split_dir, name)} is not a class of the train "
                f"split ({', '.join(class_names)}); rename or remove it"
            )
        class_dir = os.path.join(split_dir, name)
        files = _class_files(class_dir)
        # Dot-names (macOS `._x.jpg` resource forks) are skipped, like dot-folders.
        images = [
            f
            for f in files
            if not os.path.basename(f).startswith(".") and preprocessing.is_image_file(f)
        ]
        ignored += len(files) - len(images)
        if not images:
            raise DataError(
                f"class folder {class_dir} has no .jpg/.jpeg/.png images, in it or its "
                "subfolders; add some or remove it"
            )
        paths.extend(os.path.join(class_dir, f) for f in images)
        labels.extend([class_names.index(name)] * len(images))
    if ignored:
        logging.warning("ignored %d non-image file(s) under %s", ignored, split_dir)
    return paths, labels


def _eval_dir(root, eval_split):
    if eval_split:
        path = os.path.join(root, eval_split)
        if not os.path.isdir(path):
            raise DataError(f"--eval_split={eval_split}: {path} is not a folder")
        return path
    for name in EVAL_FOLDERS:
        path = os.path.join(root, name)
        if not os.path.isdir(path):
            continue
        if not _class_folders(path):
            # Unlabelled images (a contest's test/): no eval split can come from them.
            logging.warning(
                "%s has no class folders (unlabelled images?): not used for eval; "
                "set --eval_split to name an eval folder",
                path,
            )
            continue
        return path
    return None


def load(root, config):
    """Returns (class_names, (train paths, labels), (eval paths, labels)).

    Raises:
      DataError: the tree does not have the expected layout.
    """
    train_dir = os.path.join(root, config.train_split)
    if not os.path.isdir(train_dir):
        raise DataError(
            f"--dataset=folder:{root}: {train_dir} is not a folder; expected "
            f"{root}/{config.train_split}/<class>/*.jpg (see --train_split)"
        )
    class_names = tuple(_class_folders(train_dir))
    paths, labels = list_split(train_dir, class_names)
    eval_dir = _eval_dir(root, config.eval_split)
    if eval_dir is not None:
        return class_names, (paths, labels), list_split(eval_dir, class_names)
    logging.info("no eval folder under %s: holding out %.0f%%", root, 100 * config.eval_fraction)
    names = [os.path.relpath(p, root) for p in paths]
    train_idx, eval_idx = preprocessing.stratified_holdout(names, labels, config.eval_fraction)
    pick = lambda idx: ([paths[i] for i in idx], [labels[i] for i in idx])
    return class_names, pick(train_idx), pick(eval_idx)
