"""Batch augmentation on tensors, on whatever device the model runs on.

Input batches are uint8 ``(N, S, S, 3)`` (cache layout). Training draws one random resized crop
and flip per image (on the CPU generator, so results do not depend on the device) and applies them
all in one ``grid_sample`` call (bilinear, or bicubic for backbones whose weights were trained
so); evaluation takes the deterministic center crop. Both end with the backbone's normalisation
(ImageNet mean/std by default; ``mean``/``std``/``interpolation`` from :func:`normalization`, e.g.
0.5/0.5 and bicubic for EfficientNet-Lite), in float32, in NCHW shape with channels_last strides when asked (written
directly in that layout, no extra copy). Neither waits for the GPU: the only host-to-device copy is
one small pinned, non-blocking transfer of the per-image random numbers.

>>> x = torch.randint(0, 256, (8, 73, 73, 3), dtype=torch.uint8)
>>> eval_transform(x, 64).shape
torch.Size([8, 3, 64, 64])
>>> train_transform(x, 64, generator=torch.Generator().manual_seed(0)).shape
torch.Size([8, 3, 64, 64])
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from foodlib.data.images import RESAMPLING

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_FRACTION = 0.875  # eval crop / stored side, the usual 224/256


def cache_side(image_size: int) -> int:
    """Side of the stored (cached) square for a network input of ``image_size`` (64 -> 73, 224 -> 256)."""
    return int(round(image_size / CROP_FRACTION))


def normalization(model) -> dict:
    """``{"mean", "std", "interpolation"}`` keyword arguments of the transforms for ``model``'s backbone.

    Read from the model's ``preprocessing`` (:class:`foodlib.models.Preprocessing`); a model
    without one gets ImageNet mean/std and bilinear resampling.
    """
    pre = getattr(model, "preprocessing", None)
    if pre is None:
        return {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "interpolation": "bilinear"}
    return {"mean": tuple(pre.mean), "std": tuple(pre.std), "interpolation": pre.interpolation}


def _check_resampling(interpolation: str) -> None:
    """The decode's resamplings (bilinear, bicubic) are grid_sample modes of the same names."""
    if interpolation not in RESAMPLING:
        raise ValueError(f"interpolation={interpolation!r} is not supported; choose one of {', '.join(RESAMPLING)}")


@functools.lru_cache(maxsize=None)
def _normalize_constants(device: torch.device, mean: tuple = IMAGENET_MEAN, std: tuple = IMAGENET_STD
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, scale) with ``(x / 255 - mean) / std == shift + scale * x``, made once per device and mean/std.

    Cached so that a GPU step does not copy two tiny tensors from the host every batch (a
    pageable host-to-device copy blocks until the GPU's queue has drained).
    """
    std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    return (-mean / std).to(device), (1.0 / (255.0 * std)).to(device)


def _normalize(x: torch.Tensor, channels_last: bool, mean: tuple = IMAGENET_MEAN, std: tuple = IMAGENET_STD
               ) -> torch.Tensor:
    """float 0..255 NCHW -> normalised, as one fused multiply-add written in the wanted layout.

    Writing the result straight into a tensor of the requested memory format saves the separate
    ``.contiguous(memory_format=...)`` copy (a full pass over the batch, noticeable on CPU).
    """
    shift, scale = _normalize_constants(x.device, tuple(map(float, mean)), tuple(map(float, std)))
    out = torch.empty_like(x, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return torch.addcmul(shift, x, scale, out=out)


def _to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a small CPU tensor to ``device`` without waiting for the GPU (pinned, non-blocking copy)."""
    if device.type == "cuda":
        return values.pin_memory().to(device, non_blocking=True)
    return values.to(device)


def is_cached_batch(batch: torch.Tensor) -> bool:
    """True for a batch from the frozen-trunk cache (float16 features or maps); images are uint8."""
    return batch.ndim == 2 or batch.dtype == torch.float16


def _nchw(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (N, S, S, 3), got shape {tuple(images.shape)}")
    return images.permute(0, 3, 1, 2)  # a view: NHWC memory is exactly NCHW channels_last


def eval_transform(images: torch.Tensor, size: int, channels_last: bool = True, mean: tuple = IMAGENET_MEAN,
                   std: tuple = IMAGENET_STD, interpolation: str = "bilinear") -> torch.Tensor:
    """Deterministic center crop of ``size`` from uint8 ``(N, S, S, 3)``, normalised ``(N, 3, size, size)``.

    A crop does not resample: ``interpolation`` (the decode's, already applied to the stored
    square) is accepted so that both transforms take ``**normalization(model)``, and only checked.

    A float16 batch (pooled features ``(N, F)`` or maps ``(N, C, H, W)`` from :mod:`foodlib.trunk_cache`)
    was transformed when the cache was built: it passes through unchanged.
    """
    _check_resampling(interpolation)
    if is_cached_batch(images):
        return images
    x = _nchw(images)
    side = x.shape[-1]
    if side < size:
        raise ValueError(f"stored images are {side} px, smaller than the crop {size}; rebuild the cache")
    top = (side - size) // 2
    x = x[:, :, top : top + size, top : top + size].float()
    return _normalize(x, channels_last, mean, std)


def train_transform(
    images: torch.Tensor,
    size: int,
    generator: torch.Generator | None = None,
    scale: tuple[float, float] = (0.35, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
    crop: bool = True,
    color_jitter: float = 0.0,
    channels_last: bool = True,
    mean: tuple = IMAGENET_MEAN,
    std: tuple = IMAGENET_STD,
    interpolation: str = "bilinear",
) -> torch.Tensor:
    """Random resized crop + horizontal flip (+ colour jitter) for a whole batch at once.

    Args:
        images: uint8 ``(N, S, S, 3)`` on the target device.
        size: output side.
        generator: a ``torch.Generator`` on the CPU; all random draws come from it, so a
            (seed, epoch, step) generator makes augmentation reproducible.
        scale: range of the crop's area as a fraction of the image (torchvision's default is
            (0.08, 1); food photos lose their identity below ~1/3 of the plate).
        ratio: range of the crop's aspect ratio.
        flip: random horizontal flip with probability 1/2.
        crop: False keeps the full image (resized to ``size``), e.g. for ``augment="flip"``.
        color_jitter: strength j of brightness / contrast / saturation factors drawn from [1-j, 1+j].
        mean, std: the backbone's normalisation (:func:`normalization`).
        interpolation: the crop's resampling, ``"bilinear"`` or ``"bicubic"`` (the backbone's, as
            for the decode). Bicubic can overshoot; its result is clamped to 0..255 as a uint8
            resize would be.

    A float16 batch (cached trunk features or maps, augmented when the cache was built) passes through.
    """
    _check_resampling(interpolation)
    if is_cached_batch(images):
        return images
    x = _nchw(images).float()  # (N, 3, S, S)
    n = x.shape[0]
    rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731  (CPU draws, then moved)

    if crop:
        # Crop width/height as fractions of the side; clamping to 1 replaces torchvision's retry
        # loop (vectorised, and only matters for extreme aspect ratios of near-full crops).
        area = scale[0] + (scale[1] - scale[0]) * rand(n)
        log_ratio = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * rand(n)
        aspect = torch.exp(log_ratio)
        w = torch.sqrt(area * aspect).clamp(max=1.0)
        h = torch.sqrt(area / aspect).clamp(max=1.0)
        cx = (1 - w) * (2 * rand(n) - 1)  # crop center in [-1, 1] coordinates
        cy = (1 - h) * (2 * rand(n) - 1)
    else:
        w = h = torch.ones(n)
        cx = cy = torch.zeros(n)
    sign = torch.where(rand(n) < 0.5, -1.0, 1.0) if flip else torch.ones(n)
    draws = [w * sign, cx, h, cy]
    if color_jitter > 0:
        draws += list((1 - color_jitter + 2 * color_jitter * rand(n, 3)).unbind(1))  # brightness, contrast, saturation
    # Every per-image number crosses to the device in one small copy.
    draws = _to_device(torch.stack(draws, dim=1), x.device)  # (N, 4) or (N, 7)

    # The crop is axis-aligned, so the sampling grid is separable: column j of image i samples
    # x = w_i * sign_i * u_j + cx_i, row k samples y = h_i * u_k + cy_i, where u are the output pixel
    # centres in [-1, 1] (align_corners=False). That is F.affine_grid of [[w * sign, 0, cx], [0, h, cy]],
    # built here by broadcasting instead of a batched matmul: about a third of the transform's CPU
    # time saved, the same grid up to float rounding.
    centres = (torch.arange(size, device=x.device, dtype=torch.float32) * 2 + 1) / size - 1  # (size,)
    grid_x = draws[:, 0:1] * centres + draws[:, 1:2]  # (N, size)
    grid_y = draws[:, 2:3] * centres + draws[:, 3:4]  # (N, size)
    grid = torch.stack(torch.broadcast_tensors(grid_x[:, None, :], grid_y[:, :, None]), dim=-1)  # (N, size, size, 2)
    # "border" gives samples within half a pixel of the image edge the edge pixel's value, as a crop
    # followed by F.interpolate (or torchvision's resized_crop) does; it is also cheaper than "reflection".
    x = F.grid_sample(x, grid, mode=interpolation, padding_mode="border", align_corners=False)  # (N, 3, size, size)
    if interpolation == "bicubic":
        x = x.clamp(0, 255)  # cubic weights overshoot at edges; PIL / timm's uint8 resize clamps too

    if color_jitter > 0:
        brightness, contrast, saturation = (draws[:, i].view(n, 1, 1, 1) for i in (4, 5, 6))
        x = x * brightness
        image_mean = x.mean(dim=(1, 2, 3), keepdim=True)  # (N, 1, 1, 1)
        x = (x - image_mean) * contrast + image_mean
        grey = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])  # (N, 1, H, W), ITU-R 601 luma
        x = ((x - grey) * saturation + grey).clamp(0, 255)

    return _normalize(x, channels_last, mean, std)


def augment_options(name: str) -> dict:
    """Keyword arguments of :func:`train_transform` for the config's ``augment`` setting."""
    options = {
        "none": dict(crop=False, flip=False),
        "flip": dict(crop=False, flip=True),
        "standard": dict(crop=True, flip=True),
        "strong": dict(crop=True, flip=True, color_jitter=0.3),
    }
    if name not in options:
        raise ValueError(f"augment={name!r} is not valid; choose one of {sorted(options)}")
    return options[name]
