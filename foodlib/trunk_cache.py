"""The frozen-trunk feature cache: a frozen backbone runs once per image and view, not once per epoch.

With ``trainable="head"`` nothing in the backbone learns, so its pooled outputs ``(N, F)`` are a
fixed function of the input pixels. With ``trainable="last:N"`` the same holds for the output maps
``(N, C, H, W)`` of the frozen stages (the backbone is cut there, :class:`~foodlib.trainable.TrunkCut`,
and every step runs only the last N stages on the stored maps). They are computed once per

    (data content, split, frozen weights, cut, image size, normalisation, augmentation, views K, autocast dtype)

and reused by every run, loss and seed that shares them:

* train: K augmented views per image, drawn with the run's ``augment`` setting from a fixed view
  seed (so all seeds share them); epoch e gives image i its view ``(e + offset_i) mod K`` with a
  per-run random offset, so every view is used once every K epochs;
* every split (train included, for ``features.npz``): one clean view, the evaluation center crop.

The views are fixed, so with ``last:N`` an augmented run sees K views per image rather than a new
one every epoch (``trunk_cache: false`` trains on live augmentation, at the trunk's full cost).

Storage (``<cache_dir>/trunk/<key>.f16`` + ``<key>.json``): raw float16, memory-mapped, nothing
unpickled; the JSON holds the shape and the file's SHA-256, checked on every open, so a damaged
file is rebuilt, never used. An exclusive lock per key means parallel runs build an entry once;
the others wait and then read it. The key hashes the backbone's actual tensors, so other weights
(another file, another seed of a random trunk) never reuse these features.

>>> data = with_trunk_features(data, model, cfg, device, amp_dtype=None)            # doctest: +SKIP
>>> images, labels = next(iter(data.loader("train", 64, shuffle=True)))              # doctest: +SKIP
>>> images.shape, images.dtype  # head; last:1 at 160 px gives maps (64, 320, 5, 5)  # doctest: +SKIP
(torch.Size([64, 1280]), torch.float16)
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from foodlib.data import Data
from foodlib.data.augment import augment_options, eval_transform, normalization, train_transform
from foodlib.data.balanced import BalancedBatchLoader
from foodlib.data.cache import build_lock, cache_key
from foodlib.data.loader import BatchLoader, ImageSource
from foodlib.files import atomic_write_json, cache_folder
from foodlib.trainable import TrunkCut, cut_for_cache

TRUNK_CACHE_VERSION = 1  # bump when the view drawing or the stored layout changes
VIEW_SEED = 20_240_601  # augmented views are drawn from this seed, not the run's: every seed shares them
BUILD_BATCH = 64  # images per forward while building; fixed, so the views do not depend on it


class TrunkCacheError(RuntimeError):
    """A trunk-feature file does not match its record (damaged); it is rebuilt."""


# ----- keys ------------------------------------------------------------------------------------

def weights_digest(module: nn.Module) -> str:
    """SHA-256 of every tensor (parameters and buffers, names, dtypes, shapes, values) of ``module``."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _content_key(source: ImageSource) -> str:
    """The data content behind a split: the decoded cache's key (file list, sizes, mtimes, side, resampling)
    and the rows."""
    base = Path(source._file).stem if source._file else cache_key(source.paths, source.side, source.interpolation)
    digest = hashlib.sha256(f"{base}\n".encode())
    digest.update("\n".join(source.paths).encode())
    return digest.hexdigest()


def trunk_key(source: ImageSource, weights: str, image_size: int, mean, std, augment: str | None, views: int,
              amp_dtype: torch.dtype | None, interpolation: str = "bilinear", cut: int | None = None) -> str:
    """Hash of everything the stored features depend on (``augment=None``: the clean view).

    ``interpolation`` (the augmented crops' resampling) joins the record only when it is not
    bilinear, and ``cut`` (maps after that many stages; None: the pooled output) only when set,
    so the keys of caches built before they were recorded stay valid.
    """
    record = {
        "version": TRUNK_CACHE_VERSION, "content": _content_key(source), "weights": weights,
        "image_size": image_size, "side": source.side, "mean": [float(m) for m in mean], "std": [float(s) for s in std],
        "augment": augment, "augment_options": augment_options(augment) if augment else None,
        "views": views, "view_seed": VIEW_SEED, "build_batch": BUILD_BATCH, "amp": str(amp_dtype),
    }
    if interpolation != "bilinear":
        record["interpolation"] = interpolation
    if cut is not None:
        record["cut"] = cut
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:24]


# ----- building ------------------------------------------------------------------------------

def view_inputs(source: ImageSource, image_size: int, norm: dict, augment: str | None, view: int,
                device: torch.device) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Network inputs ``(B, 3, H, W)`` of one view of every image, in row order, with their row indices.

    ``augment=None`` gives the clean evaluation crop; otherwise view ``view`` of ``augment``,
    drawn from a generator seeded by (VIEW_SEED, view, batch number), so a view is the same
    whoever builds it.
    """
    for b, start in enumerate(range(0, len(source), BUILD_BATCH)):
        rows = np.arange(start, min(start + BUILD_BATCH, len(source)))
        images = torch.from_numpy(np.ascontiguousarray(source.get_batch(rows))).to(device)  # (B, S, S, 3) uint8
        if augment is None or augment == "none":  # fit() trains on the evaluation crop with augment="none"
            x = eval_transform(images, image_size, **norm)
        else:
            seed = int(np.random.SeedSequence([VIEW_SEED, view, b]).generate_state(1)[0])
            x = train_transform(images, image_size, torch.Generator().manual_seed(seed), **augment_options(augment),
                                **norm)
        yield rows, x


@torch.no_grad()
def _compute(trunk: nn.Module, source: ImageSource, image_size: int, norm: dict, augment: str | None, views: int,
             file: Path, device: torch.device, amp_dtype: torch.dtype | None, progress: bool, desc: str) -> tuple:
    """Write the trunk's outputs (K, N, F) or (K, N, C, H, W) float16 into ``file``; returns the shape.

    The next batch is decoded and augmented (in a thread) while the trunk runs on this one; the file
    is created at the first output, when F is known (no extra probing forward).
    """
    trunk.eval()
    out = None
    bar = tqdm(total=views * len(source), desc=desc, disable=not progress, leave=False, unit="img")
    with ThreadPoolExecutor(1) as pool:  # decode + augment of batch b+1 overlaps the forward of batch b
        for view in range(views):
            batches = view_inputs(source, image_size, norm, augment, view, device)
            pending = pool.submit(next, batches, None)
            while True:
                item = pending.result()
                if item is None:
                    break
                pending = pool.submit(next, batches, None)
                rows, x = item
                with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                    features = trunk(x)  # (B, F) pooled, or (B, C, H, W) maps of the frozen stages
                if out is None:
                    shape = (views, len(source), *features.shape[1:])
                    _check_space(file, shape)
                    out = np.memmap(file, dtype=np.float16, mode="w+", shape=shape)
                out[view, rows[0]: rows[-1] + 1] = features.float().cpu().numpy().astype(np.float16)
                bar.update(len(rows))
    bar.close()
    if out is None:
        raise ValueError("the split has no images; nothing to cache")
    shape = out.shape
    out.flush()
    del out
    return shape


def _check_space(file: Path, shape: tuple) -> None:
    """Refuse, in one line, an entry that would not fit on the cache's disk (maps can be large:
    ResNet-50's ``last:1`` at 224 px stores 400 KB per view)."""
    need = int(np.prod(shape)) * 2
    free = shutil.disk_usage(file.parent).free
    if need > free * 0.95:
        raise OSError(f"the trunk cache entry {file.name} needs {need / 2**30:.1f} GiB ({' x '.join(map(str, shape))} "
                      f"float16) but {file.parent} has {free / 2**30:.1f} GiB free; set cache_dir to a larger disk, "
                      "lower trunk_views, or set trunk_cache: false")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def trunk_features(trunk: nn.Module, source: ImageSource, image_size: int, norm: dict, augment: str | None,
                   views: int, device: torch.device, amp_dtype: torch.dtype | None = None,
                   cache_dir: str | Path | None = None, progress: bool = True, desc: str = "trunk",
                   weights: str | None = None, cut: int | None = None) -> np.ndarray:
    """The cached features ``(K, N, ...)`` float16 of one split (K = 1 for the clean view), built when missing.

    Args:
        trunk: the frozen backbone (images -> pooled ``(N, F)``), or its frozen stages (images -> maps).
        source: the split's images.
        norm: ``{"mean", "std", "interpolation"}`` of the backbone (:func:`foodlib.data.augment.normalization`;
            a missing ``interpolation`` is bilinear).
        augment: None for the clean center crop, else the ``augment`` setting of the views.
        views: K (1 for the clean view).
        weights: :func:`weights_digest` of ``trunk`` when already known.
        cut: with ``trunk`` the first stages of a backbone, how many (part of the key).
    """
    views = 1 if augment is None else views
    weights = weights or weights_digest(trunk)
    key = trunk_key(source, weights, image_size, norm["mean"], norm["std"], augment, views, amp_dtype,
                    norm.get("interpolation", "bilinear"), cut)
    folder = cache_folder(cache_dir) / "trunk"
    data_file, meta_file = folder / f"{key}.f16", folder / f"{key}.json"
    with build_lock(folder / f"{key}.lock"):
        if meta_file.is_file() and data_file.is_file():
            try:
                return _open_checked(data_file, meta_file)
            except TrunkCacheError as error:
                warnings.warn(f"{error}; rebuilding it", stacklevel=2)
        tmp_file = data_file.with_suffix(".f16.tmp")
        shape = _compute(trunk, source, image_size, norm, augment, views, tmp_file, device, amp_dtype, progress, desc)
        with open(tmp_file, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_file, data_file)
        atomic_write_json(meta_file, {"shape": list(shape), "dtype": "float16", "sha256": _file_sha256(data_file),
                                      "augment": augment, "views": views, "image_size": image_size,
                                      "n": len(source), "built": time.strftime("%Y-%m-%d %H:%M:%S"),
                                      "version": TRUNK_CACHE_VERSION})
        return _open_checked(data_file, meta_file)


def _open_checked(data_file: Path, meta_file: Path) -> np.ndarray:
    """Memory-map a stored entry after checking its size and SHA-256 against its record."""
    try:
        meta = json.loads(meta_file.read_text())
        shape = tuple(int(s) for s in meta["shape"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise TrunkCacheError(f"trunk cache record {meta_file} is unreadable ({error})") from None
    expected = int(np.prod(shape)) * 2
    if data_file.stat().st_size != expected:
        raise TrunkCacheError(f"trunk cache file {data_file} has {data_file.stat().st_size} bytes, its record says {expected}")
    if _file_sha256(data_file) != meta.get("sha256"):
        raise TrunkCacheError(f"trunk cache file {data_file} does not match its SHA-256 (damaged)")
    return np.memmap(data_file, dtype=np.float16, mode="r", shape=shape)


# ----- loading: a Data whose batches are features ------------------------------------------------

class FeatureSource:
    """Batches of cached features ``(B, ...)`` float16 for row indices, like :class:`ImageSource` gives images.

    ``views`` (K, N, ...) are the augmented views (train), ``clean`` (1, N, ...) the evaluation view.
    With ``augmented`` set, row i of epoch e comes from view ``(e + offset_i) mod K``.
    """

    def __init__(self, clean: np.ndarray, views: np.ndarray | None = None):
        self.clean, self.views = clean, views
        self.augmented = False
        self.epoch, self.offsets = 0, np.zeros(clean.shape[1], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.clean.shape[1])

    def get_batch(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices)
        if not self.augmented or self.views is None:
            return np.asarray(self.clean[0, indices])  # (B, F) or (B, C, H, W)
        view = (self.epoch + self.offsets[indices]) % self.views.shape[0]
        return np.asarray(self.views[view, indices])

    def get_batch_skipping(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`get_batch` and every position kept: cached features cannot vanish mid-run (the
        loader's interface for image sources, whose files can)."""
        return self.get_batch(indices), np.arange(len(indices))


def _view_source(source: FeatureSource, seed: int, augmented: bool) -> FeatureSource:
    """A loader's own view of ``source``: its per-image view offsets drawn from ``seed``."""
    view_source = FeatureSource(source.clean, source.views)
    view_source.augmented = augmented
    view_source.offsets = np.random.default_rng([seed, 1]).integers(
        0, source.views.shape[0] if source.views is not None else 1, len(source))
    return view_source


def _in_memory(kw: dict) -> dict:
    kw["workers"] = 0  # a memcpy per batch: worker processes would only cost
    kw.pop("pin_memory", None)
    return kw


class _EpochViews:
    """Mixin for loaders over a :func:`_view_source`: the epoch also picks each image's view."""

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.source.epoch = epoch


class FeatureLoader(_EpochViews, BatchLoader):
    """A :class:`BatchLoader` over cached features: same order (seed, epoch, ranks), features for images."""

    def __init__(self, source: FeatureSource, labels, batch_size: int, shuffle: bool, seed: int = 0,
                 augmented: bool | None = None, **kw):
        super().__init__(_view_source(source, seed, shuffle if augmented is None else augmented), labels, batch_size,
                         shuffle, seed, **_in_memory(kw))


class BalancedFeatureLoader(_EpochViews, BalancedBatchLoader):
    """Class-balanced training batches (pair / triplet losses) of cached features, each epoch's
    augmented view as in :class:`FeatureLoader`."""

    def __init__(self, source: FeatureSource, labels, batch_size: int, samples_per_class: int, seed: int = 0, **kw):
        super().__init__(_view_source(source, seed, True), labels, batch_size, samples_per_class, seed, **_in_memory(kw))


@dataclass
class FeatureData(Data):
    """A :class:`~foodlib.data.Data` whose sources are cached trunk features (see the module docstring).

    ``loader(split, shuffle=True)`` gives augmented views, ``shuffle=False`` the clean view.
    ``image_sources`` keeps the decoded images of each split, for pictures of the data (the
    TensorBoard projector's thumbnails).
    """

    image_sources: dict = field(default_factory=dict)

    def loader(self, split: str, batch_size: int, shuffle: bool, seed: int = 0, **kw) -> FeatureLoader:
        kw.setdefault("drop_last", shuffle)
        return FeatureLoader(self.sources[split], self.labels(split), batch_size, shuffle, seed, **kw)

    def balanced_loader(self, split: str, batch_size: int, samples_per_class: int, seed: int = 0,
                        **kw) -> BalancedFeatureLoader:
        return BalancedFeatureLoader(self.sources[split], self.labels(split), batch_size, samples_per_class, seed, **kw)


def with_trunk_features(data: Data, model: nn.Module, cfg, device: torch.device,
                        amp_dtype: torch.dtype | None = None, progress: bool = True) -> FeatureData:
    """``data`` with every split replaced by the frozen part's cached outputs (built when missing).

    With ``trainable="head"`` the batches are the pooled features ``(N, F)``; with ``"last:N"`` the
    maps of the frozen stages, and ``model.cut`` is set so that the model runs the rest on them.

    Args:
        data: the image data (:func:`foodlib.data.load_data`).
        model: an EmbeddingNet after :func:`~foodlib.trainable.apply_trainable` with ``head`` or ``last:N``.
        cfg: the run's Config (image_size, augment, trunk_views, cache_dir).
    """
    at, reason = cut_for_cache(model)
    if reason:
        raise ValueError(f"trainable={getattr(model, 'trainable', 'all')!r}: nothing to cache ({reason}); "
                         "set trunk_cache: false")
    if at is None:  # head
        trunk, weights = model.backbone, weights_digest(model.backbone)
    else:
        model.cut = TrunkCut(model.backbone, at)
        trunk, weights = model.cut.first, weights_digest(model.cut.first)
    norm = normalization(model)
    common = dict(trunk=trunk, image_size=cfg.data.image_size, norm=norm, device=device, amp_dtype=amp_dtype,
                  cache_dir=cfg.data.cache_dir, progress=progress, weights=weights, cut=at)
    sources = {}
    for split, source in data.sources.items():
        if len(source) == 0:
            continue
        clean = trunk_features(source=source, augment=None, views=1, desc=f"trunk {split} clean", **common)
        views = None
        if split == "train" and cfg.train.augment != "none":
            views = trunk_features(source=source, augment=cfg.train.augment, views=cfg.data.trunk_views,
                                   desc=f"trunk train x{cfg.data.trunk_views}", **common)
        sources[split] = FeatureSource(clean, views)
    return FeatureData(data.index, data.side, sources, data.bad_files, novel=data.novel, interpolation=data.interpolation,
                       image_sources=dict(data.sources))
