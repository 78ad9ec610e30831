"""Food-101 in its official layout: ``images/<class>/<id>.jpg`` with ``meta/train.txt`` and ``meta/test.txt``.

Each meta line is ``<class>/<id>`` (no extension). The download goes through torchvision
(``torchvision.datasets.Food101``, about 5 GB), which unpacks to ``<root>/food-101/``.

>>> index = index_food101(download_food101("~/data"))   # doctest: +SKIP
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from foodlib.data.folders import DatasetIndex, Split


def is_food101_root(root: str | Path) -> bool:
    root = Path(root)
    return (root / "meta" / "train.txt").is_file() and (root / "images").is_dir()


def download_food101(root: str | Path) -> Path:
    """Download and unpack Food-101 into ``root`` with torchvision; returns the dataset root.

    Raises:
        RuntimeError: the download failed (offline machine, proxy): the message says how to
            place a manually downloaded copy instead.
    """
    root = Path(root).expanduser()
    target = root / "food-101"
    if is_food101_root(target):
        return target
    from torchvision.datasets import Food101

    try:
        Food101(str(root), split="train", download=True)
    except Exception as error:  # urllib raises several types; all mean the same to the user
        raise RuntimeError(
            f"could not download Food-101 into {root} ({type(error).__name__}: {error}). On an offline machine, "
            f"download http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz elsewhere, unpack it so that "
            f"{target}/meta/train.txt exists, and pass --data food101:{target}"
        ) from error
    return target


def index_food101(root: str | Path) -> DatasetIndex:
    """Index a Food-101 tree by its official meta files (train and test; val is carved later)."""
    root = Path(root).expanduser().resolve()
    if not is_food101_root(root):
        raise FileNotFoundError(
            f"{root} is not a Food-101 root: expected {root}/meta/train.txt and {root}/images/. "
            "Use foodlib.data.food101.download_food101(ROOT) on a machine with internet."
        )
    classes_file = root / "meta" / "classes.txt"
    splits, names = {}, {}
    for split in ("train", "test"):
        meta = root / "meta" / f"{split}.txt"
        if meta.is_file():
            names[split] = [line.strip() for line in meta.read_text().splitlines() if line.strip()]
    if classes_file.is_file():
        classes = [c.strip() for c in classes_file.read_text().splitlines() if c.strip()]
    else:
        classes = sorted({n.split("/")[0] for n in names["train"]})
    lookup = {c: i for i, c in enumerate(classes)}
    for split, entries in names.items():
        paths, labels = [], []
        for entry in entries:
            cls = entry.split("/")[0]
            if cls not in lookup:
                raise ValueError(f"{root}/meta/{split}.txt names class {cls!r}, which is not in the class list")
            paths.append(str(root / "images" / f"{entry}.jpg"))
            labels.append(lookup[cls])
        splits[split] = Split(paths, np.asarray(labels, dtype=np.int64))
    return DatasetIndex(str(root), classes, splits)
