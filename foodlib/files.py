"""Crash-safe file writes: a temporary file in the same folder, fsync, then an atomic rename.

A run killed at any moment (SIGKILL included) leaves either the old file or the new one, never a
half-written checkpoint or metrics file. Also: generated folders written aside and swapped in, and
:func:`folder_lock`, which keeps a second process from writing into a run or suite folder.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock, Timeout

# mkstemp creates files readable by their owner only; finished files get the usual permissions.
# The umask can only be read by setting it, so that happens once, at import.
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_TEMP_SUFFIX = ".tmp"
_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")  # ".last.pt.k3j9_x0q.tmp": mkstemp's 8 random characters


def cache_folder(cache_dir: str | Path | None = None) -> Path:
    """Where generated datasets, decoded images, trunk features and scans are kept.

    ``cache_dir`` when given (``cfg.data.cache_dir``, ``--cache-dir``), else ``$FOODLIB_CACHE``, else
    ``~/.cache/foodlib``. The one place that decides it: every cache in foodlib asks here.

    >>> cache_folder("~/big-disk/foodlib") / "decoded"   # doctest: +SKIP
    """
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("FOODLIB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "foodlib"


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Call ``write(file_object)`` on a temporary file next to ``path``, then rename it over ``path``.

    If ``write`` raises, ``path`` keeps its old content (or stays absent) and the temporary file is
    removed. A process killed mid-write leaves only a hidden ``.NAME.*.tmp`` file, which
    :func:`remove_stale_temp_files` clears.

    >>> atomic_write(Path(tmp) / "notes.txt", lambda f: f.write(b"hello"))   # doctest: +SKIP
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def _fsync_folder(folder: Path) -> None:
    """Persist the rename itself: without this a power cut can undo it on some filesystems (ext4)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms that cannot open folders (Windows): the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temporary files a killed :func:`atomic_write` left in ``folder``; returns them.

    Only names of the form ``.NAME.XXXXXXXX.tmp`` (what :func:`atomic_write` creates) are touched.

    >>> remove_stale_temp_files("runs/try")   # doctest: +SKIP
    [PosixPath('runs/try/.last.pt.k3j9_x0q.tmp')]
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.is_file() and _TEMP_NAME.match(p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


class NoSpaceError(OSError):
    """The disk holding a file foodlib must write is (nearly) full; the message names it and the need."""

    def __str__(self) -> str:
        return str(self.strerror)  # the one line, without OSError's "[Errno 28] " prefix


def mount_point(path: str | Path) -> Path:
    """The mount point (file system) ``path`` lives on: what "no space left on ..." names."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    device = path.stat().st_dev
    while path.parent != path and path.parent.stat().st_dev == device:
        path = path.parent
    return path


def check_free_space(folder: str | Path, need_bytes: int, what: str) -> None:
    """Raise :class:`NoSpaceError` unless ``folder``'s disk has ``need_bytes`` free (checked before writing)."""
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need_bytes:
        raise no_space_error(folder, need_bytes, what, free)


def no_space_error(folder: str | Path, need_bytes: int, what: str, free: int | None = None) -> NoSpaceError:
    """The one-line ENOSPC error: which disk, how much is needed and free, and what to do."""
    import errno

    probe = Path(folder)
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free if free is None else free
    return NoSpaceError(
        errno.ENOSPC,
        f"no space left on {mount_point(probe)} for {what}: need {need_bytes / 1e6:.0f} MB in {folder}, "
        f"{free / 1e6:.0f} MB free; free some space or write to another disk"
    )


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(path: str | Path, obj: Any) -> Path:
    """``torch.save`` through :func:`atomic_write`; a full disk keeps the old file and says so in one line."""
    import torch  # local: io stays importable without torch

    path = Path(path)
    need = _tensor_bytes(obj) + 2**20  # tensors dominate; 1 MB for the rest of the pickle and the zip index
    check_free_space(path.parent, need, f"the checkpoint {path.name}")
    try:
        return atomic_write(path, lambda f: torch.save(obj, f))
    except (OSError, RuntimeError) as error:
        # torch's zip writer turns ENOSPC into "RuntimeError: unexpected pos ..."; the disk tells the truth
        free = shutil.disk_usage(path.parent).free
        if free < need:
            raise no_space_error(path.parent, need, f"the checkpoint {path.name} (the previous one is kept)",
                                 free) from error
        raise


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors inside nested dicts / lists / tuples (what a checkpoint's size is made of)."""
    if hasattr(obj, "element_size") and hasattr(obj, "nelement"):
        return obj.element_size() * obj.nelement()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


# ----- generated folders: written aside, then swapped in -------------------------------------------

def check_replaceable(root: Path, marker: str, what: str, allowed: tuple[str, ...]) -> None:
    """Refuse to replace a folder that holds files foodlib did not write (anything but ``allowed`` and ``marker``)."""
    if not root.exists():
        return
    if not root.is_dir():
        raise FileExistsError(f"{root} exists and is not a folder; pass another root for the {what} dataset")
    foreign = sorted(p.name for p in root.iterdir() if p.name not in (*allowed, marker))
    if foreign:
        raise FileExistsError(
            f"{root} holds files that are not part of a {what} dataset ({', '.join(foreign[:5])}); "
            f"refusing to replace it: pass an empty or new folder as root"
        )


def building_dir(root: Path) -> Path:
    """A fresh hidden sibling of ``root`` to write a generated folder into before :func:`swap_in`."""
    root.parent.mkdir(parents=True, exist_ok=True)
    building = root.parent / f".{root.name}.building-{uuid.uuid4().hex[:8]}"
    building.mkdir()
    return building


def swap_in(building: Path, root: Path, marker: str, expected: dict) -> None:
    """Replace ``root`` by the finished ``building`` folder (another process may have won the race).

    ``root / marker`` holding ``expected`` means an equal folder is already in place; it is kept.
    """
    if root.exists():
        if read_json_or_none(root / marker) == expected:
            return  # written meanwhile by a concurrent call with the same settings
        retired = root.parent / f".{root.name}.old-{uuid.uuid4().hex[:8]}"
        root.rename(retired)
        shutil.rmtree(retired, ignore_errors=True)
    try:
        building.rename(root)
    except OSError:
        if read_json_or_none(root / marker) != expected:
            raise


def read_json_or_none(path: Path):
    """The JSON value in ``path``, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ----- one writer per folder -------------------------------------------------------------------------

LOCK_NAME = ".foodlib.lock"


class FolderBusyError(RuntimeError):
    """Another process is writing into the folder (a second training or suite aimed at the same place)."""


def read_text_or_none(path: str | Path) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


@contextmanager
def folder_lock(folder: str | Path, what: str):
    """Hold ``folder``'s write lock while the block runs; fail at once, naming the holder, if it is taken.

    A ``filelock`` lock on ``folder/.foodlib.lock`` (an OS lock: released if the process dies, so a
    killed run never leaves the folder locked). The file says who holds it and is removed on release.
    On a file system without locks (some cluster mounts) it warns and runs unguarded.

    >>> with folder_lock("runs/try", "a training run"):   # doctest: +SKIP
    ...     train()
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    before = read_text_or_none(path)  # older filelock 3.x releases empty it on every attempt, even a failed one
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:  # before OSError: Timeout is a TimeoutError, an OSError
        holder = (read_text_or_none(path) or before or "").strip() or "another process"
        raise FolderBusyError(f"{folder} is in use by {holder}; wait for it to finish, or choose another folder") from None
    except OSError as error:  # ENOLCK / EOPNOTSUPP: no locks on this file system
        warnings.warn(f"cannot lock {folder} ({error}); nothing stops a second process writing into it", stacklevel=3)
        yield
        return
    try:
        try:  # the lock is on the file, not its bytes: the holder may write its name into it
            path.write_text(f"{what} (pid {os.getpid()} on {socket.gethostname()}, "
                            f"since {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        except OSError:  # Windows locks the bytes too: the holder stays unnamed there
            pass
        yield
    finally:
        try:
            path.unlink(missing_ok=True)  # still holding it; a process that then locks the unlinked file sees it busy
        except OSError:  # Windows: filelock removes it on release
            pass
        lock.release()
