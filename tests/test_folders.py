import numpy as np
import pytest
from PIL import Image

from foodlib.data.folders import ClassMismatchError, carve_val, index_image_folder, limit_per_class
from foodlib.data.food101 import download_food101, index_food101


def write_tree(root, layout):
    """layout: {split: {class: n_images}}; writes tiny PNGs."""
    for split, classes in layout.items():
        for cls, n in classes.items():
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / f"{i:03d}.png")
    return root


def test_index_reads_splits_in_class_order(tmp_path):
    root = write_tree(tmp_path, {"train": {"b": 3, "a": 2}, "test": {"a": 1, "b": 1}})
    index = index_image_folder(root)
    assert index.classes == ["a", "b"]
    assert list(index.splits) == ["train", "test"]
    assert index.splits["train"].labels.tolist() == [0, 0, 1, 1, 1]
    assert all(p.endswith(".png") for p in index.splits["train"].paths)


def test_class_mismatch_lists_the_differences(tmp_path):
    root = write_tree(tmp_path, {"train": {"apple_pie": 2, "baklava": 2}, "test": {"apple_pie": 1, "bibimbap": 1}})
    with pytest.raises(ClassMismatchError) as error:
        index_image_folder(root)
    message = str(error.value)
    assert "test/ lacks ['baklava']" in message and "bibimbap" in message


def test_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        index_image_folder(tmp_path / "nowhere")


def test_val_split_is_stratified_and_reproducible(tmp_path):
    root = write_tree(tmp_path, {"train": {"a": 40, "b": 20, "c": 10}})
    index = index_image_folder(root)
    first = carve_val(index, fraction=0.2, seed=3)
    again = carve_val(index_image_folder(root), fraction=0.2, seed=3)
    other = carve_val(index, fraction=0.2, seed=4)
    assert first.splits["val"].paths == again.splits["val"].paths
    assert first.splits["val"].paths != other.splits["val"].paths
    assert np.bincount(first.splits["val"].labels).tolist() == [8, 4, 2]  # 20% of each class
    assert np.bincount(first.splits["train"].labels).tolist() == [32, 16, 8]
    assert not set(first.splits["val"].paths) & set(first.splits["train"].paths)


def test_existing_val_folder_is_kept(tmp_path):
    root = write_tree(tmp_path, {"train": {"a": 4, "b": 4}, "val": {"a": 1, "b": 1}})
    index = carve_val(index_image_folder(root), fraction=0.5, seed=0)
    assert len(index.splits["val"]) == 2 and len(index.splits["train"]) == 8


def test_split_files_are_written(tmp_path):
    root = write_tree(tmp_path / "data", {"train": {"a": 5, "b": 5}})
    index = carve_val(index_image_folder(root), fraction=0.2, seed=0)
    folder = index.write_split_files(tmp_path / "run")
    lines = (folder / "val.txt").read_text().splitlines()
    assert len(lines) == 2 and {line.split("\t")[1] for line in lines} == {"a", "b"}


def test_limit_per_class(tmp_path):
    index = index_image_folder(write_tree(tmp_path, {"train": {"a": 10, "b": 3}}))
    limited = limit_per_class(index.splits["train"], 4, seed=0)
    assert np.bincount(limited.labels).tolist() == [4, 3]


def test_food101_official_layout(tmp_path):
    root = tmp_path / "food-101"
    for cls in ("apple_pie", "baklava"):
        (root / "images" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8)).save(root / "images" / cls / f"{i}.jpg")
    (root / "meta").mkdir()
    (root / "meta" / "classes.txt").write_text("apple_pie\nbaklava\n")
    (root / "meta" / "train.txt").write_text("apple_pie/0\napple_pie/1\nbaklava/0\nbaklava/1\n")
    (root / "meta" / "test.txt").write_text("apple_pie/2\nbaklava/2\n")
    index = index_food101(root)
    assert index.classes == ["apple_pie", "baklava"]
    assert index.splits["train"].labels.tolist() == [0, 0, 1, 1]
    assert index.splits["test"].paths[1].endswith("images/baklava/2.jpg")
    assert download_food101(tmp_path) == root  # already there: no download attempted


def test_food101_download_offline_gives_a_clear_message(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "Food101", offline)
    with pytest.raises(RuntimeError, match="offline machine.*food-101.tar.gz"):
        download_food101(tmp_path)
