"""Image decoding shared by every foodlib data path.

One function turns any file Pillow reads into 8-bit RGB (:func:`open_rgb`), and one turns that into
the fixed-size square array the models see (:func:`resize_short_side_center_crop`). The decoded
cache and the uncached pipeline both call :func:`load_image_array`, so a cached run and an uncached
run see the same pixels.

>>> from foodlib.data.images import load_image_array
>>> array = load_image_array("train/apple_pie/1005649.jpg", size=64)  # doctest: +SKIP
>>> array.shape, array.dtype  # doctest: +SKIP
((64, 64, 3), dtype('uint8'))
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

#: Lower-case file suffixes treated as images. The common photo and web formats Pillow decodes;
#: exotic ones it also reads (.psd, .eps, .pdf...) are left out on purpose, since a stray document
#: in a class folder is far more likely than a training image in those formats.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {
        ".jpg", ".jpeg", ".jpe", ".jfif",
        ".png", ".apng",
        ".bmp", ".dib",
        ".gif",
        ".webp",
        ".tif", ".tiff",
        ".ppm", ".pgm", ".pbm", ".pnm",
        ".tga",
        ".ico",
        ".jp2", ".j2k",
        ".avif",
        ".qoi",
    }
)

#: the hint every decode error ends with: the scanner lists all bad files in one pass.
DATA_CHECK_HINT = "run `foodlib data-check <dataset root>` to list every unreadable file at once"

# Modes whose samples are wider than 8 bits and need scaling (Pillow's convert() clips them).
_WIDE_INTEGER_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
# Modes that carry transparency and are flattened onto white.
_ALPHA_MODES = {"RGBA", "LA", "La", "RGBa", "PA"}


class ImageDecodeError(ValueError):
    """A file that cannot be decoded into an RGB image (truncated, corrupt, empty, not an image).

    Attributes:
        path: the file.
        reason: what went wrong, in words.
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot decode image {self.path}: {reason}; {DATA_CHECK_HINT}")

    def __reduce__(self):  # keep the two-argument constructor picklable (DataLoader workers)
        return (type(self), (self.path, self.reason))


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a loaded Pillow image of any mode to 8-bit ``RGB``.

    * 16-bit and 32-bit integer greyscale (``I;16*``, ``I``) are scaled to 8 bits (``65535 -> 255``);
      Pillow's own ``convert`` clips them, which turns most 16-bit photos white. ``I`` images whose
      values fit ``[0, 65535]`` are read as 16-bit (what 16-bit PNG and TIFF decode to); anything
      else is stretched from its minimum to its maximum.
    * Float (``F``) images in ``[0, 1]`` are scaled by 255, in ``[0, 255]`` kept, otherwise stretched.
    * Transparency (``RGBA``, ``LA``, ``PA``, palette with a transparent index) is composited onto
      white: the colour under fully transparent pixels is arbitrary (often black), and cut-out product
      photos are meant to be seen on a light page.
    * Everything else (``L``, ``1``, ``P``, ``CMYK``, ``YCbCr``...) goes through ``Image.convert``.

    Args:
        img: a Pillow image (any mode).

    Returns:
        An ``RGB`` image of the same size (``img`` itself when already RGB).

    >>> to_rgb(Image.new("LA", (2, 2), (0, 0))).getpixel((0, 0))
    (255, 255, 255)
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _WIDE_INTEGER_MODES:
        values = np.asarray(img).astype(np.float64)  # (H, W)
        if mode != "I" or (values.size and values.min() >= 0 and values.max() <= 65535):
            values = values / 257.0  # 65535 / 255 = 257 exactly
        else:
            values = _stretch(values)
        return _grey_array_to_rgb(values)
    if mode == "F":
        values = np.asarray(img).astype(np.float64)  # (H, W)
        finite = values[np.isfinite(values)]
        low, high = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
        if low >= 0 and high <= 1:
            values = values * 255.0
        elif not (low >= 0 and high <= 255):
            values = _stretch(values)
        return _grey_array_to_rgb(np.nan_to_num(values))
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    elif mode == "PA":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in _ALPHA_MODES:
        rgba = img if mode == "RGBA" else img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _stretch(values: np.ndarray) -> np.ndarray:
    """Map ``values`` linearly from ``[min, max]`` to ``[0, 255]`` (a constant image maps to 0)."""
    low, high = float(np.nanmin(values)), float(np.nanmax(values))
    if high <= low:
        return np.zeros_like(values)
    return (values - low) * (255.0 / (high - low))


def _grey_array_to_rgb(values: np.ndarray) -> Image.Image:
    grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)  # (H, W)
    return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2), "RGB")


def decode_rgb(
    source: str | os.PathLike | BinaryIO,
    draft_size: int | None = None,
    name: str | os.PathLike | None = None,
) -> Image.Image:
    """Decode ``source`` (a path or a binary file object) fully into an upright 8-bit RGB image.

    :func:`open_rgb` for paths; the scanner passes bytes it already read for hashing. ``name`` is
    the file named in errors (defaults to ``source`` when it is a path).
    """
    label = str(name if name is not None else source)
    try:
        with Image.open(source) as img:
            if draft_size is not None and img.format == "JPEG":
                # DCT scaling: libjpeg decodes at 1/2, 1/4 or 1/8 size directly. Pillow picks the
                # largest factor that keeps both sides >= draft_size, so the short side stays >= it.
                img.draft("RGB", (draft_size, draft_size))
            img.load()  # full decode here, so truncation and corruption surface as errors now
            rgb = to_rgb(_exif_upright(img, label))
            # Leaving the `with` closes `img`, which frees its pixels: never hand that object out.
            return rgb.copy() if rgb is img else rgb
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(label, _unidentified_reason(source)) from None
    except Image.DecompressionBombError as error:
        raise ImageDecodeError(
            label, f"{error} (raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted)"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as error:
        # Pillow reports damaged data through several exception types: OSError ("image file is
        # truncated", "broken data stream"), SyntaxError (bad headers), ValueError, EOFError...
        detail = str(error) or type(error).__name__
        if "truncated" in detail:
            reason = f"truncated: the file ends before the image data does ({detail})"
        else:
            reason = f"corrupt image data ({detail})"
        raise ImageDecodeError(label, reason) from None


def _unidentified_reason(source) -> str:
    size = None
    if isinstance(source, (str, os.PathLike)):
        try:
            size = os.path.getsize(source)
        except OSError:
            pass
    elif isinstance(source, io.BytesIO):
        size = len(source.getbuffer())
    if size == 0:
        return "the file is empty (0 bytes)"
    return "not an image file Pillow can identify (wrong content for its extension?)"


def _exif_upright(img: Image.Image, label: str) -> Image.Image:
    """Apply the EXIF orientation tag; a damaged EXIF block leaves the image as stored."""
    try:
        if img.getexif().get(ExifTags.Base.Orientation, 1) in (None, 1):
            return img  # the common case: skip exif_transpose's defensive full copy
        return ImageOps.exif_transpose(img)
    except Exception as error:  # noqa: BLE001 - EXIF parsers fail in many ways on damaged blocks
        warnings.warn(f"{label}: ignoring unreadable EXIF orientation ({error})", stacklevel=3)
        return img


def open_rgb(path: str | os.PathLike, draft_size: int | None = None) -> Image.Image:
    """Open any image file as an upright 8-bit RGB Pillow image, fully decoded.

    Args:
        path: the image file.
        draft_size: when set and the file is a JPEG, let libjpeg decode at a reduced scale
            (1/2, 1/4 or 1/8) whose short side is still ``>= draft_size``: several times faster for
            big photos that are resized down anyway. Ignored for other formats.

    Returns:
        An ``RGB`` image (see :func:`to_rgb` for how each mode is converted), with the EXIF
        orientation applied.

    Raises:
        ImageDecodeError: the file is empty, not an image, truncated or corrupt. Truncated files
            always raise: ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left untouched.
        FileNotFoundError: ``path`` does not exist.

    >>> img = open_rgb("photo.jpg", draft_size=64)  # doctest: +SKIP
    >>> img.mode  # doctest: +SKIP
    'RGB'
    """
    return decode_rgb(Path(path), draft_size=draft_size, name=path)


#: The resamplings a decode can use, by the name timm's data configs give them.
RESAMPLING = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def resampling_filter(interpolation: str) -> Image.Resampling:
    """Pillow's filter for ``"bilinear"`` or ``"bicubic"``; anything else is a one-line ValueError."""
    if interpolation not in RESAMPLING:
        raise ValueError(f"interpolation={interpolation!r} is not supported; foodlib resamples with one of "
                         f"{', '.join(RESAMPLING)}")
    return RESAMPLING[interpolation]


def resize_short_side_center_crop(img: Image.Image, size: int, interpolation: str = "bilinear") -> np.ndarray:
    """Resize so the short side is ``size``, then crop the centre square; the canonical decode.

    Implemented as one ``Image.resize`` whose ``box`` is the centre square of the source, which is
    the same geometry as "resize, then crop" without resampling the discarded margins. Bilinear
    and bicubic filtering in Pillow widen their kernel when shrinking, so they antialias;
    ``reducing_gap=3`` first shrinks by an integer factor with a box filter (fast for big photos;
    Pillow documents 3 as indistinguishable from a plain resize). The result depends only on the
    input pixels, ``size`` and ``interpolation``.

    Args:
        img: a Pillow image (converted with :func:`to_rgb` if not RGB).
        size: the output side in pixels.
        interpolation: ``"bilinear"`` or ``"bicubic"``: the resampling the backbone's weights were
            trained with (:attr:`foodlib.models.Preprocessing.interpolation`).

    Returns:
        ``(size, size, 3)`` uint8 array.

    >>> resize_short_side_center_crop(Image.new("RGB", (40, 20), (9, 8, 7)), 10).shape
    (10, 10, 3)
    """
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    resample = resampling_filter(interpolation)
    img = to_rgb(img)
    width, height = img.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    resized = img.resize(
        (size, size),
        resample,
        box=(left, top, left + side, top + side),
        reducing_gap=3.0,
    )
    return np.asarray(resized, dtype=np.uint8).copy()  # (size, size, 3), writable


def load_image_array(path: str | os.PathLike, size: int, interpolation: str = "bilinear") -> np.ndarray:
    """Decode ``path`` into the ``(size, size, 3)`` uint8 array the models see.

    :func:`open_rgb` with JPEG draft decoding at ``size``, then
    :func:`resize_short_side_center_crop` with ``interpolation`` (the backbone's resampling).
    Shared by the decoded cache, the uncached loader and inference.

    >>> load_image_array("photo.jpg", 64).shape  # doctest: +SKIP
    (64, 64, 3)
    """
    return resize_short_side_center_crop(open_rgb(path, draft_size=size), size, interpolation)
