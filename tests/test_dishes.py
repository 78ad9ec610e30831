"""The procedural "dishes" dataset: determinism, the difficulty knobs, and writing an ImageFolder."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from foodlib.data import dishes
from foodlib.data.dishes import (
    INGREDIENTS,
    TEST_INDEX_OFFSET,
    VAL_INDEX_OFFSET,
    DishesSpec,
    class_names,
    default_dishes_root,
    dish_recipe,
    render_dish,
    write_dishes,
)

SMALL = DishesSpec(num_classes=3, train_per_class=3, val_per_class=1, test_per_class=2, image_size=32)


def test_render_shape_and_dtype():
    for size in (32, 64, 96):
        img = render_dish(replace(DishesSpec(), image_size=size), 1, 5)
        assert img.shape == (size, size, 3) and img.dtype == np.uint8
        assert img.std() > 10  # a picture, not a flat fill


def test_same_seed_and_index_give_identical_images_in_any_order():
    spec = DishesSpec()
    keys = [(c, i) for c in range(4) for i in range(3)]
    forward = {key: render_dish(spec, *key) for key in keys}
    backward = {key: render_dish(spec, *key) for key in reversed(keys)}
    for key in keys:
        assert np.array_equal(forward[key], backward[key]), key
    assert not np.array_equal(forward[(0, 0)], forward[(0, 1)])  # another image of the class
    assert not np.array_equal(forward[(0, 0)], forward[(1, 0)])  # the same index in another class


def test_images_depend_only_on_seed_class_index_and_knobs():
    spec = DishesSpec()
    image = render_dish(spec, 2, 7)
    # the sizes of the splits and the number of classes do not change image (2, 7)
    bigger = replace(spec, num_classes=20, train_per_class=5, test_per_class=999)
    assert np.array_equal(image, render_dish(bigger, 2, 7))
    assert not np.array_equal(image, render_dish(replace(spec, seed=1), 2, 7))
    assert not np.array_equal(image, render_dish(replace(spec, intra=0.2), 2, 7))
    assert not np.array_equal(image, render_dish(replace(spec, inter=0.9), 2, 7))


def _recipe_spread(inter: float, classes: int = 8) -> float:
    """Mean L1 distance between the ingredient weights of every pair of class recipes."""
    weights = np.stack([dish_recipe(0, c, inter).weights for c in range(classes)])  # (C, K)
    pairs = [np.abs(weights[a] - weights[b]).sum() for a in range(classes) for b in range(a)]
    return float(np.mean(pairs))


def test_inter_moves_the_class_recipes_apart():
    same = [dish_recipe(0, c, 0.0) for c in range(5)]
    for recipe in same[1:]:  # inter = 0: every class is the shared dish
        assert np.allclose(recipe.weights, same[0].weights)
        assert np.array_equal(recipe.colours, same[0].colours)
        assert recipe.piece_scale == same[0].piece_scale == 1.0
    spreads = [_recipe_spread(inter) for inter in (0.0, 0.2, 0.5, 1.0)]
    assert spreads[0] == pytest.approx(0.0, abs=1e-12)
    assert spreads == sorted(spreads) and spreads[-1] > 0.5
    for c in range(5):
        weights = dish_recipe(0, c, 0.5).weights
        assert weights.shape == (len(INGREDIENTS),) and weights.sum() == pytest.approx(1.0)


def _within_class_spread(intra: float) -> float:
    """Mean over pixels of the standard deviation across 12 images of one class."""
    spec = DishesSpec(intra=intra)
    stack = np.stack([render_dish(spec, 0, i).astype(np.float32) for i in range(12)])
    return float(stack.std(axis=0).mean())


def test_intra_controls_how_much_images_of_a_class_vary():
    low, high = _within_class_spread(0.0), _within_class_spread(1.0)
    assert high > 1.5 * low
    # the table (seen in the corners) is always the same wood at intra = 0, any table at 1
    corner_spread = []
    for intra in (0.0, 1.0):
        spec = DishesSpec(intra=intra)
        corners = np.stack([render_dish(spec, c, i)[:4, :4].mean(axis=(0, 1)) for c in range(3) for i in range(4)])
        corner_spread.append(corners.std(axis=0).mean())  # across images, mean over R, G, B
    assert corner_spread[1] > 4 * corner_spread[0]


def test_class_names_are_unique_and_readable():
    names = class_names(DishesSpec(num_classes=12))
    assert len(set(names)) == 12
    assert names[0].startswith("dish_00_") and names[11].startswith("dish_11_")
    ingredient_names = {ing.name for ing in INGREDIENTS}
    for name in names:
        assert set(name.split("_")[2:]) <= ingredient_names


def test_spec_validation_names_the_field():
    with pytest.raises(ValueError, match="intra"):
        DishesSpec(intra=1.5)
    with pytest.raises(ValueError, match="num_classes"):
        DishesSpec(num_classes=1)
    with pytest.raises(ValueError, match="image_size"):
        DishesSpec(image_size=8)
    with pytest.raises(ValueError, match="class_index"):
        render_dish(DishesSpec(num_classes=3), 3, 0)


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_write_dishes_layout_and_lossless_pixels(tmp_path):
    root = write_dishes(tmp_path / "dishes", SMALL, progress=False)
    names = class_names(SMALL)
    expected = ["dishes.json"]
    for split, count in (("train", 3), ("val", 1), ("test", 2)):
        for name in names:
            expected += [f"{split}/{name}/{i:05d}.png" for i in range(count)]
    assert _files(root) == sorted(expected)
    assert json.loads((root / "dishes.json").read_text()) == SMALL.to_dict()
    # PNG is lossless: the files hold exactly what render_dish gives, at the split's index offset
    for split, offset in (("train", 0), ("val", VAL_INDEX_OFFSET), ("test", TEST_INDEX_OFFSET)):
        stored = np.asarray(Image.open(root / split / names[2] / "00000.png"))
        assert np.array_equal(stored, render_dish(SMALL, 2, offset))


def test_write_dishes_without_val_has_no_val_folder(tmp_path):
    root = write_dishes(tmp_path / "d", replace(SMALL, val_per_class=0), progress=False)
    assert sorted(p.name for p in root.iterdir()) == ["dishes.json", "test", "train"]


def test_write_dishes_is_idempotent(tmp_path, monkeypatch):
    root = write_dishes(tmp_path / "dishes", SMALL, progress=False)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*.png")}

    def must_not_render(*args, **kwargs):
        raise AssertionError("a second call with the same spec must not render anything")

    monkeypatch.setattr(dishes, "render_dish", must_not_render)
    assert write_dishes(root, SMALL, progress=False) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.png")} == before


def test_write_dishes_rebuilds_cleanly_on_a_new_spec(tmp_path):
    root = tmp_path / "dishes"
    write_dishes(root, SMALL, progress=False)
    other = replace(SMALL, num_classes=2, train_per_class=1, val_per_class=0, test_per_class=1, inter=0.9)
    write_dishes(root, other, progress=False)
    names = class_names(other)
    assert _files(root) == sorted(
        ["dishes.json"] + [f"{split}/{name}/00000.png" for split in ("train", "test") for name in names]
    )
    assert json.loads((root / "dishes.json").read_text()) == other.to_dict()
    assert not list(tmp_path.glob(".dishes.*"))  # no temporary folders left behind


def test_write_dishes_refuses_a_folder_with_other_files(tmp_path):
    (tmp_path / "thesis.docx").write_text("precious")
    with pytest.raises(FileExistsError, match="thesis.docx"):
        write_dishes(tmp_path, SMALL, progress=False)
    assert (tmp_path / "thesis.docx").read_text() == "precious"


def test_default_root_follows_foodlib_cache_and_the_spec(tmp_path, monkeypatch):
    monkeypatch.setenv("FOODLIB_CACHE", str(tmp_path))
    root = default_dishes_root(SMALL)
    assert root.parent == tmp_path and root.name == f"dishes-{SMALL.digest()}"
    assert default_dishes_root(replace(SMALL, seed=3)) != root
    monkeypatch.delenv("FOODLIB_CACHE")
    assert default_dishes_root(SMALL).parent == Path.home() / ".cache" / "foodlib"
