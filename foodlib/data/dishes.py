"""Embedded "dishes": a procedural generator of look-alike food-plate photos.

A fine-grained stand-in for real food photos that needs no download. Each class is a *recipe*:
weights over a shared pool of ingredients (rice, greens, tomato, sauce, noodles, meat, egg...), a
colour tweak per ingredient, a piece size, a texture scale, how full the plate is, and how often a
sauce drizzle appears. Every image then draws its own plate position, size, rotation and tilt,
lighting (brightness, colour cast, light direction), table colour and texture, clutter (cutlery,
napkins, glasses, crumbs), ingredient layout and sensor noise.

Two knobs set the difficulty:

* ``inter`` in [0, 1]: how far each class recipe moves away from a recipe shared by all classes.
  ``0`` makes every class the same dish (chance accuracy); ``1`` gives unrelated recipes.
* ``intra`` in [0, 1]: how much one image differs from another of its class (every nuisance
  amplitude above scales with it; ``0`` still varies the ingredient layout).

The defaults (``intra=0.7, inter=0.5``) were calibrated so a better loss has room to show: a
small CNN (4 conv layers 32-64-128-128, BN, ReLU, global pool; AdamW lr 2e-3 cosine, batch 64,
flips and random crops) trained for 150 CPU-seconds on one core (~6.5 epochs of 10 classes x 300
images, 64 px) reaches 74% and 75% test top-1 on dataset seeds 0 and 1, still rising. (For
comparison: ``inter=0.35`` gave 55%, ``intra=0.55, inter=0.4`` 76%.) Rendering takes about 2 ms
per 64 px image on one core (~500 images/s); 10 x 400 images write in about 15 s.

Image ``i`` of class ``c`` comes from ``numpy.random.default_rng([seed, c, i])`` and the class
recipe, which comes from ``(seed, c, inter)`` alone: images can be rendered in any order, by any
number of workers, and come out the same. Written datasets take train images from indices
``0..``, val from ``VAL_INDEX_OFFSET + 0..`` and test from ``TEST_INDEX_OFFSET + 0..``, so changing
the train size leaves the test images unchanged.

>>> spec = DishesSpec(num_classes=10, train_per_class=300, test_per_class=100)
>>> render_dish(spec, class_index=3, image_index=0).shape
(64, 64, 3)
>>> root = write_dishes(default_dishes_root(spec), spec)  # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path

import numpy as np

from foodlib.files import building_dir, cache_folder, check_replaceable, swap_in
from PIL import Image, ImageFilter

#: bump when the rendering changes, so written datasets and caches keyed on the spec are rebuilt.
GENERATOR_VERSION = 1
#: image index offsets of the val and test splits (train uses 0, 1, 2...).
VAL_INDEX_OFFSET = 1_000_000
TEST_INDEX_OFFSET = 2_000_000
#: name of the marker file that records the spec of a written dataset.
MARKER_NAME = "dishes.json"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class DishesSpec:
    """What to generate. Every field is part of the dataset's identity (and of its cache key).

    Attributes:
        num_classes: number of dishes (classes).
        train_per_class: training images per class.
        val_per_class: validation images per class (0: no val folder; carve one from train).
        test_per_class: test images per class.
        image_size: side of the square images in pixels (64 to 128 is the intended range).
        intra: within-class variation in [0, 1]: nuisance amplitude (pose, light, table, clutter).
        inter: between-class difference in [0, 1]: how far each recipe departs from the shared one.
        seed: dataset seed; recipes and images are functions of it.
    """

    num_classes: int = 10  # dishes; 10 to 50 is typical
    train_per_class: int = 300  # a few CPU minutes of training for a small CNN
    val_per_class: int = 0  # 0: the data module carves val out of train
    test_per_class: int = 100
    image_size: int = 64  # pixels; 64 renders ~1,000 images/s on one core
    intra: float = 0.7  # calibrated with inter (module docstring): ~75% test top-1 for a small
    inter: float = 0.5  # CNN after 2.5 CPU minutes, so a better loss has room to show
    seed: int = 0

    def __post_init__(self):
        if self.num_classes < 2:
            raise ValueError(f"DishesSpec.num_classes must be >= 2, got {self.num_classes}")
        for name in ("train_per_class", "val_per_class", "test_per_class"):
            value = getattr(self, name)
            if not 0 <= value < VAL_INDEX_OFFSET:
                raise ValueError(f"DishesSpec.{name} must be in [0, {VAL_INDEX_OFFSET}), got {value}")
        if self.train_per_class < 1:
            raise ValueError(f"DishesSpec.train_per_class must be >= 1, got {self.train_per_class}")
        if not 16 <= self.image_size <= 1024:
            raise ValueError(f"DishesSpec.image_size must be in [16, 1024] pixels, got {self.image_size}")
        for name in ("intra", "inter"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"DishesSpec.{name} must be in [0, 1], got {value}")

    def to_dict(self) -> dict:
        """The spec plus the generator version: what the marker file stores."""
        return {**asdict(self), "generator_version": GENERATOR_VERSION}

    @classmethod
    def from_dict(cls, data: dict) -> "DishesSpec":
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})

    def digest(self) -> str:
        """A short stable hash of :meth:`to_dict` (used in cache folder names)."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------
# The ingredient pool. Colours are sRGB 0-255. `kind` decides how an ingredient is drawn:
#   "patch"    fills cells of the plate's layout (a base such as rice or sauce), with `texture`
#   "disc"     round pieces (slices) placed on top; "blob": irregular pieces; "strip": sticks
#   "sprinkle" tiny dots scattered over the food
# `second` is a secondary colour (yolk, tomato flesh, leaf highlights...).
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ingredient:
    name: str
    colour: tuple[int, int, int]
    second: tuple[int, int, int]
    kind: str  # patch | disc | blob | strip | sprinkle
    texture: str  # grains | strands | leafy | smooth (patches); pieces use their own look
    size: float  # piece radius (plate radii) or texture cell size


INGREDIENTS: tuple[Ingredient, ...] = (
    Ingredient("rice", (232, 226, 204), (250, 248, 238), "patch", "grains", 0.05),
    Ingredient("noodles", (226, 190, 112), (245, 215, 150), "patch", "strands", 0.06),
    Ingredient("greens", (72, 136, 56), (130, 180, 80), "patch", "leafy", 0.12),
    Ingredient("sauce", (150, 58, 32), (200, 110, 70), "patch", "smooth", 0.30),
    Ingredient("curry", (206, 142, 44), (230, 180, 90), "patch", "smooth", 0.25),
    Ingredient("beans", (112, 62, 40), (150, 95, 60), "patch", "grains", 0.09),
    Ingredient("tomato", (206, 46, 36), (240, 120, 90), "disc", "", 0.16),
    Ingredient("meat", (122, 72, 46), (80, 45, 30), "blob", "", 0.17),
    Ingredient("egg", (248, 244, 232), (245, 178, 40), "disc", "", 0.22),
    Ingredient("carrot", (236, 122, 36), (250, 160, 70), "strip", "", 0.15),
    Ingredient("mushroom", (160, 130, 100), (110, 85, 65), "disc", "", 0.12),
    Ingredient("cheese", (246, 216, 112), (255, 240, 170), "sprinkle", "", 0.0),
    Ingredient("herbs", (42, 112, 42), (90, 160, 60), "sprinkle", "", 0.0),
)
_PATCH = np.array([ing.kind == "patch" for ing in INGREDIENTS])
_COLOURS = np.array([ing.colour for ing in INGREDIENTS], dtype=np.float32)  # (K, 3)
_SECONDS = np.array([ing.second for ing in INGREDIENTS], dtype=np.float32)  # (K, 3)

# Tables: (colour, texture). Index 0 is the table at intra = 0.
_TABLES = (
    ((150, 105, 70), "wood"),
    ((225, 222, 215), "marble"),
    ((60, 62, 66), "slate"),
    ((180, 40, 40), "checker"),
    ((70, 100, 150), "cloth"),
    ((200, 170, 120), "wood"),
    ((95, 120, 80), "cloth"),
    ((240, 240, 240), "cloth"),
)
_PLATES = ((246, 244, 238), (236, 232, 220), (60, 70, 100), (35, 35, 38), (210, 225, 235))
_NAPKINS = ((235, 235, 235), (200, 60, 60), (60, 110, 170), (230, 200, 90), (120, 160, 110))
_SAUCE = [ing.name for ing in INGREDIENTS].index("sauce")
_PIECES_PER_WEIGHT = 20.0  # mean pieces of an ingredient whose weight is 1
_CAMERA_BLUR = ImageFilter.BoxBlur(0.5)  # a fractional box of radius 0.5 is the 3x3 tent [1 2 1]/4
_RECIPE_STREAM = 0x7D15  # first word of the recipe seeds; image seeds start with the dataset seed


@dataclass(frozen=True)
class Recipe:
    """One class: what goes on the plate (arrays indexed like :data:`INGREDIENTS`)."""

    weights: np.ndarray  # (K,) ingredient proportions, sum 1
    colours: np.ndarray  # (K, 3) this class's shade of each ingredient
    seconds: np.ndarray  # (K, 3) and of its secondary colour
    piece_scale: float  # multiplies piece sizes
    texture_scale: float  # multiplies texture cell sizes
    coverage: float  # food radius as a fraction of the plate radius
    cells: float  # mean number of layout cells
    drizzle: float  # probability of a sauce drizzle
    name: str  # the two ingredients this class has most more of than the shared recipe


def _recipe_draw(rng: np.random.Generator) -> dict:
    """One random recipe (the shared one or a class's own), before mixing."""
    weights = rng.dirichlet(np.full(len(INGREDIENTS), 0.4))
    # Every plate needs a base: make sure a patch ingredient carries real weight.
    weights[rng.choice(np.flatnonzero(_PATCH))] += 0.35
    return {
        "weights": weights / weights.sum(),
        "colour_shift": rng.normal(0.0, 38.0, size=(len(INGREDIENTS), 3)),
        "piece_scale": rng.normal(0.0, 0.35),
        "texture_scale": rng.normal(0.0, 0.35),
        "coverage": rng.uniform(0.55, 0.85),
        "cells": rng.uniform(2.0, 9.0),
        "drizzle": rng.uniform(0.0, 1.0),
    }


@lru_cache(maxsize=4096)
def dish_recipe(seed: int, class_index: int, inter: float) -> Recipe:
    """The recipe of class ``class_index``: the shared recipe moved ``inter`` of the way to its own.

    >>> dish_recipe(0, 3, 0.5).weights.shape
    (13,)
    """
    shared = _recipe_draw(np.random.default_rng([_RECIPE_STREAM, seed]))
    own = _recipe_draw(np.random.default_rng([_RECIPE_STREAM, seed, class_index]))

    def mix(key):
        return (1.0 - inter) * np.asarray(shared[key]) + inter * np.asarray(own[key])

    weights = mix("weights")
    weights = weights / weights.sum()
    shift = inter * own["colour_shift"]  # the shared recipe keeps the pool colours
    # Name a class after what sets it apart: ingredients it has more of than the shared recipe.
    signature = np.argsort(-(own["weights"] - shared["weights"]), kind="stable")
    colours = np.clip(_COLOURS + shift, 0, 255).astype(np.float32)
    seconds = np.clip(_SECONDS + shift, 0, 255).astype(np.float32)
    for array in (weights, colours, seconds):
        array.setflags(write=False)  # recipes are cached and shared: keep them immutable
    return Recipe(
        weights=weights,
        colours=colours,
        seconds=seconds,
        piece_scale=math.exp(inter * own["piece_scale"]),
        texture_scale=math.exp(inter * own["texture_scale"]),
        coverage=float(mix("coverage")),
        cells=float(mix("cells")),
        drizzle=float(mix("drizzle")),
        name="_".join(INGREDIENTS[k].name for k in signature[:2]),
    )


def class_names(spec: DishesSpec) -> list[str]:
    """Folder names of the classes: ``dish_00_rice_tomato`` (index, then two signature ingredients).

    >>> class_names(DishesSpec(num_classes=2))[0].startswith("dish_00_")
    True
    """
    width = max(2, len(str(spec.num_classes - 1)))
    return [
        f"dish_{c:0{width}d}_{dish_recipe(spec.seed, c, spec.inter).name}"
        for c in range(spec.num_classes)
    ]


# ----------------------------------------------------------------------------------------------
# Rendering. Coordinates are normalised: the image spans [-1, 1] on both axes (y down). All
# per-pixel arrays are float32; scalars drawn from the generator are turned into Python floats
# first, because a numpy float64 scalar would silently promote every array to float64.
# ----------------------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    centres = (np.arange(size, dtype=np.float32) + 0.5) * np.float32(2.0 / size) - 1.0
    ys, xs = np.meshgrid(centres, centres, indexing="ij")  # (S, S) each
    return xs, ys


@lru_cache(maxsize=512)
def _upsample_matrix(size: int, cells: int) -> np.ndarray:
    """``(size, cells)`` linear-interpolation weights: ``M @ noise @ M.T`` upsamples a grid."""
    positions = (np.arange(size) + 0.5) * (cells - 1) / size
    low = np.minimum(positions.astype(int), cells - 2)
    frac = positions - low
    matrix = np.zeros((size, cells), dtype=np.float32)
    matrix[np.arange(size), low] = 1.0 - frac
    matrix[np.arange(size), low + 1] = frac
    return matrix * np.float32(1.25)  # interpolation shrinks the variance; bring it back to ~1


def _smooth_noise(rng: np.random.Generator, size: int, cells: float) -> np.ndarray:
    """``(size, size)`` smooth float32 noise with about ``cells`` blobs across the image, std ~1.

    Upsampling a coarse random grid by two small matrix products is the cheapest smooth noise
    numpy offers (no per-pixel Python, no FFT).
    """
    cells = int(min(max(round(cells), 2), size))
    matrix = _upsample_matrix(size, cells)
    coarse = rng.standard_normal((cells, cells), dtype=np.float32)
    return matrix @ coarse @ matrix.T


def _ramp(distance_inside: np.ndarray, pixel: float) -> np.ndarray:
    """Antialiased edge: 1 inside, 0 outside, linear over one pixel (``distance_inside`` > 0 inside)."""
    ramp = distance_inside * np.float32(1.0 / pixel)
    ramp += np.float32(0.5)
    return np.minimum(np.maximum(ramp, np.float32(0.0), out=ramp), np.float32(1.0), out=ramp)


def _over(canvas: np.ndarray, colour, alpha: np.ndarray) -> None:
    """Paint ``colour`` ((3,) or (S, S, 3)) over ``canvas`` (S, S, 3) with ``alpha`` (S, S), in place."""
    a = alpha[:, :, None]
    canvas += a * (colour - canvas)


def _rotated(xs, ys, cx: float, cy: float, angle: float):
    """Coordinates along and across a direction ``angle`` from the point ``(cx, cy)``."""
    c, s = np.float32(math.cos(angle)), np.float32(math.sin(angle))
    dx, dy = xs - np.float32(cx), ys - np.float32(cy)
    return dx * c + dy * s, dy * c - dx * s


def _colour(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def _table(rng, canvas, xs, ys, size, intra):
    pick = int(rng.integers(len(_TABLES))) if rng.random() < intra else 0
    colour, texture = _TABLES[pick]
    colour = _colour(colour) + _colour(intra * rng.normal(0, 14, 3))
    along, across = _rotated(xs, ys, 0.0, 0.0, rng.uniform(0, math.pi))
    if texture == "wood":
        tone = 1.0 + 0.12 * np.sin(along * np.float32(rng.uniform(9, 16)) + 2.5 * _smooth_noise(rng, size, 4))
    elif texture == "checker":
        frequency = np.float32(rng.uniform(3, 6))
        tone = np.where(np.sin(frequency * along) * np.sin(frequency * across) > 0, 1.0, 1.55).astype(np.float32)
    elif texture == "marble":
        tone = 1.0 - 0.08 * np.abs(np.sin(4 * along + 3 * _smooth_noise(rng, size, 3)))
    elif texture == "slate":
        tone = 1.0 + 0.10 * _smooth_noise(rng, size, size / 6)
    else:  # cloth: a fine weave
        tone = 1.0 + 0.05 * np.sin(along * np.float32(size * 0.9)) + 0.04 * _smooth_noise(rng, size, 5)
    np.multiply(colour, tone[:, :, None], out=canvas)


def _table_clutter(rng, canvas, xs, ys, size, intra, pixel):
    """Things on the table under the plate: napkins, cutlery, crumbs."""
    if rng.random() < 0.5 * intra:  # napkin: a rotated rectangle, often half under the plate
        cx, cy = rng.uniform(-1, 1), rng.uniform(-1, 1)
        along, across = _rotated(xs, ys, cx, cy, rng.uniform(0, math.pi))
        half_length, half_width = rng.uniform(0.3, 0.6), rng.uniform(0.3, 0.6)
        inside = np.minimum(half_length - np.abs(along), half_width - np.abs(across))
        _over(canvas, _colour(_NAPKINS[int(rng.integers(len(_NAPKINS)))]), _ramp(inside, pixel))
    for _ in range(int(rng.binomial(2, 0.6 * intra))):  # cutlery: a thin bar with a broader head
        cx, cy = rng.uniform(-0.9, 0.9), rng.uniform(-0.9, 0.9)
        along, across = _rotated(xs, ys, cx, cy, rng.uniform(0, math.pi))
        length = rng.uniform(0.5, 0.8)
        width = np.where(along > 0.55 * length, np.float32(0.07), np.float32(0.03))
        inside = np.minimum(length - np.abs(along), width - np.abs(across))
        shine = np.float32(rng.uniform(150, 215)) * (1.0 + 0.25 * np.cos(across * np.float32(40)))
        _over(canvas, shine[:, :, None], _ramp(inside, pixel))
    crumbs = int(rng.poisson(10 * intra))
    if crumbs:
        cells = rng.integers(0, size * size, crumbs)
        flat = canvas.reshape(-1, 3)
        flat[cells] = flat[cells] * np.float32(0.55) + _colour([90, 76, 54])


def render_dish(spec: DishesSpec, class_index: int, image_index: int) -> np.ndarray:
    """Render image ``image_index`` of class ``class_index``.

    The result depends only on ``(spec.seed, class_index, image_index)``, the class recipe
    (``spec.seed``, ``class_index``, ``spec.inter``), ``spec.intra`` and ``spec.image_size``.

    Args:
        spec: dataset spec (seed, knobs, image size).
        class_index: class in ``[0, spec.num_classes)``.
        image_index: any non-negative integer (written datasets use the split offsets).

    Returns:
        ``(S, S, 3)`` uint8 RGB array, ``S = spec.image_size``.

    >>> img = render_dish(DishesSpec(), 0, 0)
    >>> img.shape, img.dtype
    ((64, 64, 3), dtype('uint8'))
    """
    if not 0 <= class_index < spec.num_classes:
        raise ValueError(f"class_index must be in [0, {spec.num_classes}), got {class_index}")
    if image_index < 0:
        raise ValueError(f"image_index must be >= 0, got {image_index}")
    recipe = dish_recipe(spec.seed, class_index, spec.inter)
    rng = np.random.default_rng([spec.seed, class_index, image_index])
    size, intra = spec.image_size, spec.intra
    xs, ys = _grid(size)
    canvas = np.empty((size, size, 3), np.float32)
    image_pixel = 2.0 / size

    # --- the table, and what lies on it under the plate
    _table(rng, canvas, xs, ys, size, intra)
    _table_clutter(rng, canvas, xs, ys, size, intra, image_pixel)

    # --- plate pose: centre, radius (also the crop: big plates run off the frame), rotation, tilt
    cx = min(max(rng.normal(0, 0.25 * intra), -0.5), 0.5)
    cy = min(max(rng.normal(0, 0.25 * intra), -0.5), 0.5)
    radius = 0.78 * math.exp(rng.normal(0, 0.22 * intra))
    rotation = rng.uniform(-math.pi, math.pi) * intra
    tilt = 1.0 - 0.3 * intra * rng.random()  # seen from an angle: the plate is an ellipse
    u, v = _rotated(xs, (ys - np.float32(cy)) * np.float32(1.0 / tilt), cx, 0.0, rotation)
    u *= np.float32(1.0 / radius)  # plate coordinates: the rim is at distance 1
    v *= np.float32(1.0 / radius)
    dist = np.sqrt(u * u + v * v)
    pixel = image_pixel / radius  # one pixel in plate units
    light_angle = rng.uniform(-math.pi, math.pi)
    light_u, light_v = math.cos(light_angle), math.sin(light_angle)

    # --- plate: a soft shadow away from the light, then the plate with a rim
    shadow_dist = np.sqrt((u - np.float32(0.06 * light_u)) ** 2 + (v - np.float32(0.06 * light_v)) ** 2)
    canvas *= (1.0 - 0.35 * np.clip((1.08 - shadow_dist) * np.float32(1 / 0.15), 0, 1))[:, :, None]
    plate = _colour(_PLATES[int(rng.integers(len(_PLATES))) if rng.random() < 0.4 * intra else 0])
    rim = np.where((dist > 0.8) & (dist < 0.84), np.float32(0.85), np.float32(1.0))
    rim -= np.clip(dist - 0.84, 0, 1) * np.float32(0.06 / 0.16)
    _over(canvas, plate * rim[:, :, None], _ramp(1.0 - dist, pixel))

    # --- food: ingredient proportions and shades for this plate, sampled around the recipe
    concentration = 80.0 * (1.0 - intra) + 12.0
    weights = rng.dirichlet(recipe.weights * concentration + 1e-3)
    jitter = _colour((intra * 10.0) * rng.standard_normal((len(INGREDIENTS), 3)))
    colours, seconds = recipe.colours + jitter, recipe.seconds + jitter
    coverage = recipe.coverage * math.exp(rng.normal(0, 0.08 * intra))
    uw = u + 0.10 * _smooth_noise(rng, size, 4)  # warped plate coordinates: ragged outlines
    vw = v + 0.10 * _smooth_noise(rng, size, 4)
    food_alpha = _ramp(coverage - np.sqrt(uw * uw + vw * vw), pixel)  # (S, S)
    food = np.empty((size, size, 3), np.float32)

    # base layer: cells around random seed points (a warped Voronoi layout), one patch ingredient each
    patch_weights = np.where(_PATCH, weights, 0.0)
    cells = max(1, int(rng.poisson(recipe.cells)))
    seed_radius = coverage * np.sqrt(rng.random(cells))
    seed_angle = rng.uniform(-math.pi, math.pi, cells)
    seed_u = _colour(seed_radius * np.cos(seed_angle))[:, None, None]
    seed_v = _colour(seed_radius * np.sin(seed_angle))[:, None, None]
    seed_ingredient = rng.choice(len(INGREDIENTS), size=cells, p=patch_weights / patch_weights.sum())
    cell_of_pixel = np.argmin((uw - seed_u) ** 2 + (vw - seed_v) ** 2, axis=0)  # (S, S)
    ingredient_of_pixel = seed_ingredient[cell_of_pixel]
    for k in np.unique(seed_ingredient):
        texture = _patch_texture(rng, INGREDIENTS[k], colours[k], seconds[k], recipe, u, v, radius, size)
        np.copyto(food, texture, where=(ingredient_of_pixel == k)[:, :, None])

    # pieces on top, in a fixed ingredient order
    for k, ingredient in enumerate(INGREDIENTS):
        if ingredient.kind == "patch":
            continue
        count = int(rng.poisson(_PIECES_PER_WEIGHT * weights[k]))
        if count == 0:
            continue
        if ingredient.kind == "sprinkle":
            _sprinkle(rng, food, food_alpha, colours[k], seconds[k], 6 * count)
        else:
            coords = (u, v, uw, vw)
            _pieces(rng, food, food_alpha, ingredient, colours[k], seconds[k], count, recipe, coords, coverage, pixel)

    if rng.random() < recipe.drizzle:  # a sauce drizzle: a wavy line across the food
        phase, frequency = rng.uniform(0, 2 * math.pi), rng.uniform(5, 10)
        amplitude, offset = rng.uniform(0.1, 0.3), rng.uniform(-0.3, 0.3)
        line = np.abs(v - np.float32(offset) - np.float32(amplitude) * np.sin(np.float32(frequency) * u + np.float32(phase)))
        _over(food, recipe.colours[_SAUCE] * 0.8, _ramp(0.035 - line, pixel) * (food_alpha > 0.5))

    # a glossy highlight towards the light, then the food onto the plate
    gloss = 1.0 - ((u - np.float32(0.3 * light_u)) ** 2 + (v - np.float32(0.3 * light_v)) ** 2) * np.float32(5.0)
    food *= (1.0 + 0.12 * np.clip(gloss, 0, 1))[:, :, None]
    _over(canvas, food, food_alpha)

    # --- clutter above the table: the rim of a glass in a corner
    if rng.random() < 0.4 * intra:
        gx = math.copysign(rng.uniform(0.7, 1.0), rng.random() - 0.5)
        gy = math.copysign(rng.uniform(0.7, 1.0), rng.random() - 0.5)
        glass_radius = np.float32(rng.uniform(0.25, 0.4))
        ring = np.abs(np.sqrt((xs - np.float32(gx)) ** 2 + (ys - np.float32(gy)) ** 2) - glass_radius)
        _over(canvas, np.float32(235.0), 0.6 * _ramp(0.025 - ring, image_pixel))

    # --- lighting: brightness, colour cast, directional falloff
    gain = _colour(math.exp(rng.normal(0, 0.22 * intra)) * (1.0 + rng.normal(0, 0.07 * intra, 3)))
    falloff = 1.0 + np.float32(0.25 * intra * rng.random()) * (xs * np.float32(light_u) + ys * np.float32(light_v))
    canvas *= falloff[:, :, None] * gain

    # --- camera: a slight blur (antialiases hard piece edges), then sensor noise
    image = Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8)).filter(_CAMERA_BLUR)
    # Uniform noise with the wanted standard deviation: a third of the cost of Gaussian draws.
    spread = np.float32((2.0 + 5.0 * intra) * math.sqrt(12.0))
    noise = (rng.random(canvas.shape, dtype=np.float32) - np.float32(0.5)) * spread
    return np.clip(np.asarray(image, dtype=np.float32) + noise + 0.5, 0, 255).astype(np.uint8)


def _patch_texture(rng, ingredient, colour, second, recipe, u, v, radius, size):
    """``(S, S, 3)`` colour field of a patch ingredient over the whole image."""
    cell = ingredient.size * recipe.texture_scale * radius  # texture cell, in image half-widths
    blobs = max(2.0, 2.0 / cell)  # noise cells across the image
    if ingredient.texture == "grains":  # bright grains with darker gaps
        mix = np.clip(0.5 + 0.9 * _smooth_noise(rng, size, blobs), 0, 1)[:, :, None]
        return (colour + mix * (second - colour)) * (0.82 + 0.18 * mix)
    if ingredient.texture == "strands":  # wavy parallel strands
        along, _ = _rotated(u, v, 0.0, 0.0, rng.uniform(0, math.pi))
        phase = 3.0 * _smooth_noise(rng, size, 3)
        wave = np.sin(along * np.float32(2.0 / (ingredient.size * recipe.texture_scale)) + phase)
        mix = np.clip(0.5 + 0.7 * wave, 0, 1)[:, :, None]
        return (colour + mix * (second - colour)) * (0.85 + 0.15 * mix)
    if ingredient.texture == "leafy":  # two-tone leaves
        mix = np.clip(0.5 + 1.5 * _smooth_noise(rng, size, blobs), 0, 1)[:, :, None]
        return colour * 0.8 + mix * (second - colour * 0.8)
    shade = 1.0 + 0.07 * _smooth_noise(rng, size, 3)  # smooth sauces: gentle shading
    return colour * shade[:, :, None]


def _pieces(rng, food, food_alpha, ingredient, colour, second, count, recipe, coords, coverage, pixel):
    """Draw ``count`` pieces of one ingredient onto ``food`` (S, S, 3) where the food lies."""
    u, v, uw, vw = coords
    radius = ingredient.size * recipe.piece_scale * np.exp(rng.normal(0, 0.15, count))  # (n,)
    where = coverage * 0.9 * np.sqrt(rng.random(count))
    angle = rng.uniform(-math.pi, math.pi, count)
    pu = _colour(where * np.cos(angle))[:, None, None]
    pv = _colour(where * np.sin(angle))[:, None, None]
    inverse_radius = _colour(1.0 / radius)[:, None, None]
    if ingredient.kind == "strip":  # sticks four times longer than wide
        turn = rng.uniform(0, math.pi, count)
        c, s = _colour(np.cos(turn))[:, None, None], _colour(np.sin(turn))[:, None, None]
        du, dv = u - pu, v - pv  # (n, S, S)
        along, across = np.abs(du * c + dv * s), np.abs(dv * c - du * s)
        nearest = (np.maximum(along, 4.0 * across) * inverse_radius).min(axis=0)
    else:  # discs; blobs use the warped coordinates, which make ragged outlines
        pieces_u, pieces_v = (uw, vw) if ingredient.kind == "blob" else (u, v)
        squared = ((pieces_u - pu) ** 2 + (pieces_v - pv) ** 2) * (inverse_radius * inverse_radius)
        nearest = np.sqrt(squared.min(axis=0))  # one square root per pixel, not per piece
    # nearest: (S, S), 0 at a piece centre, 1 at its edge
    alpha = _ramp(1.0 - nearest, pixel / float(radius.mean())) * (food_alpha > 0.2)
    shadow = np.zeros_like(alpha)  # a one-pixel drop shadow down and right
    shadow[1:, 1:] = alpha[:-1, :-1]
    food *= (1.0 - 0.35 * shadow * (1.0 - alpha))[:, :, None]
    if ingredient.name == "egg":  # white with a yolk
        look = np.where((nearest < 0.45)[:, :, None], second, colour)
    elif ingredient.kind == "disc":  # slices: a rim, then lighter flesh with rings
        look = np.where((nearest > 0.75)[:, :, None], colour, second) * (0.9 + 0.1 * np.cos(nearest * 9.0))[:, :, None]
    elif ingredient.kind == "blob":  # seared edges
        look = colour * (1.0 - np.clip(nearest - 0.6, 0, 1) * np.float32(0.35 / 0.4))[:, :, None]
    else:
        look = colour * (0.9 + 0.1 * np.cos(nearest * 6.0))[:, :, None]
    _over(food, look, alpha)


def _sprinkle(rng, food, food_alpha, colour, second, count):
    """Scatter ``count`` two-pixel dots (grated cheese, chopped herbs) over the food."""
    size = food.shape[0]
    rows, cols = rng.integers(0, size, count), rng.integers(0, size, count)
    keep = food_alpha[rows, cols] > 0.5
    rows, cols = rows[keep], cols[keep]
    food[rows, cols] = colour
    food[np.minimum(rows + 1, size - 1), cols] = second

# ----------------------------------------------------------------------------------------------
# Writing an ImageFolder
# ----------------------------------------------------------------------------------------------
def default_dishes_root(spec: DishesSpec | None = None) -> Path:
    """Where :func:`write_dishes` puts a spec by default: ``<cache>/dishes-<hash of spec>``.

    ``<cache>``: :func:`foodlib.files.cache_folder` (``$FOODLIB_CACHE``, else ``~/.cache/foodlib``).

    >>> default_dishes_root(DishesSpec()).name.startswith("dishes-")
    True
    """
    spec = spec or DishesSpec()
    return cache_folder() / f"dishes-{spec.digest()}"


def read_marker(root: str | os.PathLike) -> dict | None:
    """The spec stored in ``root/dishes.json``, or None when absent or unreadable."""
    try:
        return json.loads((Path(root) / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def write_dishes(root: str | os.PathLike, spec: DishesSpec | None = None, progress: bool = True) -> Path:
    """Write the dataset of ``spec`` as an ImageFolder of PNGs under ``root``, once.

    Layout: ``root/train/<class>/<i>.png``, ``root/val/...`` when ``val_per_class > 0``,
    ``root/test/...``, and ``root/dishes.json`` (the spec). When the marker already records the
    same spec (and generator version) the call returns at once. Otherwise the dataset is written
    into a temporary sibling folder and swapped in, so a folder never mixes two specs and an
    interrupted write leaves nothing half-done behind.

    Args:
        root: dataset folder; created if missing. An existing folder that holds anything besides
            a dishes dataset is refused rather than deleted.
        spec: what to write (defaults to :class:`DishesSpec`).
        progress: show a tqdm progress bar.

    Returns:
        ``root`` as a Path.

    >>> root = write_dishes("/tmp/dishes", DishesSpec(train_per_class=20, test_per_class=5))  # doctest: +SKIP
    """
    spec = spec or DishesSpec()
    root = Path(root)
    if read_marker(root) == spec.to_dict():
        return root
    check_replaceable(root, MARKER_NAME, "dishes", SPLITS)

    names = class_names(spec)
    counts = {"train": spec.train_per_class, "val": spec.val_per_class, "test": spec.test_per_class}
    offsets = {"train": 0, "val": VAL_INDEX_OFFSET, "test": TEST_INDEX_OFFSET}
    jobs = [
        (split, c, i)
        for split in SPLITS
        for c in range(spec.num_classes)
        for i in range(counts[split])
    ]
    from tqdm import tqdm  # text bars: saved in executed notebooks, unlike widgets

    building = building_dir(root)
    try:
        for split in SPLITS:
            for name in names if counts[split] else []:
                (building / split / name).mkdir(parents=True, exist_ok=True)
        for split, c, i in tqdm(jobs, desc=f"dishes -> {root.name}", disable=not progress, unit="img"):
            pixels = render_dish(spec, c, offsets[split] + i)
            Image.fromarray(pixels).save(building / split / names[c] / f"{i:05d}.png", compress_level=1)
        (building / MARKER_NAME).write_text(json.dumps(spec.to_dict(), indent=2, sort_keys=True) + "\n")
        swap_in(building, root, MARKER_NAME, spec.to_dict())
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return root
