"""Batches of images for training and evaluation: :class:`ImageSource` and :class:`BatchLoader`.

An :class:`ImageSource` gives uint8 batches ``(B, S, S, 3)`` for row indices, read from the decoded
cache (:mod:`foodlib.data.cache`) or decoded on the fly; a :class:`BatchLoader` walks a split in a
reproducible (seed, epoch) order, optionally in worker processes and across DDP ranks.

>>> source = ImageSource(paths, 73, build_cache(paths, side=73))               # doctest: +SKIP
>>> loader = BatchLoader(source, labels, batch_size=64, shuffle=True, seed=0)  # doctest: +SKIP
>>> images, labels = next(iter(loader))                # (64, 73, 73, 3) uint8, (64,) int64  # doctest: +SKIP
"""
from __future__ import annotations

import warnings
from typing import Iterator, Sequence

import numpy as np
import torch

from foodlib.data.cache import DecodedImages, mark_used
from foodlib.data.images import ImageDecodeError, load_image_array


class ImageSource:
    """Gives uint8 batches ``(B, S, S, 3)`` for row indices: from the cache, or decoded on the fly.

    ``interpolation`` is the decode's resampling (the backbone's, ``"bilinear"`` or ``"bicubic"``):
    the cache was built with it, an uncached source decodes with it.
    """

    def __init__(self, paths: Sequence[str], side: int, cached: DecodedImages | None = None, rows=None,
                 interpolation: str = "bilinear"):
        self.paths = list(paths)
        self.side = side
        self.interpolation = interpolation
        self._file = cached.file if cached is not None else None
        self._shape = cached.array.shape if cached is not None else None
        self._rows = np.asarray(rows if rows is not None else np.arange(len(self.paths)), dtype=np.int64)
        self._array = cached.array if cached is not None else None

    def __len__(self) -> int:
        return len(self.paths)

    def mark_used(self) -> None:
        """Refresh the cache's last-use time, which keeps `foodlib cache --prune` off it (see foodlib.data.cache)."""
        if self._file is not None:
            mark_used(self._file)

    def __getstate__(self):  # workers reopen the memmap instead of pickling gigabytes
        state = dict(self.__dict__)
        state["_array"] = None
        return state

    #: where files that became unreadable during the run are appended (path<TAB>reason), if set
    skip_log: str | None = None

    def get_batch(self, indices: np.ndarray) -> np.ndarray:
        if self._shape is None:  # uncached: the same decode path the cache uses
            return np.stack([load_image_array(self.paths[i], self.side, self.interpolation) for i in indices])
        if self._array is None:
            self._array = np.memmap(self._file, dtype=np.uint8, mode="r", shape=self._shape)
        return self._array[self._rows[np.asarray(indices)]]  # (B, S, S, 3), a copy

    def get_batch_skipping(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(images (B', S, S, 3), kept positions (B',))``: without the cache, a file deleted or damaged
        since the run started is skipped with a warning (and listed in ``skip_log``), not fatal."""
        if self._shape is not None:
            return self.get_batch(indices), np.arange(len(indices))
        images, kept = [], []
        for position, i in enumerate(indices):
            try:
                images.append(load_image_array(self.paths[i], self.side, self.interpolation))
                kept.append(position)
            except (OSError, ImageDecodeError) as error:  # deleted, unreadable, or rewritten badly mid-run
                reason = getattr(error, "reason", None) or f"{type(error).__name__}: {error.strerror or error}" \
                    if isinstance(error, OSError) else str(error)
                self._record_skip(self.paths[i], reason)
        empty = np.zeros((0, self.side, self.side, 3), np.uint8)
        return (np.stack(images) if images else empty), np.asarray(kept, dtype=np.int64)

    def _record_skip(self, path: str, reason: str) -> None:
        warnings.warn(f"{path}: {reason}; skipped (it changed or vanished since the run started)", stacklevel=3)
        if self.skip_log:
            with open(self.skip_log, "a") as log:  # one short line per append: whole lines, even from workers
                log.write(f"{path}\tduring training: {reason}\n")


class _Batches(torch.utils.data.Dataset):
    def __init__(self, source: ImageSource, labels: np.ndarray):
        self.source, self.labels = source, labels

    def __getitem__(self, indices):
        array, kept = self.source.get_batch_skipping(indices)
        images = torch.from_numpy(np.ascontiguousarray(array))
        return images, torch.from_numpy(self.labels[indices][kept])

    def __len__(self):
        return len(self.labels)


class BatchLoader:
    """Batches of (uint8 images ``(B, S, S, 3)``, labels ``(B,)``) in a reproducible order.

    Shuffling depends only on (seed, epoch): resuming at an epoch boundary replays the same
    batches. With ``world_size > 1`` every rank takes its slice ``[rank::world_size]`` of each
    global batch, so K processes see exactly the global batches one process would.

    Args:
        batch_size: the global batch size.
        drop_last: drop the final incomplete batch (training), keep it (evaluation).
        workers: worker processes gathering batches (0: in the main process).
    """

    def __init__(
        self,
        source: ImageSource,
        labels: np.ndarray,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        workers: int = 0,
        pin_memory: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.source, self.labels = source, np.asarray(labels, dtype=np.int64)
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._loader = torch.utils.data.DataLoader(
            _Batches(source, self.labels), sampler=_EpochBatches(self), batch_size=None,
            num_workers=workers, pin_memory=pin_memory,
            # not persistent: a live iterator copied into a later loader's forked workers breaks their shutdown
            persistent_workers=False,
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[np.ndarray]:
        """This rank's index arrays for the current epoch."""
        n = len(self.labels)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(n)
        else:
            order = np.arange(n)
        stop = n - n % self.batch_size if self.drop_last else n
        out = []
        for start in range(0, stop, self.batch_size):
            part = order[start : start + self.batch_size][self.rank :: self.world_size]
            if len(part):
                out.append(part)
        return out

    def __len__(self) -> int:
        return len(self.batches())

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if isinstance(self.source, ImageSource):
            self.source.mark_used()  # once an epoch: a long training keeps its cache "recently used"
        return iter(self._loader)


class _EpochBatches(torch.utils.data.Sampler):
    def __init__(self, loader: BatchLoader):
        self.loader = loader

    def __iter__(self):
        return iter(self.loader.batches())

    def __len__(self):
        return len(self.loader.batches())
