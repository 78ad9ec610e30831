"""What a run folder may be used for: a finished run is never replaced without ``overwrite=True``.

:func:`check_run_folder` runs before ``fit()`` writes anything into its ``out`` folder. It decides
between a new run, a resumed one, an explicit overwrite and a refusal, with a one-line reason.

>>> check_run_folder(Path("runs/try"), cfg, print)   # doctest: +SKIP
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import yaml

from foodlib.config import Config, ConfigError, resume_free_fields
from foodlib.messages import logger
from foodlib.files import LOCK_NAME, folder_lock

#: Files a run writes once it has trained (any one of them means: results live here).
RESULT_FILES = ("last.pt", "best.pt", "metrics.json", "trace.csv", "features.npz")
#: Folders of results, replaced together with the files on ``overwrite``.
RESULT_FOLDERS = ("figures",)


def check_writable(run_dir: Path) -> None:
    """Create ``run_dir`` if needed and make sure files can be written into it.

    Raises:
        ConfigError: naming ``out``, the folder and the operating system's reason.
    """
    import tempfile


    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as error:
        raise ConfigError(
            f"out={str(run_dir)!r}: cannot write into {run_dir} ({error.strerror or type(error).__name__}); "
            "choose a writable out folder (--out) or fix its permissions"
        ) from None


def run_results(run_dir: Path) -> list[str]:
    """Names of the result files and folders in ``run_dir`` (empty for a new or never-trained folder)."""
    return [name for name in (*RESULT_FILES, *RESULT_FOLDERS) if (run_dir / name).exists()]


def check_run_folder(run_dir: Path, cfg, log: Callable[[str], None] = logger.info) -> None:
    """Refuse to train over results in ``run_dir`` unless asked, in one line naming the files and the fix.

    - ``resume`` with ``last.pt``: allowed (``fit`` then checks that the config matches).
    - ``resume`` without ``last.pt``: the folder's ``config.yaml`` must match ``cfg``; a folder with
      other results (best.pt, metrics.json) cannot be resumed and needs ``overwrite``.
    - no ``resume``: any result file refuses, unless ``overwrite``, which removes them first.

    Raises:
        FileExistsError: results are there and neither flag allows replacing them.
        ConfigError: ``resume`` without ``last.pt`` and a ``config.yaml`` that differs from ``cfg``.
    """
    results = run_results(run_dir)
    if cfg.train.resume:
        if "last.pt" in results:
            return
        recorded = run_dir / "config.yaml"
        if recorded.is_file():
            _check_recorded_config(recorded, cfg)
        if results and not cfg.train.overwrite:
            raise FileExistsError(
                f"{run_dir} holds results ({', '.join(results)}) but no last.pt, so it cannot be resumed; "
                "pass --overwrite (overwrite=True) to retrain it from scratch, or choose another out folder"
            )
        if not results:
            if recorded.is_file():
                log(f"{run_dir} has no last.pt (no epoch had finished): starting from epoch 1")
            return
    elif results and not cfg.train.overwrite:
        raise FileExistsError(
            f"{run_dir} already holds a run ({', '.join(results)}); pass --resume (resume=True) to continue it, "
            "--overwrite (overwrite=True) to replace its results, or choose another out folder"
        )
    if results:  # overwrite=True, asked for explicitly
        for name in results:
            path = run_dir / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        log(f"overwrite: removed the earlier results of {run_dir} ({', '.join(results)})")


def _check_recorded_config(recorded: Path, cfg) -> None:
    """ConfigError unless ``cfg`` may continue the run recorded in ``recorded`` (same rules as resume)."""
    try:
        saved = yaml.safe_load(recorded.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{recorded} is unreadable ({type(error).__name__}); "
                          "pass --overwrite to start the run again, or choose another out folder") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{recorded} is not a foodlib config; pass --overwrite to start the run again, "
                          "or choose another out folder")
    check_resume_config(saved, cfg, recorded)


# ----- outdated runs: moved aside, never deleted ---------------------------------------------------

RETIRED_MARK = ".old-"  # RUN.old-20261201-124500: an outdated run a suite moved aside


def is_retired(name: str) -> bool:
    """True for a folder name made by :func:`retire_run_folder` (reports skip these)."""
    return RETIRED_MARK in name


def retire_run_folder(run_dir: Path) -> Path:
    """Rename ``run_dir`` to ``RUN.old-<timestamp>`` next to it and return the new path; nothing is deleted.

    Holds the folder's lock while renaming, so a run still writing there is never moved away.

    Raises:
        FolderBusyError: a live ``fit()`` holds the folder.
    """
    import time


    stamp = time.strftime("%Y%m%d-%H%M%S")
    retired = run_dir.with_name(f"{run_dir.name}{RETIRED_MARK}{stamp}")
    n = 1
    while retired.exists():
        n += 1
        retired = run_dir.with_name(f"{run_dir.name}{RETIRED_MARK}{stamp}-{n}")
    with folder_lock(run_dir, "a suite moving an outdated run aside"):  # not under a live fit()
        run_dir.rename(retired)
    (retired / LOCK_NAME).unlink(missing_ok=True)
    return retired


def read_split_file(run_dir: str | Path, split: str) -> tuple[list[str], list[str]]:
    """Paths and class names of ``run_dir/splits/<split>.txt`` (``path<TAB>class`` per line), in order.

    This order is the order of the split's rows in ``features.npz``: ``load_data`` writes the
    split files from the same index (after dropping bad files) whose ``paths`` the split's
    ``ImageSource`` reads, and features are extracted with ``shuffle=False`` loaders, which visit
    rows 0..N-1 in turn (``BatchLoader.batches``).
    """
    file = Path(run_dir) / "splits" / f"{split}.txt"
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist; the run has no {split!r} split (see {file.parent})")
    paths, names = [], []
    for line in file.read_text().splitlines():
        if line:
            path, name = line.rsplit("\t", 1)
            paths.append(path)
            names.append(name)
    return paths, names


def check_resume_config(saved: dict[str, Any], cfg: Config, path: Path) -> None:
    """Raise ConfigError naming every field where ``cfg`` differs from the run saved in ``path``.

    Resuming with another loss, lr, seed or data would silently splice two different runs.

    >>> saved = Config.from_flat(epochs=10).to_dict()
    >>> check_resume_config(saved, Config.from_flat(epochs=20, workers=0), Path("last.pt"))  # allowed
    >>> check_resume_config(saved, Config.from_flat(epochs=10, lr=0.1), Path("last.pt"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    foodlib.errors.ConfigError: cannot resume last.pt with a different config: lr=0.1 (the run used 0.002)...
    """
    # A field the saved config lacks (added to foodlib after the run started) counts as its
    # default, which is how the older code behaved; fields foodlib no longer has are ignored.
    saved_flat = {**Config().to_flat(),
                  **{k: v for section in saved.values() if isinstance(section, dict) for k, v in section.items()}}
    current = cfg.to_flat()
    resume_free = resume_free_fields()  # marked on the fields in foodlib/config.py
    differing = [
        f"{name}={current[name]!r} (the run used {saved_flat[name]!r})"
        for name in current
        if name not in resume_free and saved_flat[name] != current[name]
    ]
    saved_epochs = saved_flat.get("epochs")
    if isinstance(saved_epochs, int) and cfg.train.epochs < saved_epochs:
        differing.append(f"epochs={cfg.train.epochs} (the run used {saved_epochs}; epochs may only grow)")
    if differing:
        raise ConfigError(
            f"cannot resume {path} with a different config: {'; '.join(differing)}. "
            "Use the run's own config.yaml (--config), or train into a new out folder."
        )
