"""Image-folder datasets: an index of (path, label) per split, and a reproducible stratified val split.

Layouts understood (the confidential 59-class data uses the first):

* ``root/train/<class>/*``, optional ``root/val/<class>/*``, optional ``root/test/<class>/*``
* ``root/<class>/*`` (no split folders): everything is train; val (and nothing else) is carved out.

As in torchvision's ImageFolder, a class's images may sit in sub-folders of its class folder
(``train/<class>/<any>/<image>``); links are followed, a link back up the tree is not.

>>> index = index_image_folder("../shared/data/food101-10")        # doctest: +SKIP
>>> index = carve_val(index, fraction=0.1, seed=0)                  # doctest: +SKIP
>>> index.summary()                                                 # doctest: +SKIP
'10 classes; train 3370, val 380, test 1250'
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from foodlib.data.images import IMAGE_EXTENSIONS
from foodlib.data.walk import walk_files
from foodlib.files import atomic_write_text

SPLITS = ("train", "val", "test")


class ClassMismatchError(ValueError):
    """The class folders differ between splits."""


@dataclass
class Split:
    """One split: absolute file paths and integer labels ``(N,)``."""

    paths: list[str]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, keep: np.ndarray) -> "Split":
        keep = np.asarray(keep)
        return Split([self.paths[i] for i in keep], self.labels[keep])


@dataclass
class DatasetIndex:
    """Classes and the files of each split; ``splits`` holds "train" and maybe "val" / "test"."""

    root: str
    classes: list[str]
    splits: dict[str, Split] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def summary(self) -> str:
        parts = ", ".join(f"{name} {len(split)}" for name, split in self.splits.items())
        if not len(self.splits.get("test", ())):  # root/<class>/* or no test/ folder
            parts += "; no test split (no test/ folder), so val is all the run reports"
        return f"{self.num_classes} classes; {parts}"

    def write_split_files(self, folder: str | Path) -> Path:
        """Write ``splits/<split>.txt`` (path<TAB>class per line) so the exact split can be reproduced."""
        folder = Path(folder) / "splits"
        for name, split in self.splits.items():
            lines = [f"{p}\t{self.classes[y]}" for p, y in zip(split.paths, split.labels)]
            atomic_write_text(folder / f"{name}.txt", "\n".join(lines) + "\n")
        return folder

    def drop(self, bad_paths: set[str]) -> "DatasetIndex":
        """A copy without the given files (unreadable images found by the scan or the cache)."""
        splits = {}
        for name, split in self.splits.items():
            keep = np.array([i for i, p in enumerate(split.paths) if p not in bad_paths], dtype=np.int64)
            splits[name] = split.subset(keep)
        return DatasetIndex(self.root, self.classes, splits)


def _class_folders(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _image_files(folder: Path) -> list[str]:
    """Image files of one class folder, sub-folders included (ImageFolder's meaning); sorted.

    A link back to a folder already walked (``ln -s .. loop``) is not followed, with a warning.
    """
    files, skipped_links, _ = walk_files(folder)
    for link, target in skipped_links:
        warnings.warn(f"{link} links to {target}, a folder already indexed (a symlink loop?); not followed",
                      stacklevel=3)
    return [p for p in files if Path(p).suffix.lower() in IMAGE_EXTENSIONS and os.path.isfile(p)]


def index_image_folder(root: str | Path) -> DatasetIndex:
    """Index an ImageFolder tree (see the module docstring for the layouts).

    Raises:
        FileNotFoundError: the root does not exist or holds no class folders.
        ClassMismatchError: the splits do not have the same class folders (the message lists them).
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist; pass --data with an ImageFolder root")
    split_dirs = {name: root / name for name in SPLITS if (root / name).is_dir()}
    if not split_dirs:
        split_dirs = {"train": root}
    elif "train" not in split_dirs:
        raise FileNotFoundError(f"{root} has {sorted(split_dirs)} but no train/ folder")

    classes_per_split = {name: _class_folders(path) for name, path in split_dirs.items()}
    classes = classes_per_split["train"]
    if not classes:
        raise FileNotFoundError(f"{split_dirs['train']} holds no class folders (expected train/<class>/<image>)")
    problems = []
    for name, found in classes_per_split.items():
        missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
        if missing:
            problems.append(f"{name}/ lacks {missing}")
        if extra:
            problems.append(f"{name}/ has classes not in train/: {extra}")
    if problems:
        raise ClassMismatchError(
            f"class folders differ between splits in {root}: " + "; ".join(problems)
            + ". Every split must have the same class folders (an empty folder is allowed)."
        )

    splits = {}
    for name, path in split_dirs.items():
        paths, labels = [], []
        for label, cls in enumerate(classes):
            files = _image_files(path / cls)
            paths += files
            labels += [label] * len(files)
        splits[name] = Split(paths, np.asarray(labels, dtype=np.int64))
    return DatasetIndex(str(root), classes, splits)


def limit_per_class(split: Split, limit: int, seed: int) -> Split:
    """Keep at most ``limit`` files per class, chosen at random with ``seed`` (order kept)."""
    rng = np.random.default_rng(seed)
    keep = []
    for label in np.unique(split.labels):
        members = np.flatnonzero(split.labels == label)
        if len(members) > limit:
            members = np.sort(rng.choice(members, size=limit, replace=False))
        keep.append(members)
    return split.subset(np.sort(np.concatenate(keep)))


def carve_val(index: DatasetIndex, fraction: float, seed: int) -> DatasetIndex:
    """Carve a stratified val split from train when the data has none (a no-op otherwise).

    The same (file list, fraction, seed) always gives the same split; each class keeps at least
    one training image and gets ``round(fraction * n_class)`` (at least one) val images.
    """
    if "val" in index.splits or fraction <= 0:
        return index
    train = index.splits["train"]
    rng = np.random.default_rng(seed)
    val_idx = []
    for label in range(index.num_classes):
        members = np.flatnonzero(train.labels == label)
        if len(members) < 2:
            continue  # too few to split; the class still trains
        n_val = min(len(members) - 1, max(1, int(round(fraction * len(members)))))
        val_idx.append(rng.choice(members, size=n_val, replace=False))
    val_idx = np.sort(np.concatenate(val_idx)) if val_idx else np.zeros(0, dtype=np.int64)
    train_mask = np.ones(len(train), dtype=bool)
    train_mask[val_idx] = False
    splits = dict(index.splits)
    splits["train"] = train.subset(np.flatnonzero(train_mask))
    splits["val"] = train.subset(val_idx)
    return DatasetIndex(index.root, index.classes, {k: splits[k] for k in SPLITS if k in splits})
