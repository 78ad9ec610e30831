"""scikit-learn's digits written as an RGB ImageFolder."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from foodlib.data.digits import default_digits_root, digits_arrays, write_digits


@pytest.fixture(scope="module")
def source():
    return load_digits()


def _class_counts(root, split) -> dict[int, int]:
    return {int(d.name): len(list(d.glob("*.png"))) for d in (root / split).iterdir()}


def test_write_digits_counts_and_stratification(tmp_path, source):
    root = write_digits(tmp_path / "digits", image_size=16, test_fraction=0.2, seed=0)
    assert sorted(p.name for p in (root / "train").iterdir()) == [str(d) for d in range(10)]
    assert sorted(p.name for p in (root / "test").iterdir()) == [str(d) for d in range(10)]
    train, test = _class_counts(root, "train"), _class_counts(root, "test")
    per_class = np.bincount(source.target)  # 1797 images, ~180 per digit
    total = len(source.target)
    assert sum(test.values()) == math.ceil(0.2 * total)  # scikit-learn rounds the test size up
    assert sum(train.values()) + sum(test.values()) == total
    for digit in range(10):
        assert train[digit] + test[digit] == per_class[digit]
        assert abs(test[digit] - 0.2 * per_class[digit]) <= 1  # stratified


def test_files_hold_the_source_digit_upscaled(tmp_path, source):
    root = write_digits(tmp_path / "digits", image_size=16, resample="nearest")
    path = next((root / "train" / "3").glob("*.png"))
    index = int(path.stem)  # files are named after the source index
    assert source.target[index] == 3
    stored = np.asarray(Image.open(path))
    assert stored.shape == (16, 16, 3) and stored.dtype == np.uint8
    # by hand: 0..16 -> 0..255, each source pixel becomes a 2x2 block, grey in R, G and B
    grey = np.rint(source.images[index] * 255 / 16).astype(np.uint8)
    expected = np.kron(grey, np.ones((2, 2), np.uint8))
    for channel in range(3):
        assert np.array_equal(stored[..., channel], expected)


def test_digits_arrays_bilinear_is_smooth_and_rgb():
    images, labels = digits_arrays(32)
    assert images.shape == (1797, 32, 32, 3) and labels.shape == (1797,)
    assert np.array_equal(images[..., 0], images[..., 2])
    # bilinear upscaling leaves intermediate grey levels that a 4x nearest copy would not have
    nearest, _ = digits_arrays(32, resample="nearest")
    assert len(np.unique(images[0])) > len(np.unique(nearest[0]))
    with pytest.raises(ValueError, match="resample"):
        digits_arrays(32, resample="cubic")


def test_write_digits_is_idempotent_and_rebuilds_on_new_settings(tmp_path):
    root = write_digits(tmp_path / "digits", image_size=12)
    marker = json.loads((root / "digits.json").read_text())
    assert marker["image_size"] == 12 and marker["seed"] == 0
    some_file = next((root / "test" / "0").glob("*.png"))
    stamp = some_file.stat().st_mtime_ns
    write_digits(root, image_size=12)
    assert some_file.stat().st_mtime_ns == stamp  # nothing rewritten
    test_before = sorted(p.name for p in (root / "test").rglob("*.png"))

    write_digits(root, image_size=12, seed=1)  # another split
    test_after = sorted(p.name for p in (root / "test").rglob("*.png"))
    assert test_after != test_before and len(test_after) == len(test_before)
    assert len(list(root.rglob("*.png"))) == 1797  # the old split's files are gone
    assert json.loads((root / "digits.json").read_text())["seed"] == 1


def test_default_root_and_validation(tmp_path, monkeypatch):
    monkeypatch.setenv("FOODLIB_CACHE", str(tmp_path))
    assert default_digits_root(32) == tmp_path / "digits-32px-test20-seed0"
    with pytest.raises(ValueError, match="test_fraction"):
        write_digits(tmp_path / "x", test_fraction=1.0)
