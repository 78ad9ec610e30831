"""Datasets: from a data spec to ready batch loaders.

``load_data(cfg)`` resolves the spec (an ImageFolder root, ``food101:ROOT``, or the embedded
``dishes`` / ``digits``), indexes it, carves a stratified val split when there is none, decodes
every image once into the cache (resampled the way the backbone's weights expect: bilinear, or
bicubic for most timm weights), drops (and lists) unreadable files, and returns the splits.

>>> data = load_data(Config.from_flat(data="dishes", image_size=64))   # doctest: +SKIP
>>> data.index.summary()                                               # doctest: +SKIP
'10 classes; train 2700, val 300, test 1000'
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from foodlib.data.augment import cache_side
from foodlib.data.balanced import BalancedBatchLoader
from foodlib.data.cache import DecodedImages, build_cache
from foodlib.data.digits import write_digits
from foodlib.data.dishes import DishesSpec, write_dishes
from foodlib.data.folders import ClassMismatchError, DatasetIndex, Split, carve_val, index_image_folder, limit_per_class
from foodlib.data.food101 import index_food101, is_food101_root
from foodlib.data.loader import BatchLoader, ImageSource
from foodlib.data.novel import NOVEL_SPLIT, hold_out_classes
from foodlib.data.scan import scan_cached
from foodlib.files import atomic_write_json, atomic_write_text, cache_folder
from foodlib.models import backbone_preprocessing

__all__ = [
    "BadFilesError", "BatchLoader", "ClassMismatchError", "EmptyClassError", "Data", "DatasetIndex", "DecodedImages", "ImageSource",
    "Split", "build_cache", "load_data", "resolve_data_root", "index_dataset", "index_dataset_and_novel",
]


class BadFilesError(ValueError):
    """Unreadable files were found and ``bad_files="fail"`` was asked for."""


@dataclass
class Data:
    """An indexed dataset with its decoded images: ``sources[split]`` gives uint8 batches."""

    index: DatasetIndex
    side: int  # stored square side; the network sees a crop of cfg.image_size
    sources: dict[str, ImageSource] = field(default_factory=dict)
    bad_files: dict[str, str] = field(default_factory=dict)  # path -> reason, dropped
    novel: DatasetIndex | None = None  # held-out classes (novel_classes): one split "novel", never trained on
    interpolation: str = "bilinear"  # the decode's resampling: the backbone's (models.Preprocessing.interpolation)

    @property
    def classes(self) -> list[str]:
        return self.index.classes

    @property
    def num_classes(self) -> int:
        return self.index.num_classes

    def labels(self, split: str) -> np.ndarray:
        if split == NOVEL_SPLIT and self.novel is not None:
            return self.novel.splits[NOVEL_SPLIT].labels  # indices into novel.classes, not classes
        return self.index.splits[split].labels

    def loader(self, split: str, batch_size: int, shuffle: bool, seed: int = 0, **kw) -> BatchLoader:
        """A :class:`BatchLoader` over one split (``drop_last`` follows ``shuffle`` unless given)."""
        kw.setdefault("drop_last", shuffle)
        return BatchLoader(self.sources[split], self.labels(split), batch_size, shuffle, seed, **kw)

    def balanced_loader(self, split: str, batch_size: int, samples_per_class: int, seed: int = 0,
                        **kw) -> BalancedBatchLoader:
        """A :class:`~foodlib.data.balanced.BalancedBatchLoader` over one split (pair / triplet losses)."""
        return BalancedBatchLoader(self.sources[split], self.labels(split), batch_size, samples_per_class, seed=seed,
                                   **kw)


def resolve_data_root(spec: str, cfg=None) -> tuple[str, Path]:
    """Turn a data spec into (kind, root). Embedded datasets are generated on first use (offline)."""
    cache_dir = cache_folder(cfg.data.cache_dir if cfg is not None else None)
    if spec == "dishes":
        kw = {}
        if cfg is not None:
            kw = dict(num_classes=cfg.data.dishes_classes, train_per_class=cfg.data.dishes_per_class,
                      test_per_class=max(1, cfg.data.dishes_per_class // 3))
            kw.update({k: getattr(cfg.data, k) for k in ("intra", "inter") if getattr(cfg.data, k) is not None})
        spec_obj = DishesSpec(**kw)
        return "imagefolder", Path(write_dishes(cache_dir / f"dishes-{spec_obj.digest()}", spec_obj, progress=False))
    if spec == "digits":
        return "imagefolder", Path(write_digits(cache_dir / "digits"))
    if spec.startswith("food101:"):
        return "food101", Path(spec.split(":", 1)[1]).expanduser()
    root = Path(spec).expanduser()
    if not root.exists():
        raise FileNotFoundError(
            f"data={spec!r}: no such folder. Pass an ImageFolder root (train/<class>/...), "
            "food101:ROOT, or one of the embedded datasets 'dishes', 'digits'."
        )
    return ("food101" if is_food101_root(root) else "imagefolder"), root


def index_dataset(cfg) -> DatasetIndex:
    """Index the configured data, limit train per class, and carve val (deterministic in split_seed).

    With ``novel_classes`` set, the held-out classes are gone from this index (see
    :func:`index_dataset_and_novel` for their pool).
    """
    return index_dataset_and_novel(cfg)[0]


def index_dataset_and_novel(cfg) -> tuple[DatasetIndex, DatasetIndex | None]:
    """The known classes' index (as :func:`index_dataset`) and the held-out classes' pool (None without them)."""
    kind, root = resolve_data_root(cfg.data.data, cfg)
    index = index_food101(root) if kind == "food101" else index_image_folder(root)
    novel = None
    novel_classes = getattr(cfg.data, "novel_classes", None)
    if novel_classes is not None:  # before limiting and carving val: held-out classes never reach train or val
        index, novel = hold_out_classes(index, novel_classes, cfg.data.split_seed)
    if cfg.data.limit_per_class:
        splits = dict(index.splits)
        splits["train"] = limit_per_class(splits["train"], cfg.data.limit_per_class, cfg.data.split_seed)
        index = DatasetIndex(index.root, index.classes, splits)
    return carve_val(index, cfg.data.val_fraction, cfg.data.split_seed), novel


def load_data(cfg, run_dir: str | Path | None = None, progress: bool = True, splits: tuple[str, ...] | None = None
              ) -> Data:
    """Index, decode (once, cached) and check the configured data; list skipped files in ``run_dir``.

    ``splits`` keeps only those splits (e.g. ``("train", "val")`` while tuning): the others' files
    are never opened, not even to decode them into the cache. Images are resized with the
    resampling of ``cfg.model.backbone``'s weights (:func:`foodlib.models.backbone_preprocessing`).

    Raises:
        BadFilesError: unreadable files with ``bad_files="fail"`` (the message lists them).
        EmptyClassError: a class has no usable training image.
    """
    index, novel = index_dataset_and_novel(cfg)
    if splits is not None:  # e.g. tuning: the other splits' files are never opened
        index = DatasetIndex(index.root, index.classes, {k: v for k, v in index.splits.items() if k in splits})
        novel = novel if NOVEL_SPLIT in splits else None
    side = cache_side(cfg.data.image_size)
    interpolation = backbone_preprocessing(cfg.model.backbone).interpolation  # "bilinear" or "bicubic"
    all_paths = sorted({p for part in (index, novel) if part is not None for split in part.splits.values()
                        for p in split.paths})
    if cfg.data.cache:
        decoded = build_cache(all_paths, side, cfg.data.cache_dir, progress=progress, interpolation=interpolation)
        errors = dict(decoded.errors)
    else:
        decoded = None
        errors = _decode_check(all_paths, cfg, progress)

    if errors and cfg.data.bad_files == "fail":
        listing = "\n".join(f"  {p}: {why}" for p, why in sorted(errors.items()))
        raise BadFilesError(
            f"{len(errors)} unreadable image file(s):\n{listing}\n"
            "Fix or remove them, or set bad_files='skip' to train without them."
        )
    if errors:
        index = index.drop(set(errors))
        novel = novel.drop(set(errors)) if novel is not None else None
    _check_every_class_trains(index, errors)
    if run_dir is not None:
        _write_run_files(Path(run_dir), index, errors, novel)

    rows = {p: i for i, p in enumerate(all_paths)}
    sources = {}
    for name, split in index.splits.items():
        split_rows = np.asarray([rows[p] for p in split.paths], dtype=np.int64)
        sources[name] = ImageSource(split.paths, side, decoded, split_rows if decoded is not None else None,
                                    interpolation)
        if run_dir is not None and decoded is None:
            sources[name].skip_log = str(Path(run_dir) / "bad_files.txt")  # files that vanish mid-run
    if novel is not None:
        pool = novel.splits[NOVEL_SPLIT]
        pool_rows = np.asarray([rows[p] for p in pool.paths], dtype=np.int64)
        sources[NOVEL_SPLIT] = ImageSource(pool.paths, side, decoded, pool_rows if decoded is not None else None,
                                           interpolation)
    return Data(index, side, sources, errors, novel, interpolation)


class EmptyClassError(ValueError):
    """A class has no usable training image: it would train as a dead class."""


def _check_every_class_trains(index: DatasetIndex, errors: dict[str, str]) -> None:
    """Refuse a class without a usable training image (torchvision's ImageFolder refuses it too)."""
    counts = np.bincount(index.splits["train"].labels, minlength=index.num_classes)
    empty = [index.classes[c] for c in np.flatnonzero(counts == 0)]
    if empty:
        why = " (its files are unreadable: see the list of bad files)" if errors else ""
        raise EmptyClassError(
            f"class(es) {empty[:10]} of {index.root} have no usable training image{why}; every class needs one: "
            "add images to the class folder, or remove the folder"
        )


def _decode_check(paths: list[str], cfg, progress: bool) -> dict[str, str]:
    """Without the cache, find unreadable files up front with the (cached) scan, not at epoch 17."""
    kind, root = resolve_data_root(cfg.data.data, cfg)
    scan_root = root / "images" if kind == "food101" else root  # Food-101 keeps its images in images/<class>/
    report = scan_cached(scan_root, cache_folder(cfg.data.cache_dir) / "scans", progress=progress)
    wanted = set(paths)
    return {p: why for p, why in _report_errors(report).items() if p in wanted}


def _report_errors(report) -> dict[str, str]:
    """Unusable files of a scan report as {absolute path: "kind: detail"}, in the index's path form.

    The report names files relative to its root; the index joins names to the *resolved* root, so
    the root is resolved here too (a dataset reached through a symlinked folder still matches).
    Folder-level errors (an empty class folder) match no file and drop out in the caller.
    """
    root = Path(report.root).resolve()
    return {str(root / problem.path): f"{problem.kind}: {problem.detail}"
            for problem in report.errors if problem.path}


def _write_run_files(run_dir: Path, index: DatasetIndex, errors: dict[str, str],
                     novel: DatasetIndex | None = None) -> None:
    index.write_split_files(run_dir)
    atomic_write_json(run_dir / "classes.json", index.classes)
    if novel is not None:  # splits/novel.txt (path<TAB>class) and the held-out class names
        novel.write_split_files(run_dir)
        atomic_write_json(run_dir / "novel_classes.json", novel.classes)
    if errors:
        atomic_write_text(run_dir / "bad_files.txt", "".join(f"{p}\t{why}\n" for p, why in sorted(errors.items())))
