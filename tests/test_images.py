"""Decoding any image file into 8-bit RGB, and the canonical resize + centre crop."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from foodlib.data.images import (
    IMAGE_EXTENSIONS,
    ImageDecodeError,
    load_image_array,
    open_rgb,
    resize_short_side_center_crop,
    to_rgb,
)


def _pixels(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img)


def test_extensions_are_lower_case_suffixes():
    assert {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"} <= IMAGE_EXTENSIONS
    assert all(ext.startswith(".") and ext == ext.lower() for ext in IMAGE_EXTENSIONS)


def test_greyscale_repeats_the_channel(tmp_path):
    path = tmp_path / "grey.png"
    Image.fromarray(np.array([[0, 77], [200, 255]], np.uint8), "L").save(path)
    rgb = _pixels(open_rgb(path))
    assert rgb.shape == (2, 2, 3)
    assert rgb[1, 0].tolist() == [200, 200, 200]
    assert rgb[0, 1].tolist() == [77, 77, 77]


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    values = np.array([[0, 257 * 100, 65535, 1000]], np.uint16)
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")  # the file really is 16-bit
    rgb = _pixels(open_rgb(path))
    # 8-bit value = round(v / 257): 0, 100, 255, round(3.89) = 4; clipping would give 0, 255, 255, 255
    assert rgb[0, :, 0].tolist() == [0, 100, 255, 4]
    assert (rgb[..., 0] == rgb[..., 2]).all()


def test_big_endian_16_bit_and_32_bit_integer_modes():
    big_endian = Image.frombytes("I;16B", (2, 1), np.array([0, 65535], ">u2").tobytes())
    assert _pixels(to_rgb(big_endian))[0, :, 1].tolist() == [0, 255]
    # "I" within the 16-bit range is read as 16-bit data (old Pillow's 16-bit PNG mode)
    as_int32 = Image.fromarray(np.array([[0, 514, 65535]], np.int32), "I")
    assert _pixels(to_rgb(as_int32))[0, :, 0].tolist() == [0, 2, 255]
    # outside that range it is stretched from min to max: -10 -> 0, 90 -> 255, 10 -> 20 / 100 * 255 = 51
    signed = Image.fromarray(np.array([[-10, 10, 90]], np.int32), "I")
    assert _pixels(to_rgb(signed))[0, :, 0].tolist() == [0, 51, 255]


def test_float_images_in_unit_range_are_scaled():
    img = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F")
    assert _pixels(to_rgb(img))[0, :, 0].tolist() == [0, 128, 255]  # 127.5 rounds to even 128


def test_rgba_transparent_becomes_white_and_half_alpha_blends(tmp_path):
    path = tmp_path / "cutout.png"
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 0)  # fully transparent: white
    rgba[0, 1] = (10, 20, 30, 255)  # opaque: unchanged
    rgba[0, 2] = (0, 100, 200, 128)  # half: c * a + 255 * (1 - a), a = 128/255
    Image.fromarray(rgba, "RGBA").save(path)
    rgb = _pixels(open_rgb(path))
    assert rgb[0, 0].tolist() == [255, 255, 255]
    assert rgb[0, 1].tolist() == [10, 20, 30]
    a = 128 / 255
    expected = [round(c * a + 255 * (1 - a)) for c in (0, 100, 200)]
    assert np.abs(rgb[0, 2].astype(int) - expected).max() <= 1


def test_la_composites_onto_white(tmp_path):
    path = tmp_path / "la.png"
    la = np.array([[[50, 0], [50, 255]]], np.uint8)  # (1, 2, 2): grey 50, alpha 0 then 255
    Image.fromarray(la, "LA").save(path)
    rgb = _pixels(open_rgb(path))
    assert rgb[0, 0].tolist() == [255, 255, 255]
    assert rgb[0, 1].tolist() == [50, 50, 50]


def test_palette_with_and_without_transparency(tmp_path):
    palette = [255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6)  # index 0 red, 1 blue
    img = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    img.putpalette(palette)
    plain, transparent = tmp_path / "plain.png", tmp_path / "transparent.png"
    img.save(plain)
    img.save(transparent, transparency=0)  # index 0 (red) is see-through
    assert _pixels(open_rgb(plain))[0].tolist() == [[255, 0, 0], [0, 0, 255]]
    assert _pixels(open_rgb(transparent))[0].tolist() == [[255, 255, 255], [0, 0, 255]]


def test_cmyk_uses_the_subtractive_formula(tmp_path):
    path = tmp_path / "print.tif"
    cmyk = np.array([[[255, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 255], [0, 102, 0, 51]]], np.uint8)
    Image.fromarray(cmyk, "CMYK").save(path)
    rgb = _pixels(open_rgb(path)).astype(int)
    assert rgb[0, 0].tolist() == [0, 255, 255]  # full cyan: no red
    assert rgb[0, 1].tolist() == [255, 255, 255]  # no ink: white
    assert rgb[0, 2].tolist() == [0, 0, 0]  # full black
    # channel = (255 - ink) * (255 - K) / 255: R = 255 * 204 / 255 = 204, G = 153 * 204 / 255 = 122.4
    assert np.abs(rgb[0, 3] - [204, 122, 204]).max() <= 1


def test_one_bit_images(tmp_path):
    path = tmp_path / "bw.png"
    Image.fromarray(np.array([[False, True]])).convert("1").save(path)
    assert Image.open(path).mode == "1"
    assert _pixels(open_rgb(path))[0].tolist() == [[0, 0, 0], [255, 255, 255]]


def test_exif_orientation_6_swaps_width_and_height(tmp_path):
    path = tmp_path / "phone.jpg"
    pixels = np.zeros((20, 40, 3), np.uint8)  # stored landscape: 40 wide, 20 high
    pixels[:, :20] = (250, 0, 0)  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    img = open_rgb(path)
    assert img.size == (20, 40)  # (width, height): now portrait
    # rotating clockwise moves the stored left half to the top
    top, bottom = np.asarray(img)[:15].mean(axis=(0, 1)), np.asarray(img)[25:].mean(axis=(0, 1))
    assert top[0] > 200 and bottom[0] < 50


def _jpeg_bytes(width=300, height=200, seed=0) -> bytes:
    noise = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_truncated_jpeg_raises_naming_the_file(tmp_path):
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    path = tmp_path / "cut.jpg"
    data = _jpeg_bytes()
    path.write_bytes(data[: len(data) // 2])
    for draft in (None, 32):
        with pytest.raises(ImageDecodeError) as caught:
            open_rgb(path, draft_size=draft)
        message = str(caught.value)
        assert str(path) in message and "truncated" in message and "foodlib data-check" in message
        assert caught.value.path == str(path)
    assert isinstance(caught.value, ValueError)
    assert not ImageFile.LOAD_TRUNCATED_IMAGES  # decoding must not flip the global switch


def test_zero_byte_and_text_files_raise(tmp_path):
    empty, text = tmp_path / "empty.jpg", tmp_path / "notes.jpg"
    empty.write_bytes(b"")
    text.write_text("this is not a photo\n")
    with pytest.raises(ImageDecodeError, match="empty"):
        open_rgb(empty)
    with pytest.raises(ImageDecodeError, match="not an image"):
        open_rgb(text)
    with pytest.raises(FileNotFoundError):
        open_rgb(tmp_path / "missing.jpg")


def test_draft_decodes_smaller_but_keeps_the_short_side(tmp_path):
    path = tmp_path / "big.jpg"
    path.write_bytes(_jpeg_bytes(800, 600))
    assert open_rgb(path).size == (800, 600)
    # the largest DCT scale keeping both sides >= 64 is 1/8: 100x75 (short side 75 >= 64)
    assert open_rgb(path, draft_size=64).size == (100, 75)
    assert open_rgb(path, draft_size=200).size == (400, 300)  # 1/2: 1/4 would give 150 < 200


def test_resize_short_side_center_crop_geometry():
    # a 40x20 image (width x height): left quarter red, middle half green, right quarter blue
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :10] = (255, 0, 0)
    pixels[:, 10:30] = (0, 255, 0)
    pixels[:, 30:] = (0, 0, 255)
    img = Image.fromarray(pixels)
    out = resize_short_side_center_crop(img, 10)
    assert out.shape == (10, 10, 3) and out.dtype == np.uint8
    # short side 20 -> 10 keeps the centre 20 source columns: the green band, whose edges the
    # bilinear kernel blends with one neighbouring source column, as a full resize would
    assert (out[:, 1:9] == (0, 255, 0)).all()
    assert (out[:, 0, 0] > 0).all() and (out[:, 9, 2] > 0).all() and (out[..., 1] > 128).all()
    # the same pixels as the two-step reference: resize the whole image, then crop its centre
    reference = np.asarray(img.resize((20, 10), Image.Resampling.BILINEAR))[:, 5:15]
    assert np.array_equal(out, reference)
    assert out.flags.writeable


def test_resize_averages_when_shrinking_and_is_deterministic():
    checker = (np.indices((64, 64)).sum(axis=0) % 2 * 255).astype(np.uint8)  # 1-pixel checkerboard
    img = Image.fromarray(checker, "L")
    out = resize_short_side_center_crop(img, 8)
    assert out.shape == (8, 8, 3)
    # an antialiased 8x shrink of a fine checkerboard is flat mid-grey, not aliased black/white
    assert np.abs(out.astype(int) - 127.5).max() <= 3
    assert np.array_equal(out, resize_short_side_center_crop(img, 8))


def test_load_image_array_matches_open_and_resize(tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(_jpeg_bytes(640, 480, seed=3))
    array = load_image_array(path, 64)
    assert array.shape == (64, 64, 3) and array.dtype == np.uint8
    assert np.array_equal(array, resize_short_side_center_crop(open_rgb(path, draft_size=64), 64))
    assert np.array_equal(array, load_image_array(path, 64))


def test_resize_rejects_bad_size():
    with pytest.raises(ValueError, match="size"):
        resize_short_side_center_crop(Image.new("RGB", (4, 4)), 0)
