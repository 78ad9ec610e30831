"""The decoded-image cache: its key, building it, listing and pruning (`foodlib cache`).

Every image is decoded and resized once into a uint8 memory-mapped array ``(N, S, S, 3)``, reused
across epochs, runs and notebooks (:mod:`foodlib.data.loader` reads batches from it). The key covers
the file list, each file's size, mtime and ctime, the side S, the resampling (bilinear or bicubic,
the backbone's) and the decode version: any change
makes a new cache, a stale one is never reused. In ``<cache folder>/decoded/``, per cache:
``<key>.u8`` (pixels; ``.u8.tmp`` while building), ``<key>.json`` (written last, so it marks a
finished build; its mtime is the last use, set on every open and epoch), ``<key>.paths`` (the file
list, to tell later whether it is current) and ``<key>.lock`` (a ``filelock`` held while building or
opening: two processes never build one cache twice, prune never removes one mid-build).

Prune rule (:func:`prunable`): unfinished builds whose lock is free; stale or corrupt caches unused
for an hour; with ``older_than_days``, any cache unused that long. No "in use" locks: a process
reading a cache keeps its data after a prune (a memory map outlives the file; Windows refuses to
delete a mapped file), and the hour, refreshed each epoch, covers loader workers that reopen it by
name (spawned workers: macOS, Windows).

>>> images = build_cache(paths, side=73, cache_dir="~/.cache/foodlib")     # doctest: +SKIP
>>> images.array.shape, images.errors                                        # doctest: +SKIP
((5000, 73, 73, 3), {})
>>> for entry in list_caches(): print(entry.key, entry.state, entry.size_bytes)   # doctest: +SKIP
>>> removed = prune_caches(older_than_days=30)                                     # doctest: +SKIP
"""
from __future__ import annotations

import errno
import hashlib
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from filelock import FileLock

from foodlib.data.checksum import block_checksums, first_bad_block
from foodlib.data.images import ImageDecodeError, load_image_array, resampling_filter
from foodlib.files import (atomic_write_json, atomic_write_text, cache_folder, check_free_space, no_space_error,
                        read_json_or_none)
from foodlib.messages import logger

CACHE_VERSION = 1  # bump when the decode / resize path changes
RECENT_USE_S = 3600  # a stale or corrupt cache used this recently is kept by prune (a process may still read it)
SUFFIXES = (".u8", ".u8.tmp", ".json", ".paths", ".use", ".lock")  # ".use": left by older foodlib versions


def decoded_folder(cache_dir: str | Path | None = None) -> Path:
    """``<cache folder>/decoded``, where the decoded caches live."""
    return cache_folder(cache_dir) / "decoded"


def build_lock(lock_path: Path) -> FileLock:
    """The exclusive lock a cache is built (or opened) under; ``with build_lock(path):`` waits for it."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(lock_path))


def cache_key(paths: Sequence[str], side: int, interpolation: str = "bilinear") -> str:
    """Hash of (path, size, mtime, ctime) of every file plus the stored side, resampling and decode version.

    A bilinear cache hashes as it did before the resampling joined the key (caches built by older
    foodlib versions stay valid); any other resampling adds its name, so a bicubic cache is never
    taken for a bilinear one or the other way round.

    The inode change time (ctime) joins size and mtime because a rewrite that keeps the size and
    restores the mtime (``cp -p``, ``rsync -a``, ``touch -d``) would otherwise reuse stale pixels; the
    kernel sets ctime on every write and nothing can set it back. The cost is a rebuild after a
    metadata-only change (chmod, chown), which is the safe direction.
    """
    resampling = "" if interpolation == "bilinear" else f":{interpolation}"
    digest = hashlib.sha1(f"v{CACHE_VERSION}:{side}{resampling}\n".encode())
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


def build_cache(
    paths: Sequence[str],
    side: int,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    progress: bool = True,
    interpolation: str = "bilinear",
) -> DecodedImages:
    """Decode + resize (short side, center square) every file once; reuse the result if it is current.

    ``interpolation`` is the resize's resampling, ``"bilinear"`` or ``"bicubic"`` (the backbone's:
    :attr:`foodlib.models.Preprocessing.interpolation`); it is part of the cache's key.

    Unreadable files are recorded in ``errors`` (path -> reason) and stored as black images; the
    caller drops them (``bad_files="skip"``) or stops (``"fail"``). Decoding runs in threads
    (PIL releases the GIL while decoding and resizing).
    """
    paths = list(paths)
    folder = decoded_folder(cache_dir)
    resampling_filter(interpolation)  # an unknown resampling fails here, before any lock or file
    key = cache_key(paths, side, interpolation)
    data_file, meta_file = folder / f"{key}.u8", folder / f"{key}.json"
    shape = (len(paths), side, side, 3)

    with build_lock(folder / f"{key}.lock"):
        reusable = meta_file.is_file() and data_file.is_file() and data_file.stat().st_size == int(np.prod(shape))
        if reusable:
            meta = read_json_or_none(meta_file)
            problem = _damage(data_file, meta_file, meta)  # same size says nothing about the bytes
            if problem is not None:
                warnings.warn(f"decoded cache {data_file} {problem}; rebuilding it", stacklevel=2)
                reusable = False
        if reusable:
            mark_used(data_file)
            array = np.memmap(data_file, dtype=np.uint8, mode="r", shape=shape)
            return DecodedImages(paths, array, meta.get("errors", {}), str(data_file))
        if progress:
            _mention_other_caches(folder, key, paths)

        tmp_file = data_file.with_suffix(".u8.tmp")
        errors = _decode_into(tmp_file, paths, side, workers, progress, interpolation)
        blocks = block_checksums(tmp_file)  # read back from the page cache: what first use will compare
        meta_file.unlink(missing_ok=True)  # never a new .u8 beside the old checksums (a kill between the two writes)
        os.replace(tmp_file, data_file)
        atomic_write_text(folder / f"{key}.paths", "".join(f"{p}\n" for p in paths))  # for `foodlib cache`
        atomic_write_json(meta_file, {"side": side, "interpolation": interpolation, "n": len(paths), "errors": errors,
                                      "version": CACHE_VERSION, "root": source_root(paths),
                                      "built": time.strftime("%Y-%m-%d %H:%M:%S"), "blocks": blocks})
        _VERIFIED.add(_identity(data_file))
        array = np.memmap(data_file, dtype=np.uint8, mode="r", shape=shape)
        return DecodedImages(paths, array, errors, str(data_file))


def mark_used(data_file: str | Path) -> None:
    """Set the cache's last use (its ``.json`` mtime) to now: listed by `foodlib cache`, read by prune."""
    try:
        os.utime(Path(data_file).with_suffix(".json"))
    except OSError:  # removed meanwhile, or a read-only cache folder
        pass


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


def _decode_into(file: Path, paths: list[str], side: int, workers: int | None, progress: bool,
                 interpolation: str = "bilinear") -> dict[str, str]:
    """Decode ``paths`` into a new memory-mapped ``file`` (N, side, side, 3), in threads; unreadable files -> errors."""
    from tqdm import tqdm  # text bars: saved in executed notebooks, unlike widgets

    _preallocate(file, len(paths) * side * side * 3)
    out = np.memmap(file, dtype=np.uint8, mode="r+", shape=(len(paths), side, side, 3))
    errors: dict[str, str] = {}
    resampling = {} if interpolation == "bilinear" else {"interpolation": interpolation}  # default: (path, side)

    def decode(i: int) -> None:
        try:
            out[i] = load_image_array(paths[i], side, **resampling)
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
                    "`foodlib cache` lists them, `foodlib cache --prune` removes those whose files changed "
                    "once unused for an hour")


# ----- listing and pruning (`foodlib cache`) --------------------------------------------------------

@dataclass
class CacheEntry:
    """One decoded cache.

    ``state``: ``current`` (matches its files), ``stale`` (files changed or some gone), ``unknown`` (cannot
    be checked: no file list, relative paths, or none of its files reachable), ``incomplete`` (a build
    that did not finish, or one running now), ``corrupt`` (its bytes differ from the block checksums of
    its build, or its metadata is unreadable). ``building``: a process holds its lock now (building it,
    or opening it for a moment). ``last_used``: the ``.json`` file's mtime, None without one.
    """

    key: str
    folder: Path
    state: str
    detail: str
    size_bytes: int
    images: int | None = None
    side: int | None = None
    root: str | None = None
    built: str | None = None
    last_used: float | None = None
    building: bool = False


def list_caches(cache_dir: str | Path | None = None) -> list[CacheEntry]:
    """Every decoded cache under ``cache_dir`` (default: :func:`foodlib.files.cache_folder`), newest use first.

    Checking whether a cache is current stats every file it was built from (a fraction of a second
    for 30,000 photos). Caches removed while this runs are left out.
    """
    folder = decoded_folder(cache_dir)
    if not folder.is_dir():
        return []
    keys = sorted({p.name.split(".")[0] for p in folder.iterdir() if p.name.endswith((".u8", ".u8.tmp", ".json"))})
    entries = []
    for key in keys:
        try:
            entries.append(_entry(folder, key))
        except FileNotFoundError:  # a concurrent prune took it
            pass
    return sorted(entries, key=lambda e: -(e.last_used or 0))


def _last_used(meta_file: Path) -> float | None:
    try:
        return meta_file.stat().st_mtime
    except FileNotFoundError:
        return None


def _entry(folder: Path, key: str) -> CacheEntry:
    data_file, meta_file = folder / f"{key}.u8", folder / f"{key}.json"
    size = sum(p.stat().st_size for p in (data_file, folder / f"{key}.u8.tmp") if p.exists())
    meta, last_used = read_json_or_none(meta_file), _last_used(meta_file)
    building = _building(folder / f"{key}.lock")
    if data_file.is_file() and meta_file.is_file() and not isinstance(meta, dict):
        return CacheEntry(key, folder, "corrupt", f"{meta_file.name} is not readable JSON; it will be rebuilt", size,
                          last_used=last_used, building=building)
    if not data_file.is_file() or not isinstance(meta, dict):
        detail = "a build that did not finish" + (" (building now)" if building else "")
        return CacheEntry(key, folder, "incomplete", detail, size, last_used=last_used, building=building)
    state, detail = _state(folder, key, meta)
    return CacheEntry(key, folder, state, detail, size, meta.get("n"), meta.get("side"), meta.get("root"),
                      meta.get("built"), last_used, building)


def _state(folder: Path, key: str, meta: dict) -> tuple[str, str]:
    paths_file = folder / f"{key}.paths"
    if not paths_file.is_file():
        return "unknown", "built by an older foodlib (no file list kept)"
    paths = paths_file.read_text().splitlines()
    if not all(os.path.isabs(p) for p in paths):
        return "unknown", "built from relative paths: cannot be checked from here"
    gone = sum(not os.path.exists(p) for p in paths)
    if gone == len(paths):  # more likely an unmounted drive or a moved folder than deleted data
        return "unknown", f"none of its {len(paths):,} files is there (moved, deleted or not mounted?)"
    if gone:
        return "stale", f"{gone:,} of {len(paths):,} files are gone"
    if cache_key(paths, int(meta["side"]), meta.get("interpolation", "bilinear")) != key:  # older: bilinear
        return "stale", "files changed since the build (or another foodlib decode version)"
    try:
        bad = first_bad_block(folder / f"{key}.u8", meta.get("blocks"))
    except ValueError:
        return "current", "matches the files (built without checksums: its bytes cannot be verified)"
    if bad is not None:
        return "corrupt", f"block {bad + 1} differs from its checksum: its bytes were damaged; it will be rebuilt"
    return "current", "matches the files and its checksums"


def _building(lock_path: Path) -> bool:
    """Whether another process (or another lock in this one) holds ``lock_path`` now; creates no file."""
    if not lock_path.exists():
        return False
    lock = FileLock(str(lock_path), timeout=0)
    try:
        lock.acquire()
    except OSError:  # Timeout: held; anything else (unwritable folder): cannot tell, so say held
        return True
    lock.release()
    return False


def prunable(entry: CacheEntry, older_than_days: float | None = None, now: float | None = None) -> bool:
    """The prune rule: an unfinished build nobody is running; a stale or corrupt cache not used for
    :data:`RECENT_USE_S`; with ``older_than_days``, any cache not used for that long."""
    now = time.time() if now is None else now
    if entry.building:
        return False
    unused_for = now - entry.last_used if entry.last_used is not None else float("inf")
    if entry.state == "incomplete":
        return True
    if entry.state in ("stale", "corrupt") and unused_for > RECENT_USE_S:
        return True
    return older_than_days is not None and unused_for > older_than_days * 86400


def prune_caches(cache_dir: str | Path | None = None, older_than_days: float | None = None,
                 dry_run: bool = False) -> list[CacheEntry]:
    """Remove the caches :func:`prunable` chooses; also sweep lock and list files left without a cache.

    Current caches, and caches whose files cannot be checked (state ``unknown``), stay unless
    ``older_than_days`` is given. Each cache is removed under its build lock, after checking nobody
    opened or finished it since it was listed. Returns what was removed (or would be, with ``dry_run``).
    """
    now = time.time()
    chosen = []
    for entry in list_caches(cache_dir):
        if not prunable(entry, older_than_days, now):
            continue
        if not dry_run and not _remove(entry.folder, entry.key, entry.last_used):
            continue  # opened, finished or locked since the listing, or cannot be removed
        chosen.append(entry)
    if not dry_run:
        _sweep_leftovers(decoded_folder(cache_dir))
    return chosen


def _remove(folder: Path, key: str, last_used: float | None) -> bool:
    """Delete a cache's files under its build lock, if its last use is still ``last_used`` (nobody opened it)."""
    lock_path = folder / f"{key}.lock"
    lock = FileLock(str(lock_path), timeout=0)
    try:
        lock.acquire()
    except OSError:  # Timeout: being built or opened now; PermissionError: not ours to remove
        return False
    try:
        if _last_used(folder / f"{key}.json") != last_used:
            return False
        for path in [folder / f"{key}{suffix}" for suffix in SUFFIXES if suffix != ".lock"]:
            path.unlink(missing_ok=True)
        for path in folder.glob(f".{key}.*.tmp"):  # an atomic write cut short
            path.unlink(missing_ok=True)
        lock_path.unlink(missing_ok=True)  # last, still holding it: a waiter that then gets it sees an unlinked file
        return True
    except OSError:  # not ours to remove, or mapped by a process on Windows
        return False
    finally:
        lock.release()


def _sweep_leftovers(folder: Path) -> None:
    """Lock files, file lists and half-written metadata whose cache is gone (a killed build, a hand deletion)."""
    if not folder.is_dir():
        return
    names = [p.name for p in folder.iterdir()]
    live = {n.split(".")[0] for n in names if n.endswith((".u8", ".u8.tmp", ".json")) and not n.startswith(".")}
    for key in sorted({n.lstrip(".").split(".")[0] for n in names} - live):
        _remove(folder, key, None)


def main_cache(cache_dir: str | None, prune: bool, older_than_days: float | None, dry_run: bool) -> int:
    """``foodlib cache``: list the decoded caches; ``--prune`` removes stale ones."""
    folder = decoded_folder(cache_dir)
    if prune or older_than_days is not None:
        removed = prune_caches(cache_dir, older_than_days, dry_run)
        verb = "would remove" if dry_run else "removed"
        for e in removed:
            print(f"{verb} {e.key}  {format_size(e.size_bytes):>8}  {e.state}: {e.detail}  ({e.root or '-'})")
        print(f"{verb} {len(removed)} cache(s), {format_size(sum(e.size_bytes for e in removed))}, from {folder}")
        return 0
    entries = list_caches(cache_dir)
    total = sum(e.size_bytes for e in entries)
    print(f"{len(entries)} decoded cache(s) in {folder}, {format_size(total)}")
    if not entries:
        return 0
    print(f"{'key':<20}  {'images':>7}  {'side':>4}  {'size':>8}  {'last used':<16}  {'state':<10}  source")
    for e in entries:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used)) if e.last_used else "-"
        state = e.state + ("*" if e.building else "")
        print(f"{e.key:<20}  {e.images if e.images is not None else '-':>7}  {e.side or '-':>4}  "
              f"{format_size(e.size_bytes):>8}  {used:<16}  {state:<10}  {e.root or '-'}")
    if any(e.building for e in entries):
        print("* being built (or opened) by a running process: never pruned")
    prunable_now = [e for e in entries if prunable(e)]
    if prunable_now:
        print(f"`foodlib cache --prune` removes the {len(prunable_now)} stale, corrupt or unfinished one(s), "
              f"{format_size(sum(e.size_bytes for e in prunable_now))}; add --older-than DAYS for unused ones")
    recent = [e for e in entries if e.state in ("stale", "corrupt") and not e.building and not prunable(e)]
    if recent:
        print(f"{len(recent)} stale or corrupt one(s) used in the last {RECENT_USE_S // 3600} hour(s) are kept "
              "until then: a running process may still read them")
    return 0
