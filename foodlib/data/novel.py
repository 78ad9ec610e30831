"""Held-out ("novel") classes: removed from training and val, kept as an open-set pool.

``novel_classes`` (a Config field) is a count or a list of class names. A count picks that many
classes at random with ``split_seed`` (the same seed always picks the same classes, whatever the
training seed); names are taken as given. Every image of a novel class, from every split, joins
the open-set pool; the known classes keep their splits and are relabelled ``0..K-1`` in their
original order, so the network and loss never see a novel label.

>>> index = DatasetIndex("/d", ["a", "b", "c", "d"], {"train": Split(["/d/1", "/d/2", "/d/3", "/d/4"],
...                                                                 np.array([0, 1, 2, 3]))})
>>> known, novel = hold_out_classes(index, ["b", "d"], seed=0)
>>> known.classes, known.splits["train"].labels.tolist(), novel.classes, novel.splits["novel"].paths
(['a', 'c'], [0, 1], ['b', 'd'], ['/d/2', '/d/4'])
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from foodlib.data.folders import DatasetIndex, Split

NOVEL_SPLIT = "novel"  # the pool's split name: splits/novel.txt in the run folder, novel_features.npz


def choose_novel_classes(classes: Sequence[str], novel: int | Sequence[str], seed: int) -> list[str]:
    """The held-out class names, sorted: ``novel`` names checked against ``classes``, or a count drawn with ``seed``.

    At least two classes must stay known (a classifier needs two) and at least two must be held
    out (retrieval and verification need a different dish to be wrong about).

    Raises:
        ValueError: a count out of range, an unknown or repeated name (the message lists the valid ones).

    >>> choose_novel_classes(["a", "b", "c", "d", "e"], 2, seed=0) == choose_novel_classes(list("abcde"), 2, seed=0)
    True
    """
    classes = list(classes)
    if isinstance(novel, (int, np.integer)) and not isinstance(novel, bool):
        count = int(novel)
        if not 2 <= count <= len(classes) - 2:
            raise ValueError(
                f"novel_classes={count}: the data has {len(classes)} classes; hold out between 2 and "
                f"{len(classes) - 2} of them so that at least 2 stay known"
            )
        # A generator of its own (not carve_val's): which classes are novel depends on split_seed only.
        rng = np.random.default_rng([seed, len(classes), 20])
        return sorted(classes[i] for i in rng.choice(len(classes), size=count, replace=False))
    names = [str(n) for n in novel]
    unknown = [n for n in names if n not in classes]
    if unknown:
        raise ValueError(f"novel_classes names {unknown} are not classes of the data; valid names: {classes}")
    if len(set(names)) != len(names):
        raise ValueError(f"novel_classes={names} names a class twice; list each held-out class once")
    if not 2 <= len(names) <= len(classes) - 2:
        raise ValueError(
            f"novel_classes={names}: hold out between 2 and {len(classes) - 2} of the {len(classes)} classes"
        )
    return sorted(names)


def hold_out_classes(index: DatasetIndex, novel: int | Sequence[str], seed: int) -> tuple[DatasetIndex, DatasetIndex]:
    """Split ``index`` into (known classes, open-set pool).

    Returns:
        ``known``: the same splits without the novel classes, labels renumbered ``0..K-1``;
        ``pool``: a :class:`DatasetIndex` over the novel classes (sorted) with one split,
        ``"novel"``, holding every image of those classes from every split.
    """
    novel_names = choose_novel_classes(index.classes, novel, seed)
    known_names = [c for c in index.classes if c not in novel_names]
    to_known = np.full(index.num_classes, -1, dtype=np.int64)
    to_novel = np.full(index.num_classes, -1, dtype=np.int64)
    for new, name in enumerate(known_names):
        to_known[index.classes.index(name)] = new
    for new, name in enumerate(novel_names):
        to_novel[index.classes.index(name)] = new

    known_splits, pool_paths, pool_labels = {}, [], []
    for name, split in index.splits.items():
        keep = np.flatnonzero(to_known[split.labels] >= 0)
        known_splits[name] = Split([split.paths[i] for i in keep], to_known[split.labels[keep]])
        held = np.flatnonzero(to_novel[split.labels] >= 0)
        pool_paths += [split.paths[i] for i in held]
        pool_labels.append(to_novel[split.labels[held]])
    labels = np.concatenate(pool_labels) if pool_labels else np.zeros(0, dtype=np.int64)
    order = np.argsort(labels, kind="stable")  # grouped by class, each class in split then file order
    pool = Split([pool_paths[i] for i in order], labels[order])
    return (DatasetIndex(index.root, known_names, known_splits),
            DatasetIndex(index.root, novel_names, {NOVEL_SPLIT: pool}))
