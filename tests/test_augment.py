"""Batch augmentation on tensors (foodlib.data.augment), and bf16 autocast training on the CPU.

Expected values are recomputed by hand on tiny images: the ImageNet normalisation of known
pixels, a mirror image, a bilinear resize.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from foodlib.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    augment_options,
    cache_side,
    eval_transform,
    train_transform,
)


def by_hand_normalise(pixels_nhwc: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) with (v / 255 - mean) / std per channel."""
    x = pixels_nhwc.permute(0, 3, 1, 2).double() / 255.0
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    return ((x - mean) / std).float()


def random_images(n=4, side=12, seed=0) -> torch.Tensor:
    return torch.randint(0, 256, (n, side, side, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def horizontal_ramp(n=6, side=8) -> torch.Tensor:
    """Images whose value grows with the column (0, step, 2 step, ... <= 255): left and right differ."""
    columns = (torch.arange(side) * (255 // (side - 1))).to(torch.uint8)  # (side,)
    return columns.view(1, 1, side, 1).expand(n, side, side, 3).contiguous()


# ----- sizes -------------------------------------------------------------------------------------

@pytest.mark.parametrize("image_size, stored", [(64, 73), (112, 128), (224, 256), (32, 37)])
def test_cache_side_is_image_size_over_0875(image_size, stored):
    assert cache_side(image_size) == stored  # round(image_size / 0.875), by hand


# ----- eval_transform ----------------------------------------------------------------------------

def test_eval_transform_is_the_normalised_center_crop():
    images = random_images(n=2, side=6)
    out = eval_transform(images, 4, channels_last=False)
    expected = by_hand_normalise(images[:, 1:5, 1:5, :])  # (6 - 4) // 2 = 1 pixel off each side
    assert out.shape == (2, 3, 4, 4) and out.dtype == torch.float32
    assert torch.allclose(out, expected, atol=1e-5)


def test_eval_transform_odd_margin_takes_the_floor():
    images = random_images(n=1, side=7)
    expected = by_hand_normalise(images[:, 1:5, 1:5, :])  # (7 - 4) // 2 = 1
    assert torch.allclose(eval_transform(images, 4), expected, atol=1e-5)


@pytest.mark.parametrize("channels_last", [True, False])
def test_layouts_hold_the_same_values(channels_last):
    images = random_images()
    for out in (eval_transform(images, 8, channels_last=channels_last),
                train_transform(images, 8, torch.Generator().manual_seed(3), channels_last=channels_last)):
        assert out.shape == (4, 3, 8, 8) and out.dtype == torch.float32
        if channels_last:
            assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
        else:
            assert out.is_contiguous()
    generator_a, generator_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(train_transform(images, 8, generator_a, channels_last=True),
                       train_transform(images, 8, generator_b, channels_last=False))
    assert torch.equal(eval_transform(images, 8, channels_last=True), eval_transform(images, 8, channels_last=False))


def test_eval_transform_refuses_a_crop_larger_than_the_stored_side():
    with pytest.raises(ValueError, match="smaller than the crop 16; rebuild the cache"):
        eval_transform(random_images(side=12), 16)


def test_transforms_refuse_non_nhwc_batches():
    nchw = random_images().permute(0, 3, 1, 2)  # (N, 3, S, S): the wrong layout
    with pytest.raises(ValueError, match=r"expected uint8 images \(N, S, S, 3\)"):
        eval_transform(nchw, 8)
    with pytest.raises(ValueError, match=r"expected uint8 images \(N, S, S, 3\)"):
        train_transform(nchw, 8)


# ----- train_transform: geometry -------------------------------------------------------------------

def test_same_generator_seed_gives_the_same_batch_and_another_seed_another():
    images = random_images(n=8, side=16)
    first = train_transform(images, 12, torch.Generator().manual_seed(7), color_jitter=0.3)
    again = train_transform(images, 12, torch.Generator().manual_seed(7), color_jitter=0.3)
    other = train_transform(images, 12, torch.Generator().manual_seed(8), color_jitter=0.3)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_successive_batches_from_one_generator_differ():
    images = random_images(n=8, side=16)
    generator = torch.Generator().manual_seed(0)
    assert not torch.allclose(train_transform(images, 12, generator), train_transform(images, 12, generator))


def test_full_crop_without_flip_at_the_stored_size_is_the_eval_transform():
    # scale=(1, 1) and ratio=(1, 1) crop the whole image; at output side == stored side every
    # output pixel centre falls on an input pixel centre, so bilinear sampling returns the pixel.
    images = random_images(n=3, side=9)
    out = train_transform(images, 9, torch.Generator().manual_seed(0), scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
    assert torch.allclose(out, by_hand_normalise(images), atol=1e-5)


@pytest.mark.parametrize("side, size", [(16, 12), (12, 16), (128, 112)])
def test_full_crop_without_flip_reproduces_a_resize_of_the_full_image(side, size):
    images = random_images(n=3, side=side)
    out = train_transform(images, size, torch.Generator().manual_seed(0), scale=(1.0, 1.0), ratio=(1.0, 1.0),
                          flip=False, channels_last=False)
    resized = F.interpolate(images.permute(0, 3, 1, 2).double(), size=(size, size), mode="bilinear",
                            align_corners=False)  # (N, 3, size, size), 0..255
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    expected = ((resized / 255.0 - mean) / std).float()
    assert torch.allclose(out, expected, atol=1e-4)


def test_crop_false_keeps_the_full_image_whatever_the_scale():
    images = random_images(n=3, side=16)
    kept = train_transform(images, 12, torch.Generator().manual_seed(0), crop=False, flip=False, scale=(0.1, 0.2))
    full = train_transform(images, 12, torch.Generator().manual_seed(0), scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
    assert torch.allclose(kept, full, atol=1e-6)


def test_flip_mirrors_a_horizontally_asymmetric_image():
    images = horizontal_ramp(n=32, side=8)
    as_is = by_hand_normalise(images)  # (32, 3, 8, 8), increasing along the width
    mirrored = as_is.flip(-1)
    out = train_transform(images, 8, torch.Generator().manual_seed(1), scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=True)
    flipped = [bool(torch.allclose(o, m, atol=1e-5)) for o, m in zip(out, mirrored)]
    unflipped = [bool(torch.allclose(o, a, atol=1e-5)) for o, a in zip(out, as_is)]
    assert all(f != u for f, u in zip(flipped, unflipped))  # every image is exactly one of the two
    assert 4 <= sum(flipped) <= 28  # a fair coin per image; 32 equal outcomes would have p = 2^-31
    never = train_transform(images, 8, torch.Generator().manual_seed(1), scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
    assert torch.allclose(never, as_is, atol=1e-5)


def test_random_crops_keep_the_image_orientation_unless_flipped():
    # On a left-to-right ramp every crop, whatever its size and place, must still increase from
    # left to right (or decrease, when flipped); a transposed or mirrored grid would break this.
    images = horizontal_ramp(n=16, side=32)
    out = train_transform(images, 16, torch.Generator().manual_seed(2), flip=False, channels_last=False)
    steps = out[:, 0, :, 1:] - out[:, 0, :, :-1]  # (N, H, W - 1) differences along the width
    assert (steps >= -1e-5).all() and (steps.sum(dim=(1, 2)) > 0).all()
    rows_equal = out[:, :, 1:, :] - out[:, :, :-1, :]  # no change along the height
    assert rows_equal.abs().max() < 1e-5
    flipped = train_transform(images, 16, torch.Generator().manual_seed(2), flip=True, channels_last=False)
    direction = torch.sign((flipped[:, 0, :, -1] - flipped[:, 0, :, 0]).mean(dim=1))  # (N,) +1 / -1
    assert set(direction.tolist()) == {1.0, -1.0}


def test_crops_stay_inside_the_value_range_of_the_image():
    # Bilinear sampling inside the image can only mix existing values: a constant image stays constant.
    images = torch.full((4, 20, 20, 3), 200, dtype=torch.uint8)
    out = train_transform(images, 12, torch.Generator().manual_seed(0), scale=(0.1, 1.0))
    assert torch.allclose(out, by_hand_normalise(torch.full((4, 12, 12, 3), 200, dtype=torch.uint8)), atol=1e-5)


# ----- train_transform: colour -------------------------------------------------------------------

def test_colour_jitter_on_a_flat_grey_image_only_changes_brightness():
    # Contrast pulls pixels toward the image mean and saturation toward grey: both are no-ops on a
    # flat grey image, so each output is flat and grey at value 128 * brightness, brightness in [0.7, 1.3].
    images = torch.full((16, 10, 10, 3), 128, dtype=torch.uint8)
    out = train_transform(images, 8, torch.Generator().manual_seed(0), color_jitter=0.3, channels_last=False)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    pixel_values = (out * std + mean) * 255.0  # back to 0..255, (N, 3, 8, 8)
    per_image = pixel_values.flatten(1)  # (N, 192)
    assert (per_image.max(dim=1).values - per_image.min(dim=1).values).max() < 1e-3  # flat and grey
    brightness = per_image[:, 0] / 128.0
    assert (brightness >= 0.7 - 1e-4).all() and (brightness <= 1.3 + 1e-4).all()
    assert brightness.std() > 0.01  # drawn per image


def test_colour_jitter_keeps_the_geometry_of_the_same_seed():
    # Jitter draws come after the crop and flip draws, so the same seed crops the same way with or
    # without jitter. On a grey image (R = G = B, saturation is a no-op) brightness b and contrast c
    # around the image mean m map each pixel p to b*c*p + b*m*(1 - c): per image, the jittered
    # pixels are an exact affine function of the plain ones. Values 60..150 never reach the clamp.
    columns = torch.linspace(60, 150, 12).round().to(torch.uint8)  # (12,)
    images = columns.view(1, 1, 12, 1).expand(6, 12, 12, 3).contiguous()
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    to_pixels = lambda out: ((out * std + mean) * 255.0)[:, 0].flatten(1).double()  # noqa: E731  (N, H*W)
    plain = to_pixels(train_transform(images, 8, torch.Generator().manual_seed(5), channels_last=False))
    jittered = to_pixels(train_transform(images, 8, torch.Generator().manual_seed(5), color_jitter=0.2,
                                         channels_last=False))
    for p, q in zip(plain, jittered):
        design = torch.stack([p, torch.ones_like(p)], dim=1)  # (H*W, 2): fit q = a * p + b
        solution = torch.linalg.lstsq(design, q[:, None]).solution
        assert (design @ solution - q[:, None]).abs().max() < 1e-2
        assert abs(float(solution[0]) - 1.0) > 1e-3  # and the jitter did change the pixels


def test_augment_options_names_and_error():
    assert augment_options("none") == dict(crop=False, flip=False)
    assert augment_options("strong")["color_jitter"] > 0
    with pytest.raises(ValueError, match=r"augment='heavy' is not valid; choose one of \['flip', 'none'"):
        augment_options("heavy")


# ----- mixed precision: a short fit() in bf16 on the CPU ------------------------------------------

def write_tiny_image_folder(root, classes=2, per_class=12, side=20):
    """An ImageFolder of small PNGs (dark vs bright classes): fit() runs on it in a second or two."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / "train" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 128, (side, side, 3)) + 127 * c  # (side, side, 3)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


def test_bf16_autocast_training_runs_on_cpu_with_float32_loss_math(tmp_path, monkeypatch):
    import foodlib.train as train_module
    from conftest import tiny_config

    seen = {"conv": set(), "loss": set(), "logits": set()}
    real_create_model = train_module.create_model

    def create_model_with_probes(*args, **kwargs):
        model = real_create_model(*args, **kwargs)
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.register_forward_hook(lambda m, i, out: seen["conv"].add(out.dtype) if m.training else None)
        return model

    monkeypatch.setattr(train_module, "create_model", create_model_with_probes)
    real_build = train_module.build_model_and_loss

    def build_with_loss_probe(cfg, num_classes):
        model, loss = real_build(cfg, num_classes)

        def record(module, inputs, out):
            if module.training:
                seen["loss"].add(out.loss.dtype)
                seen["logits"].add(out.logits.dtype)
        loss.register_forward_hook(record)
        return model, loss

    monkeypatch.setattr(train_module, "build_model_and_loss", build_with_loss_probe)
    cfg = tiny_config(tmp_path, data=str(write_tiny_image_folder(tmp_path / "photos")), image_size=16, batch_size=8,
                      amp="bf16", epochs=1, loss="center", features=False, eval_test=False, device="cpu",
                      cache_dir=str(tmp_path / "cache"))
    result = train_module.fit(cfg)
    assert seen["conv"] == {torch.bfloat16}  # the network ran under bf16 autocast
    assert seen["loss"] == {torch.float32} and seen["logits"] == {torch.float32}  # loss math stayed float32
    train_row = next(r for r in result.trace if r["split"] == "train")
    assert train_row["img_per_s"] > 0 and torch.isfinite(torch.tensor(train_row["loss"]))
    assert all(p.dtype == torch.float32 for p in result.model.parameters())  # master weights stay float32
