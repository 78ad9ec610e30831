"""Walking a class folder the way torchvision's ImageFolder does (sub-folders included, links
followed), without looping forever on a link that points back up the tree.

>>> files, skipped_links = walk_files("data/train/apple_pie")   # doctest: +SKIP
"""
from __future__ import annotations

import os
from pathlib import Path


def walk_files(folder: str | Path) -> tuple[list[str], list[tuple[str, str]], list[str]]:
    """Every non-hidden file under ``folder``, recursively, following symlinks; each real folder once.

    Returns:
        ``(files, skipped_links, hidden)``: file paths sorted; ``(link, target)`` for each link to
        a folder above it (a symlink loop such as ``ln -s .. loop``) or to a folder already walked
        (a second link to the same folder), which is not followed; hidden files and folders.
    """
    files, skipped, hidden = [], [], []
    root = str(folder)
    seen = {_identity(root)}
    for current, dirnames, filenames in os.walk(root, followlinks=True):
        keep = []
        for name in sorted(dirnames):
            path = os.path.join(current, name)
            if name.startswith("."):
                hidden.append(path)
                continue
            identity = _identity(path)
            if identity is None:
                continue  # a dangling link or a folder that vanished meanwhile
            target, here = os.path.realpath(path), os.path.realpath(current)
            if identity in seen or here == target or here.startswith(target.rstrip(os.sep) + os.sep):
                skipped.append((path, target))  # walked already, or a folder above this one: a loop
                continue
            seen.add(identity)
            keep.append(name)
        dirnames[:] = keep
        for name in filenames:
            (hidden if name.startswith(".") else files).append(os.path.join(current, name))
    return sorted(files), skipped, sorted(hidden)


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)  # follows links: the real folder
    except OSError:
        return None
    return st.st_dev, st.st_ino
