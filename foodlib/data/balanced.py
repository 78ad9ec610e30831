"""Class-balanced batches: ``m`` images of each of ``batch_size / m`` classes, for pair and triplet losses.

A pair or triplet loss learns only from the positives inside a batch. With 59 dishes and a
shuffled batch of 64 most anchors have none, so such losses ask for ``m`` images per class
(``PMLLoss.samples_per_class``, or the config's ``samples_per_class``) and ``fit()`` builds this
loader instead of the plain shuffled one.

>>> labels = np.repeat(np.arange(5), 8)                      # 5 classes, 8 images each
>>> loader = BalancedBatchLoader(None, labels, batch_size=8, samples_per_class=4)
>>> [sorted(set(np.bincount(labels[b]).tolist()) - {0}) for b in loader.batches()]  # images per class present
[[4], [4], [4], [4], [4]]
"""
from __future__ import annotations

import numpy as np

from foodlib.data.loader import BatchLoader

#: salt of the balanced loader's random stream, so it differs from the plain loader's for the same (seed, epoch)
_STREAM = 0xBA1A


class BalancedBatchLoader(BatchLoader):
    """Training batches of ``samples_per_class`` images from each of ``batch_size / samples_per_class`` classes.

    Each global batch is a list of class blocks (``m`` images of one class). Classes are drawn
    uniformly (a class-balanced sampler: rare classes are seen as often as common ones), without
    repeats inside a batch while the batch needs no more classes than exist; with more blocks
    than classes every class appears ``blocks // C`` times and the rest are drawn without repeats.
    The images of each class are taken in a shuffled order and reshuffled when used up, so each
    epoch goes through every class's images before any repeats; a class with fewer than ``m``
    images repeats some in its block.

    An epoch has ``len(labels) // batch_size`` batches, as many as the plain training loader
    (``drop_last``). The order depends only on (seed, epoch), so resume replays it.

    Under DDP (``world_size > 1``) rank ``r`` takes blocks ``r, r + K, r + 2K, ...`` of each global
    batch: the ranks' shares are disjoint, together they are the global batch, and every rank
    still sees ``m`` images of each of its classes (a pair loss finds its positives locally).

    Args:
        source: the split's :class:`~foodlib.data.loader.ImageSource`.
        labels: class index of each image ``(n,)``.
        batch_size: the global batch size; a multiple of ``samples_per_class * world_size``.
        samples_per_class: ``m``, at least 2 for pairs to exist.
        seed, workers, pin_memory, rank, world_size: as for :class:`~foodlib.data.loader.BatchLoader`.

    Raises:
        ValueError: a batch size that does not split into blocks of ``m`` per rank, or ``m < 2``.
    """

    def __init__(self, source, labels, batch_size: int, samples_per_class: int, seed: int = 0, workers: int = 0,
                 pin_memory: bool = False, rank: int = 0, world_size: int = 1, **_ignored):
        if isinstance(samples_per_class, bool) or not isinstance(samples_per_class, (int, np.integer)) \
                or samples_per_class < 2:
            raise ValueError(f"samples_per_class={samples_per_class!r} must be an integer >= 2 (a class needs two "
                             "images in a batch to form a pair); use 0 for plain shuffled batches")
        if batch_size % (samples_per_class * world_size):
            raise ValueError(
                f"batch_size={batch_size} must be a multiple of samples_per_class * processes = "
                f"{samples_per_class} * {world_size} = {samples_per_class * world_size} for class-balanced batches; "
                f"use e.g. batch_size={max(1, batch_size // (samples_per_class * world_size)) * samples_per_class * world_size}"
            )
        self.samples_per_class = int(samples_per_class)
        super().__init__(source, labels, batch_size, shuffle=True, seed=seed, drop_last=True, workers=workers,
                         pin_memory=pin_memory, rank=rank, world_size=world_size)

    def __len__(self) -> int:
        return len(self.labels) // self.batch_size

    def global_batches(self) -> list[list[np.ndarray]]:
        """Every global batch of this epoch as its list of class blocks (index arrays of length m)."""
        rng = np.random.default_rng([self.seed, self.epoch, _STREAM])
        classes = np.unique(self.labels)
        pools = {c: np.flatnonzero(self.labels == c) for c in classes.tolist()}
        orders = {c: rng.permutation(pool) for c, pool in pools.items()}
        positions = dict.fromkeys(pools, 0)
        m, blocks_per_batch = self.samples_per_class, self.batch_size // self.samples_per_class
        repeats, rest = divmod(blocks_per_batch, len(classes))
        batches = []
        for _ in range(len(self)):
            chosen = np.concatenate([np.tile(classes, repeats), rng.choice(classes, rest, replace=False)])
            rng.shuffle(chosen)
            blocks = []
            for c in chosen.tolist():
                block = []
                while len(block) < m:  # next images of class c, reshuffling its pool when used up
                    if positions[c] == len(orders[c]):
                        orders[c], positions[c] = rng.permutation(pools[c]), 0
                    take = min(m - len(block), len(orders[c]) - positions[c])
                    block.extend(orders[c][positions[c]:positions[c] + take].tolist())
                    positions[c] += take
                blocks.append(np.asarray(block, dtype=np.int64))
            batches.append(blocks)
        return batches

    def batches(self) -> list[np.ndarray]:
        """This rank's index arrays for the current epoch: its blocks of each global batch."""
        return [np.concatenate(blocks[self.rank::self.world_size]) for blocks in self.global_batches()]
