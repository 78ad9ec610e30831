"""TensorBoard for every run: per-epoch scalars, the hparams dashboard and the embedding projector.

``fit()`` opens a :class:`RunBoard` on ``RUN_DIR/tensorboard/`` (``tensorboard=False`` turns it
off; it is runtime-only and never changes a result) and calls it at three places:

* :meth:`RunBoard.log_epoch` after each epoch: every number of the epoch's ``trace.csv`` rows as
  a scalar ``NAME/SPLIT`` (``loss/train``, ``center/val``, ``top1/val``, ``img_per_s/train``,
  ...) plus ``lr``, with the epoch as the step;
* :meth:`RunBoard.finish` once ``metrics.json`` is written: the best checkpoint's metrics as
  ``best/SPLIT_NAME`` scalars (what the hparams dashboard compares), the end of the hparams
  session, and the projector's data for the test (and novel, when present) embeddings of
  ``features.npz``: one row per image with its class, the predicted class and whether it is
  right, and a sprite of thumbnails, so PCA / UMAP / t-SNE of the feature clusters rotate live in
  the browser;
* :meth:`RunBoard.close` in every case.

The hparams session (every Config field that is not runtime-only, against every scalar's last
value: the ``best/...`` metrics, the last epoch's ``top1/val``, ...) starts when the run does, so a
suite's runs appear in the dashboard while they train: ``tensorboard --logdir runs/SUITE``.

>>> board = RunBoard.open(cfg, Path("runs/try"), main=True)   # doctest: +SKIP
>>> board.log_epoch(trace, epoch=1)                           # doctest: +SKIP
"""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from foodlib.features import load_features

#: Sub-folder of the run folder that holds the event files and the projector's files.
TENSORBOARD_DIR = "tensorboard"
#: Splits of ``features.npz`` shown in the projector (``novel``: classes never trained on).
PROJECTOR_SPLITS = ("test", "novel")
#: At most this many points per split in the projector: a fixed, evenly spread subset beyond it
#: (the browser's t-SNE slows down past a few thousand points, and the sprite must stay under 8192 px).
PROJECTOR_MAX_POINTS = 2000
THUMBNAIL_SIDE = 48  # px, side of each sprite thumbnail
#: Config fields left out of the hparams dashboard: where and how a run executes, not what it computes.
HPARAM_SKIP = frozenset({"out", "resume", "quiet", "device", "workers", "cache_dir", "threads", "tensorboard",
                         "features", "figures", "bad_files", "cache"})
_BEST_KEYS = ("top1", "top5", "loss", "fisher_ratio", "knn_top1", "nmi", "silhouette", "intra_class_variance",
              "inter_class_distance")


class RunBoard:
    """The TensorBoard writer of one run; a no-op when TensorBoard is off or on non-main ranks."""

    def __init__(self, writer=None, logdir: Path | None = None):
        self.writer = writer
        self.logdir = logdir

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    @classmethod
    def open(cls, cfg, run_dir: str | Path, main: bool = True, start_epoch: int = 0) -> "RunBoard":
        """Open the run's writer and start its hparams session; the disabled board if off.

        Args:
            cfg: the run's Config (``cfg.train.tensorboard`` decides).
            run_dir: the run folder; events go to ``run_dir/tensorboard/``.
            main: only the main process (rank 0) writes.
            start_epoch: epochs already done (resume): TensorBoard drops any step after it that an
                interrupted process logged, so a resumed run shows each epoch once.
        """
        if not (main and getattr(cfg.train, "tensorboard", False)):
            return cls()
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:  # tensorboard is a dependency; a broken install must not stop training
            warnings.warn(f"TensorBoard logging is off: {error}; pip install tensorboard "
                          "(or set tensorboard=false)", stacklevel=2)
            return cls()
        from torch.utils.tensorboard.summary import hparams

        logdir = Path(run_dir) / TENSORBOARD_DIR
        writer = SummaryWriter(str(logdir), purge_step=start_epoch + 1 if start_epoch else None)
        # The session's settings only, no per-run "experiment" summary: TensorBoard then builds the
        # experiment from all of a suite's sessions (the union of their settings, flagging those that
        # differ) instead of taking one arbitrary run's list (which may lack e.g. lam, None for softmax).
        _, session_start, _ = hparams(hparam_values(cfg), {})
        writer.file_writer.add_summary(session_start)
        writer.flush()
        return cls(writer, logdir)

    def log_epoch(self, trace: list[dict[str, Any]], epoch: int) -> None:
        """Every number of the trace rows of ``epoch`` (1-based) as ``NAME/SPLIT``; ``lr`` once."""
        if not self.enabled:
            return
        for row in trace:
            if row.get("epoch") != epoch:
                continue
            split = row.get("split", "train")
            for name, value in row.items():
                if name in ("epoch", "split", "lr") or not _is_number(value):
                    continue
                self.writer.add_scalar(f"{name}/{split}", float(value), epoch)
            if split == "train" and _is_number(row.get("lr")):
                self.writer.add_scalar("lr", float(row["lr"]), epoch)
        self.writer.flush()

    def finish(self, metrics: dict[str, Any], data=None, run_dir: str | Path | None = None) -> None:
        """Best-checkpoint metrics, the end of the hparams session, and the embedding projector.

        Args:
            metrics: the run's ``metrics.json`` content (``best_epoch``, per-split dicts).
            data: the run's :class:`~foodlib.data.Data`, for the thumbnails (none without it).
            run_dir: the run folder, whose ``features.npz`` feeds the projector (none without it).
        """
        if not self.enabled:
            return
        try:
            self._finish(metrics, data, run_dir)
        except Exception as error:  # the run is complete (metrics.json is written): TensorBoard must not fail it
            warnings.warn(f"TensorBoard: the end-of-run summary of {run_dir} failed ({type(error).__name__}: "
                          f"{error}); the run itself is complete", stacklevel=2)

    def _finish(self, metrics: dict[str, Any], data, run_dir: str | Path | None) -> None:
        from torch.utils.tensorboard.summary import hparams

        step = int(metrics.get("best_epoch") or metrics.get("epochs") or 0)
        for split in ("train", "val", "test", "novel"):
            for key in _BEST_KEYS:
                value = metrics.get(split, {}).get(key) if isinstance(metrics.get(split), dict) else None
                if _is_number(value):
                    self.writer.add_scalar(f"best/{split}_{key}", float(value), step)
        *_, session_end = hparams({"_": 0}, {})  # status: success
        self.writer.file_writer.add_summary(session_end)
        if run_dir is not None and (Path(run_dir) / "features.npz").is_file():
            self.add_projector(Path(run_dir) / "features.npz", data, step)
        self.writer.flush()

    def add_projector(self, features_path: Path, data=None, step: int = 0,
                      max_points: int = PROJECTOR_MAX_POINTS) -> list[str]:
        """The projector's tensors, labels and sprite for each split of :data:`PROJECTOR_SPLITS`; returns them."""
        import torch

        features = load_features(features_path)
        classes = features.get("classes", [])
        shown = []
        for split in PROJECTOR_SPLITS:
            if split not in features:
                continue
            feats = features[split]
            keep = spread_subset(len(feats["labels"]), max_points)
            embeddings = feats["embeddings"][keep]  # (N, D)
            labels, predicted = feats["labels"][keep], feats["logits"][keep].argmax(1)  # (N,)
            names = [_label(classes, i) for i in labels]
            metadata = [[name, _label(classes, p), "right" if p == y else "wrong"]
                        for name, p, y in zip(names, predicted, labels)]
            sprite = thumbnails(data, split, keep)
            # One projector per split: a resumed run's new best replaces the earlier one's files
            # (add_embedding would also refuse to overwrite a folder of the same step)
            for earlier in self.logdir.glob(f"{'[0-9]' * 5}/{split}"):
                shutil.rmtree(earlier, ignore_errors=True)
            # 5 decimals: TensorBoard writes each value's repr as text, and float32's repr as a double
            # takes 20 characters; rounded ones take ~8 (a 3x smaller tensors.tsv, same picture)
            self.writer.add_embedding(torch.from_numpy(embeddings.astype(np.float64).round(5)),
                                      metadata=metadata, metadata_header=["class", "predicted", "correct"],
                                      label_img=sprite, global_step=step, tag=split)
            shown.append(split)
        return shown

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.writer = None


def hparam_values(cfg) -> dict[str, Any]:
    """The Config fields the hparams dashboard shows: numbers, strings and flags; None (a default) left out."""
    values = {}
    for name, value in cfg.to_flat().items():
        if name in HPARAM_SKIP or value is None:
            continue
        values[name] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return values


def spread_subset(n: int, max_points: int) -> np.ndarray:
    """All of ``range(n)`` if it fits, else ``max_points`` indices spread evenly over it (deterministic)."""
    if n <= max_points:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max_points).round().astype(np.int64))


def thumbnails(data, split: str, rows: np.ndarray, side: int = THUMBNAIL_SIDE):
    """``(N, 3, side, side)`` float thumbnails in [0, 1] of ``rows`` of ``split``, or None without the images."""
    import torch
    import torch.nn.functional as F

    # a trunk-cache run trains on features; its decoded images are kept beside them (image_sources)
    sources = getattr(data, "image_sources", None) or getattr(data, "sources", {}) if data is not None else {}
    source = sources.get(split)
    if source is None or len(source) < (int(rows.max()) + 1 if len(rows) else 0):
        return None
    batch = source.get_batch(rows)
    if batch.ndim != 4:  # features, not images: the projector shows points only
        return None
    images = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255  # (N, 3, S, S)
    if images.shape[-1] != side:
        images = F.interpolate(images, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    return images.clamp(0, 1)


def _label(classes: list[str], index) -> str:
    index = int(index)
    return classes[index] if 0 <= index < len(classes) else str(index)


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and bool(np.isfinite(value))
