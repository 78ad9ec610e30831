"""Embedded "digits": scikit-learn's 8x8 handwritten digits as a small RGB ImageFolder.

The fastest real (not generated) dataset available offline: 1,797 images in 10 classes that ship
inside scikit-learn. Useful for smoke tests, 2-D feature plots (the paper figures of Center Loss
and L-GM use MNIST-like digits) and anything that must run in seconds.

>>> root = write_digits("/tmp/digits", image_size=32)  # doctest: +SKIP
>>> sorted(p.name for p in (root / "train").iterdir())[:3]  # doctest: +SKIP
['0', '1', '2']
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from foodlib.files import building_dir, cache_folder, check_replaceable, read_json_or_none, swap_in

#: bump when the way images are written changes, so written folders are rebuilt.
DIGITS_VERSION = 1
MARKER_NAME = "digits.json"
SPLITS = ("train", "test")
_RESAMPLING = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR}


def digits_arrays(image_size: int = 32, resample: str = "bilinear") -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as RGB uint8 arrays.

    Args:
        image_size: output side in pixels (the source is 8x8).
        resample: ``"bilinear"`` (smooth strokes, closer to a photo) or ``"nearest"`` (blocky).

    Returns:
        ``images`` ``(N, S, S, 3)`` uint8 (white digit on black, grey repeated in R, G and B) and
        ``labels`` ``(N,)`` int64, N = 1797.

    >>> images, labels = digits_arrays(16)
    >>> images.shape, labels.shape
    ((1797, 16, 16, 3), (1797,))
    """
    from sklearn.datasets import load_digits

    if resample not in _RESAMPLING:
        raise ValueError(f"resample must be one of {sorted(_RESAMPLING)}, got {resample!r}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 (the source digits are 8x8), got {image_size}")
    digits = load_digits()
    grey = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8); source values 0..16
    method = _RESAMPLING[resample]
    images = np.stack(
        [np.asarray(Image.fromarray(g, "L").resize((image_size, image_size), method)) for g in grey]
    )  # (N, S, S)
    return np.repeat(images[..., None], 3, axis=3), digits.target.astype(np.int64)


def default_digits_root(image_size: int = 32, test_fraction: float = 0.2, seed: int = 0) -> Path:
    """``<cache>/digits-<size>-<test %>-<seed>``, ``<cache>`` from :func:`foodlib.files.cache_folder`.

    >>> default_digits_root(32).name
    'digits-32px-test20-seed0'
    """
    return cache_folder() / f"digits-{image_size}px-test{round(test_fraction * 100)}-seed{seed}"


def write_digits(
    root: str | os.PathLike,
    image_size: int = 32,
    test_fraction: float = 0.2,
    seed: int = 0,
    resample: str = "bilinear",
) -> Path:
    """Write the digits as ``root/{train,test}/<digit>/<source index>.png``, once.

    The train/test split is stratified (scikit-learn's ``train_test_split``) with ``seed``. A marker
    ``root/digits.json`` records the settings: a second call with the same settings returns at once;
    other settings rebuild the folder from scratch (written aside, then swapped in).

    Args:
        root: dataset folder (created if missing; a folder holding other files is refused).
        image_size: side of the written PNGs.
        test_fraction: share of each class in the test split, in (0, 1).
        seed: split seed.
        resample: ``"bilinear"`` or ``"nearest"`` upscaling.

    Returns:
        ``root`` as a Path.

    >>> write_digits("/tmp/digits", image_size=32)  # doctest: +SKIP
    PosixPath('/tmp/digits')
    """
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    root = Path(root)
    settings = {
        "image_size": image_size,
        "test_fraction": test_fraction,
        "seed": seed,
        "resample": resample,
        "version": DIGITS_VERSION,
    }
    if read_json_or_none(root / MARKER_NAME) == settings:
        return root
    check_replaceable(root, MARKER_NAME, "digits", SPLITS)

    images, labels = digits_arrays(image_size, resample)
    indices = np.arange(len(labels))
    train_idx, test_idx = train_test_split(
        indices, test_size=test_fraction, stratify=labels, random_state=seed
    )
    building = building_dir(root)
    try:
        for split, chosen in zip(SPLITS, (train_idx, test_idx)):
            for digit in range(10):
                (building / split / str(digit)).mkdir(parents=True, exist_ok=True)
            for i in sorted(chosen):
                path = building / split / str(labels[i]) / f"{i:04d}.png"
                Image.fromarray(images[i], "RGB").save(path, compress_level=1)
        (building / MARKER_NAME).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
        swap_in(building, root, MARKER_NAME, settings)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return root
