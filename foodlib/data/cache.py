"""Decoded-image cache and the batch loader that reads it.

JPEG decoding is what bound the user's earlier ResNet-18 study (README: about 230 images/s on a GPU). Here every image is
decoded and resized once into a uint8 memory-mapped array ``(N, S, S, 3)``, reused across epochs,
runs and notebooks. The cache is keyed by the file list, each file's size, mtime and ctime, the
stored side S and the decode version, so any change rebuilds it: a stale cache is never reused.

>>> images = build_cache(paths, side=73, cache_dir="~/.cache/foodlib")     # doctest: +SKIP
>>> images.array.shape, images.errors                                        # doctest: +SKIP
((5000, 73, 73, 3), {})
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from foodlib.io import (atomic_write_json, atomic_write_text, cache_home, check_free_space, lock_file, no_space_error,
                        read_json_or_none, unlock_file)
from foodlib.messages import logger
from foodlib.data.checksum import block_checksums, first_bad_block
from foodlib.data.images import ImageDecodeError, load_image_array

CACHE_VERSION = 1  # bump when the decode / resize path changes


def default_cache_dir() -> Path:
    return cache_home()


def cache_key(paths: Sequence[str], side: int) -> str:
    """Hash of (path, size, mtime, ctime) of every file plus the stored side and decode version.

    The inode change time (ctime) joins size and mtime because a rewrite that keeps the size and
    restores the mtime (``cp -p``, ``rsync -a``, ``touch -d``) would otherwise reuse stale pixels; the
    kernel sets ctime on every write and nothing can set it back. The cost is a rebuild after a
    metadata-only change (chmod, chown), which is the safe direction.
    """
    digest = hashlib.sha1(f"v{CACHE_VERSION}:{side}\n".encode())
    for path in paths:
        st = os.stat(path)
        digest.update(f"{path}\t{st.st_size}\t{st.st_mtime_ns}\t{st.st_ctime_ns}\n".encode())
    return digest.hexdigest()[:20]


@dataclass
class DecodedImages:
    """Decoded images of ``paths`` in order: ``array`` (N, S, S, 3) uint8, unreadable files in ``errors``."""

    paths: list[str]
    array: np.ndarray
    errors: dict[str, str] = field(default_factory=dict)
    file: str | None = None  # the memory-mapped file, for workers to reopen

    @property
    def side(self) -> int:
        return int(self.array.shape[1])

    def rows(self) -> dict[str, int]:
        return {p: i for i, p in enumerate(self.paths)}


@contextmanager
def _locked(lock_path: Path):
    """An exclusive file lock, so two processes (DDP ranks, parallel notebooks) never build one cache twice."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    handle = lock_file(lock_path, fcntl.LOCK_EX)
    try:
        yield
    finally:
        unlock_file(handle)


_IN_USE: dict[str, object] = {}  # "<folder>/<key>" -> open handle holding a shared lock on <key>.use


def _mark_in_use(folder: Path, key: str) -> None:
    """Keep a shared lock on ``key.use`` until this process exits: prune_caches() skips caches in use.

    Held for the life of the process (a notebook kernel keeps its data until restarted), shared by
    forked loader workers; the OS drops it when the process ends, killed or not. Taken again if the
    file was removed meanwhile (a deleted cache folder rebuilt in the same kernel).
    """
    name, path = str(folder / key), folder / f"{key}.use"
    held = _IN_USE.get(name)
    if held is not None:
        try:
            if os.fstat(held.fileno()).st_ino == os.stat(path).st_ino:
                return
        except FileNotFoundError:
            pass
        unlock_file(_IN_USE.pop(name))
    try:
        _IN_USE[name] = lock_file(path, fcntl.LOCK_SH)
    except OSError:  # a read-only cache folder: nobody can prune it either
        pass


def held_in_this_process(folder: Path, key: str) -> bool:
    return str(folder / key) in _IN_USE


def build_cache(
    paths: Sequence[str],
    side: int,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> DecodedImages:
    """Decode + resize (short side, center square) every file once; reuse the result if it is current.

    Unreadable files are recorded in ``errors`` (path -> reason) and stored as black images; the
    caller drops them (``bad_files="skip"``) or stops (``"fail"``). Decoding runs in threads
    (PIL releases the GIL while decoding and resizing).
    """
    paths = list(paths)
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    folder = folder / "decoded"
    key = cache_key(paths, side)
    data_file, meta_file = folder / f"{key}.u8", folder / f"{key}.json"
    shape = (len(paths), side, side, 3)

    with _locked(folder / f"{key}.lock"):
        reusable = meta_file.is_file() and data_file.is_file() and data_file.stat().st_size == int(np.prod(shape))
        if reusable:
            meta = read_json_or_none(meta_file)
            problem = _damage(data_file, meta_file, meta)  # same size says nothing about the bytes
            if problem is not None:
                warnings.warn(f"decoded cache {data_file} {problem}; rebuilding it", stacklevel=2)
                reusable = False
        if reusable:
            try:
                os.utime(meta_file)  # "last used", for `foodlib cache` and prune_caches(older_than_days=...)
            except OSError:
                pass
            array = np.memmap(data_file, dtype=np.uint8, mode="r", shape=shape)
            _mark_in_use(folder, key)
            return DecodedImages(paths, array, meta.get("errors", {}), str(data_file))
        if progress:
            _mention_other_caches(folder, key, paths)

        tmp_file = data_file.with_suffix(".u8.tmp")
        errors = _decode_into(tmp_file, paths, side, workers, progress)
        blocks = block_checksums(tmp_file)  # read back from the page cache: what first use will compare
        meta_file.unlink(missing_ok=True)  # never a new .u8 beside the old checksums (a kill between the two writes)
        os.replace(tmp_file, data_file)
        atomic_write_text(folder / f"{key}.paths", "".join(f"{p}\n" for p in paths))  # for `foodlib cache`
        atomic_write_json(meta_file, {"side": side, "n": len(paths), "errors": errors, "version": CACHE_VERSION,
                                      "root": source_root(paths), "built": time.strftime("%Y-%m-%d %H:%M:%S"),
                                      "blocks": blocks})
        _VERIFIED.add(_identity(data_file))
        array = np.memmap(data_file, dtype=np.uint8, mode="r", shape=shape)
        _mark_in_use(folder, key)
        return DecodedImages(paths, array, errors, str(data_file))


_VERIFIED: set[tuple] = set()  # caches whose checksums this process has compared (first use only)


def _identity(data_file: Path) -> tuple:
    st = data_file.stat()
    return str(data_file), st.st_ino, st.st_size, st.st_mtime_ns


def _damage(data_file: Path, meta_file: Path, meta) -> str | None:
    """Why the cache in ``data_file`` cannot be trusted, or None; checksums compared once per process."""
    if not isinstance(meta, dict):
        return f"has unreadable metadata ({meta_file} is not a JSON object)"
    identity = _identity(data_file)
    if identity in _VERIFIED:
        return None
    try:
        bad = first_bad_block(data_file, meta.get("blocks"))
    except ValueError:
        return "has no block checksums (built by an older foodlib), so it cannot be verified"
    if bad is not None:
        n = len(meta["blocks"]["sums"])
        return (f"is corrupt: block {bad + 1} of {n} ({meta['blocks']['block_bytes'] // 2**20} MiB each) differs "
                "from the checksum recorded when it was built")
    _VERIFIED.add(identity)
    return None


def _preallocate(file: Path, size: int) -> None:
    """Reserve the cache file's blocks before writing through a memory map.

    A memory-mapped write to a sparse file on a full disk kills the process with SIGBUS (exit 135,
    no message); with the blocks reserved first, a full disk is an ENOSPC here, named in one line.
    """
    need, what = size + 2**20, "the decoded image cache (or set cache_dir to another disk, or cache=False)"
    check_free_space(file.parent, need, what)
    with open(file, "wb") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, size) if size else None
        except OSError as error:
            if error.errno == errno.ENOSPC:
                f.close()
                file.unlink(missing_ok=True)
                raise no_space_error(file.parent, need, what) from None
            if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            f.truncate(size)  # a file system without fallocate: sparse, as before
        except AttributeError:  # no posix_fallocate (macOS, Windows)
            f.truncate(size)


def _decode_into(file: Path, paths: list[str], side: int, workers: int | None, progress: bool) -> dict[str, str]:
    """Decode ``paths`` into a new memory-mapped ``file`` (N, side, side, 3), in threads; unreadable files -> errors."""
    from tqdm import tqdm  # text bars: saved in executed notebooks, unlike widgets

    _preallocate(file, len(paths) * side * side * 3)
    out = np.memmap(file, dtype=np.uint8, mode="r+", shape=(len(paths), side, side, 3))
    errors: dict[str, str] = {}

    def decode(i: int) -> None:
        try:
            out[i] = load_image_array(paths[i], side)
        except ImageDecodeError as error:
            errors[paths[i]] = error.reason if hasattr(error, "reason") else str(error)
            out[i] = 0

    n_threads = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(n_threads) as pool:
        for _ in tqdm(
            pool.map(decode, range(len(paths)), chunksize=16) if n_threads > 1 else map(decode, range(len(paths))),
            total=len(paths), desc=f"decoding {len(paths)} images to {side}px", disable=not progress, leave=False,
        ):
            pass
    out.flush()
    return errors


def source_root(paths: Sequence[str]) -> str | None:
    """The folder all ``paths`` live under (what `foodlib cache` shows as a cache's source)."""
    try:
        return os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths]) if paths else None
    except ValueError:  # paths on different drives (Windows)
        return None


def format_size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def _mention_other_caches(folder: Path, key: str, paths: Sequence[str]) -> None:
    """Before a build, say how much disk older caches of the same data take, and how to free it."""
    root = source_root(paths)
    others = []
    for meta_file in folder.glob("*.json"):
        meta = read_json_or_none(meta_file)
        if meta_file.stem != key and isinstance(meta, dict) and meta.get("root") == root:
            try:
                others.append(meta_file.with_suffix(".u8").stat().st_size)
            except FileNotFoundError:  # removed meanwhile by a prune
                pass
    if others:
        logger.info(f"{len(others)} other decoded cache(s) of {root} take {format_size(sum(others))} in {folder}: "
                    "`foodlib cache` lists them, `foodlib cache --prune` removes those whose files changed")


class ImageSource:
    """Gives uint8 batches ``(B, S, S, 3)`` for row indices: from the cache, or decoded on the fly."""

    def __init__(self, paths: Sequence[str], side: int, cached: DecodedImages | None = None, rows=None):
        self.paths = list(paths)
        self.side = side
        self._file = cached.file if cached is not None else None
        self._shape = cached.array.shape if cached is not None else None
        self._rows = np.asarray(rows if rows is not None else np.arange(len(self.paths)), dtype=np.int64)
        self._array = cached.array if cached is not None else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getstate__(self):  # workers reopen the memmap instead of pickling gigabytes
        state = dict(self.__dict__)
        state["_array"] = None
        return state

    #: where files that became unreadable during the run are appended (path<TAB>reason), if set
    skip_log: str | None = None

    def get_batch(self, indices: np.ndarray) -> np.ndarray:
        if self._shape is None:  # uncached: the same decode path the cache uses
            return np.stack([load_image_array(self.paths[i], self.side) for i in indices])
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
                images.append(load_image_array(self.paths[i], self.side))
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
        return iter(self._loader)


class _EpochBatches(torch.utils.data.Sampler):
    def __init__(self, loader: BatchLoader):
        self.loader = loader

    def __iter__(self):
        return iter(self.loader.batches())

    def __len__(self):
        return len(self.loader.batches())
