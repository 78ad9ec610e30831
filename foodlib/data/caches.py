"""What the decoded-image caches hold, and removing the ones no longer needed (`foodlib cache`).

Every change to a dataset's files or to the stored side makes a new cache (a stale one is never
reused), so old ones pile up: 30,000 photos at 224 px take about 6 GB each. Each cache is
``<cache_dir>/decoded/<key>.u8`` with ``<key>.json`` (side, count, unreadable files, source folder;
its mtime is the last use) and ``<key>.paths`` (the file list, to tell whether the cache is still
current). A process that loaded a cache holds a shared lock on ``<key>.use`` until it exits, so
pruning never removes data a notebook or training is reading.

>>> for entry in list_caches(): print(entry.key, entry.state, entry.size_bytes)   # doctest: +SKIP
>>> removed = prune_caches(older_than_days=30)                                     # doctest: +SKIP
"""
from __future__ import annotations

import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path

from foodlib.data.checksum import first_bad_block
from foodlib.data.cache import cache_key, default_cache_dir, format_size, held_in_this_process
from foodlib.io import lock_file, read_json_or_none

SUFFIXES = (".u8", ".u8.tmp", ".json", ".paths", ".use", ".lock")


@dataclass
class CacheEntry:
    """One decoded cache.

    ``state``: ``current`` (matches its files), ``stale`` (files changed or some gone), ``unknown`` (cannot
    be checked: no file list, relative paths, or none of its files reachable), ``incomplete`` (a build
    that did not finish), ``corrupt`` (its bytes differ from the block checksums of its build, or its
    metadata is unreadable). ``in_use``: some process has loaded it or is building it.
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
    in_use: bool = False


def decoded_folder(cache_dir: str | Path | None = None) -> Path:
    return (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / "decoded"


def list_caches(cache_dir: str | Path | None = None) -> list[CacheEntry]:
    """Every decoded cache under ``cache_dir`` (default: ``$FOODLIB_CACHE`` or ``~/.cache/foodlib``), newest use first.

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


def _entry(folder: Path, key: str) -> CacheEntry:
    data_file, meta_file = folder / f"{key}.u8", folder / f"{key}.json"
    size = sum(p.stat().st_size for p in (data_file, folder / f"{key}.u8.tmp") if p.exists())
    meta = read_json_or_none(meta_file)
    in_use = _in_use(folder, key)
    if data_file.is_file() and meta_file.is_file() and not isinstance(meta, dict):
        return CacheEntry(key, folder, "corrupt", f"{meta_file.name} is not readable JSON; it will be rebuilt", size,
                          in_use=in_use)
    if not data_file.is_file() or not isinstance(meta, dict):
        detail = "a build that did not finish" + (" (building now)" if in_use else "")
        return CacheEntry(key, folder, "incomplete", detail, size, in_use=in_use)
    last_used = meta_file.stat().st_mtime
    state, detail = _state(folder, key, meta)
    return CacheEntry(key, folder, state, detail, size, meta.get("n"), meta.get("side"), meta.get("root"),
                      meta.get("built"), last_used, in_use)


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
    if cache_key(paths, int(meta["side"])) != key:
        return "stale", "files changed since the build (or another foodlib decode version)"
    try:
        bad = first_bad_block(folder / f"{key}.u8", meta.get("blocks"))
    except ValueError:
        return "current", "matches the files (built without checksums: its bytes cannot be verified)"
    if bad is not None:
        return "corrupt", f"block {bad + 1} differs from its checksum: its bytes were damaged; it will be rebuilt"
    return "current", "matches the files and its checksums"


def _in_use(folder: Path, key: str) -> bool:
    """Whether a process has loaded this cache (``key.use``) or is building it (``key.lock``).

    This process's own caches are answered from memory: probing a file it holds and closing it
    would drop its lock on file systems where flock is emulated by per-process POSIX locks (NFS).
    """
    if held_in_this_process(folder, key):
        return True
    return any(_held(folder / f"{key}{suffix}") for suffix in (".use", ".lock"))


def _held(path: Path) -> bool:
    """Whether another process holds a lock on ``path``; read-only probe, creates nothing."""
    try:
        handle = open(path)
    except FileNotFoundError:
        return False
    except OSError:  # unreadable: cannot tell, so treat it as held
        return True
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError: held; anything else: cannot tell
            return True
        return False  # closing the handle releases the probe's lock


def prune_caches(cache_dir: str | Path | None = None, older_than_days: float | None = None,
                 dry_run: bool = False) -> list[CacheEntry]:
    """Remove stale and unfinished caches (and, with ``older_than_days``, any unused that long).

    Current caches, and caches whose files cannot be checked (state ``unknown``), stay unless
    ``older_than_days`` is given; a cache some process has loaded or is building is never removed.
    Also sweeps lock and temporary files left without a cache. Returns what was removed (or would
    be, with ``dry_run``).
    """
    now = time.time()
    chosen = []
    for entry in list_caches(cache_dir):
        old = older_than_days is not None and (entry.last_used is None or now - entry.last_used > older_than_days * 86400)
        if entry.in_use or not (entry.state in ("stale", "incomplete", "corrupt") or old):
            continue
        if not dry_run and not _remove(entry.folder, entry.key):
            continue  # it was taken up between the listing and now, or cannot be removed
        chosen.append(entry)
    if not dry_run:
        _sweep_leftovers(decoded_folder(cache_dir))
    return chosen


def _remove(folder: Path, key: str) -> bool:
    """Delete a cache's files while holding its build and use locks, so no process can be starting to use it."""
    handles = []
    try:
        for suffix in (".lock", ".use"):
            handles.append(lock_file(folder / f"{key}{suffix}", fcntl.LOCK_EX | fcntl.LOCK_NB))
        for path in [folder / f"{key}{suffix}" for suffix in SUFFIXES] + list(folder.glob(f".{key}.*.tmp")):
            path.unlink(missing_ok=True)  # the lock files last: lock_file() in a waiter re-checks the inode
        return True
    except OSError:  # BlockingIOError: in use after all; PermissionError: not ours to remove
        return False
    finally:
        for handle in handles:
            handle.close()


def _sweep_leftovers(folder: Path) -> None:
    """Lock files, file lists and half-written metadata whose cache is gone (a killed build or prune)."""
    if not folder.is_dir():
        return
    names = [p.name for p in folder.iterdir()]
    live = {n.split(".")[0] for n in names if n.endswith((".u8", ".u8.tmp", ".json")) and not n.startswith(".")}
    orphans = {n.lstrip(".").split(".")[0] for n in names} - live
    for key in sorted(orphans):
        if not _in_use(folder, key):
            _remove(folder, key)


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
        state = e.state + ("*" if e.in_use else "")
        print(f"{e.key:<20}  {e.images if e.images is not None else '-':>7}  {e.side or '-':>4}  "
              f"{format_size(e.size_bytes):>8}  {used:<16}  {state:<10}  {e.root or '-'}")
    if any(e.in_use for e in entries):
        print("* loaded or being built by a running process: never pruned")
    prunable = [e for e in entries if e.state in ("stale", "incomplete", "corrupt") and not e.in_use]
    if prunable:
        print(f"`foodlib cache --prune` removes the {len(prunable)} stale, corrupt or unfinished one(s), "
              f"{format_size(sum(e.size_bytes for e in prunable))}; add --older-than DAYS for unused ones")
    return 0
