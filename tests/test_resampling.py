"""A run resamples the way its backbone's weights were trained (bilinear, or bicubic for most timm
weights): decode, decoded-cache key, augmentation crop, trunk-cache key, resume, load_run, export."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from foodlib.config import Config
from foodlib.data import load_data
from foodlib.data.augment import normalization, train_transform
from foodlib.data.cache import build_cache, cache_key, list_caches
from foodlib.data.images import load_image_array, resize_short_side_center_crop
from foodlib.data.loader import ImageSource
from foodlib.models import _resampling, backbone_preprocessing, create_model

timm = pytest.importorskip("timm")

TIMM_BICUBIC = "timm/resnet10t"  # timm's data config: bicubic, ImageNet mean/std; small, built untrained here


def _photos(folder, n=4, shape=(30, 40), seed=0) -> list[str]:
    """Random-noise photos: every resampling gives different pixels on them."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


# ----- the backbone decides ------------------------------------------------------------------------

def test_backbones_name_their_weights_resampling():
    assert backbone_preprocessing(TIMM_BICUBIC).interpolation == "bicubic"
    assert create_model(TIMM_BICUBIC).preprocessing.interpolation == "bicubic"  # pretrained=False: no download
    assert normalization(create_model(TIMM_BICUBIC))["interpolation"] == "bicubic"
    for name in ("smallcnn", "resnet18"):
        assert backbone_preprocessing(name).interpolation == "bilinear"
    assert normalization(object())["interpolation"] == "bilinear"  # a model without a preprocessing record


def test_timm_resampling_names_map_or_are_refused():
    assert _resampling("timm/x", "bicubic") == "bicubic"
    assert _resampling("timm/x", "") == "bilinear" and _resampling("timm/x", None) == "bilinear"
    assert _resampling("timm/x", "random") == "bilinear"
    with pytest.raises(ValueError, match="'timm/x'.*'lanczos'"):
        _resampling("timm/x", "lanczos")


# ----- decode and decoded cache ---------------------------------------------------------------------

def test_bicubic_decode_is_pillows_bicubic_resize():
    rng = np.random.default_rng(1)
    square = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))  # square: no crop; 40 -> 16 < 3x
    bicubic = resize_short_side_center_crop(square, 16, "bicubic")
    assert np.array_equal(bicubic, np.asarray(square.resize((16, 16), Image.Resampling.BICUBIC)))
    bilinear = resize_short_side_center_crop(square, 16)
    assert np.array_equal(bilinear, np.asarray(square.resize((16, 16), Image.Resampling.BILINEAR)))
    assert not np.array_equal(bicubic, bilinear)
    with pytest.raises(ValueError, match="'nearest'"):
        resize_short_side_center_crop(square, 16, "nearest")


def test_bilinear_cache_key_is_the_one_older_foodlib_wrote(tmp_path):
    """Existing bilinear caches stay valid: the key is hashed exactly as before the resampling joined it."""
    paths = _photos(tmp_path / "p")
    digest = hashlib.sha1(b"v1:8\n")
    for path in paths:
        st = os.stat(path)
        digest.update(f"{path}\t{st.st_size}\t{st.st_mtime_ns}\t{st.st_ctime_ns}\n".encode())
    assert cache_key(paths, 8) == cache_key(paths, 8, "bilinear") == digest.hexdigest()[:20]
    assert cache_key(paths, 8, "bicubic") != cache_key(paths, 8)


def test_bicubic_cache_holds_bicubic_pixels_and_is_never_the_bilinear_one(tmp_path):
    paths = _photos(tmp_path / "p")
    bilinear = build_cache(paths, 12, tmp_path / "cache", progress=False)
    bicubic = build_cache(paths, 12, tmp_path / "cache", progress=False, interpolation="bicubic")
    assert bicubic.file != bilinear.file
    for row, path in enumerate(paths):
        assert np.array_equal(bicubic.array[row], load_image_array(path, 12, "bicubic"))
        assert np.array_equal(bilinear.array[row], load_image_array(path, 12))
    assert not np.array_equal(np.asarray(bicubic.array), np.asarray(bilinear.array))
    assert build_cache(paths, 12, tmp_path / "cache", progress=False, interpolation="bicubic").file == bicubic.file
    assert {e.state for e in list_caches(tmp_path / "cache")} == {"current"}  # the listing reads the resampling back
    uncached = ImageSource(paths, 12, interpolation="bicubic")
    assert np.array_equal(uncached.get_batch(np.arange(len(paths))), np.asarray(bicubic.array))


def test_load_data_decodes_with_the_backbones_resampling(tmp_path):
    root = tmp_path / "data"
    for seed, (split, cls, n) in enumerate([("train", "a", 3), ("train", "b", 3), ("test", "a", 2), ("test", "b", 2)]):
        _photos(root / split / cls, n=n, seed=seed)
    common = dict(data=str(root), image_size=16, val_fraction=0.0, cache_dir=str(tmp_path / "cache"))
    timm_data = load_data(Config.from_flat(backbone=TIMM_BICUBIC, **common), progress=False)
    plain_data = load_data(Config.from_flat(backbone="smallcnn", **common), progress=False)
    assert timm_data.interpolation == "bicubic" and plain_data.interpolation == "bilinear"
    source = timm_data.sources["train"]
    rows = np.arange(len(source))
    expected = np.stack([load_image_array(p, timm_data.side, "bicubic") for p in source.paths])
    assert np.array_equal(source.get_batch(rows), expected)
    assert not np.array_equal(plain_data.sources["train"].get_batch(rows), expected)


# ----- augmentation and the trunk cache -------------------------------------------------------------

def test_bicubic_random_crop_differs_from_bilinear_and_stays_in_range():
    images = torch.randint(0, 256, (4, 37, 37, 3), dtype=torch.uint8)
    draw = lambda mode: train_transform(images, 32, torch.Generator().manual_seed(0), interpolation=mode,  # noqa: E731
                                        mean=(0, 0, 0), std=(1 / 255,) * 3)  # identity normalisation: 0..255 values
    bilinear, bicubic = draw("bilinear"), draw("bicubic")
    assert torch.equal(bilinear, train_transform(images, 32, torch.Generator().manual_seed(0), mean=(0, 0, 0),
                                                 std=(1 / 255,) * 3))  # the default is bilinear
    assert not torch.allclose(bicubic, bilinear, atol=1.0)
    assert bicubic.min() >= -1e-3 and bicubic.max() <= 255 + 1e-3  # cubic overshoot clamped
    with pytest.raises(ValueError, match="'nearest'"):
        train_transform(images, 32, interpolation="nearest")


def test_trunk_key_keeps_bilinear_keys_and_separates_bicubic(tmp_path):
    import foodlib.trunk_cache as tc

    paths = _photos(tmp_path / "p")
    source = ImageSource(paths, 12, build_cache(paths, 12, tmp_path / "cache", progress=False))
    args = (source, "w", 10, (0.5,) * 3, (0.5,) * 3, "standard", 2, None)
    assert tc.trunk_key(*args) == tc.trunk_key(*args, "bilinear")
    assert tc.trunk_key(*args, "bicubic") != tc.trunk_key(*args)
    uncached_bilinear, uncached_bicubic = ImageSource(paths, 12), ImageSource(paths, 12, interpolation="bicubic")
    assert tc._content_key(uncached_bilinear) != tc._content_key(uncached_bicubic)


# ----- resume, load_run, export ---------------------------------------------------------------------

def _checkpoint(tmp_path, cfg, interpolation=None) -> Path:
    from foodlib.train import CHECKPOINT_FORMAT, build_model_and_loss

    model, loss = build_model_and_loss(cfg, 2)
    ckpt = {"format": CHECKPOINT_FORMAT, "config": cfg.to_dict(), "classes": ["a", "b"], "model": model.state_dict(),
            "loss": loss.state_dict(), "epoch": 1, "optimizer": {}, "scaler": {}, "center_optimizer": None,
            "best_top1": 0.5, "best_epoch": 1, "trace": []}
    if interpolation is not None:
        ckpt["interpolation"] = interpolation
    path = tmp_path / "last.pt"
    torch.save(ckpt, path)
    return path


def test_an_older_bilinear_checkpoint_loads_bilinear_and_refuses_a_bicubic_resume(tmp_path):
    from foodlib.train import CheckpointError, load_run, read_resume_checkpoint

    cfg = Config.from_flat(backbone=TIMM_BICUBIC, embedding_dim=4, image_size=32)
    path = _checkpoint(tmp_path, cfg)  # written before foodlib recorded the resampling: its run decoded bilinear
    model = load_run(tmp_path, "last.pt")[0]
    assert model.preprocessing.interpolation == "bilinear"
    assert model.preprocessing.mean == backbone_preprocessing(TIMM_BICUBIC).mean  # only the resampling is the run's
    with pytest.raises(CheckpointError, match="bilinear.*bicubic"):
        read_resume_checkpoint(path, cfg)
    path = _checkpoint(tmp_path, cfg, "bicubic")
    assert load_run(tmp_path, "last.pt")[0].preprocessing.interpolation == "bicubic"
    assert read_resume_checkpoint(path, cfg)["interpolation"] == "bicubic"


def test_export_metadata_names_the_resampling_used(tmp_path):
    from foodlib.inference import InferenceRun, export_metadata
    from foodlib.losses import create_loss

    cfg = Config.from_flat(backbone=TIMM_BICUBIC, embedding_dim=4, image_size=32)
    run = InferenceRun(tmp_path, create_model(TIMM_BICUBIC, 4), create_loss("softmax", embedding_dim=4, num_classes=2),
                       cfg, ["a", "b"], torch.device("cpu"))
    assert run.interpolation == "bicubic"
    pre = json.loads(export_metadata(run)["preprocessing.json"])
    assert pre["interpolation"] == "bicubic" and "(bicubic, antialiased)" in pre["resize"]
    assert pre["weights_interpolation"] == "bicubic"
    run.model = create_model("smallcnn", 4)
    pre = json.loads(export_metadata(run)["preprocessing.json"])
    assert pre["interpolation"] == "bilinear" and "(bilinear, antialiased)" in pre["resize"]
