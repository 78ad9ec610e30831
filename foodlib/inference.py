"""Use a trained run: predict classes, embed images, find nearest training images, export the model.

Every function takes a run folder (or an :class:`InferenceRun` loaded once) and uses the run's best
checkpoint with exactly the run's evaluation preprocessing: ``load_image_array(path,
cache_side(image_size), interpolation)`` (the decode the cache uses, with the backbone's
resampling) then ``eval_transform`` and
``loss.predict``, through the same :func:`~foodlib.features.extract_features` that wrote the
run's ``features.npz``. Unreadable files are skipped and listed, never fatal.

>>> preds = predict("runs/demo/center-s0", ["photos/"], top_k=3)            # doctest: +SKIP
>>> print(preds.table())                                                    # doctest: +SKIP
>>> neighbours = nearest_neighbours("runs/demo/center-s0", "photos/ramen.jpg", k=5)  # doctest: +SKIP
>>> neighbours.figure().savefig("neighbours.png")                            # doctest: +SKIP
>>> export_model("runs/demo/center-s0")                                      # doctest: +SKIP
PosixPath('runs/demo/center-s0/export/model.pt2')

Command line: ``foodlib predict RUN PATH... [--out preds.csv]``, ``foodlib embed RUN PATH... --out
F.npz``, ``foodlib neighbours RUN QUERY... [--figure F.png]``, ``foodlib export RUN --format
pt2|torchscript|onnx``.
"""
from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

import foodlib
from foodlib import metrics as M
from foodlib.config import Config
from foodlib.data.augment import CROP_FRACTION, cache_side, normalization
from foodlib.data.images import IMAGE_EXTENSIONS, ImageDecodeError, load_image_array
from foodlib.enrolled import (ENROLLED_FILE, PRIOR_PHOTOS, EnrolledDishes, add_enrolled_gallery, check_enrollable,
                              enrolled_dishes, enrolled_metadata, merge_dishes, with_enrolled)
from foodlib.errors import UserError
from foodlib.features import extract_features, load_features
from foodlib.files import atomic_write, atomic_write_json, atomic_write_text
from foodlib.losses import DiscriminativeLoss, trained_metric
from foodlib.openset import Neighbours
from foodlib.runfolder import read_split_file
from foodlib.runtime import autocast_dtype, resolve_device
from foodlib.train import load_run

__all__ = [
    "ConfusedPair", "InferenceModule", "InferenceRun", "Neighbours", "Predictions", "collect_image_paths",
    "confused_pairs", "embed", "export_model", "load_exported", "nearest_neighbours",
    "predict", "read_split_file", "trace_module", "trained_metric", "Enrollment", "enroll",
]

METRICS = ("euclidean", "cosine")
EXPORT_FORMATS = ("pt2", "torchscript", "onnx")  # pt2: torch.export, what PyTorch recommends today


# ----- the loaded run ---------------------------------------------------------------------------

@dataclass
class InferenceRun:
    """A finished run loaded for inference: model and loss in eval mode on ``device``, config, classes.

    Load it once with :meth:`load` and pass it instead of the run folder to every function here,
    to read the checkpoint only once (notebooks, many calls).

    >>> run = InferenceRun.load("runs/demo/center-s0", device="cpu")   # doctest: +SKIP
    >>> run.image_size, run.side, len(run.classes)                      # doctest: +SKIP
    (64, 73, 10)
    """

    run_dir: Path
    model: nn.Module
    loss: DiscriminativeLoss
    cfg: Config
    classes: list[str]
    device: torch.device
    checkpoint: str = "best.pt"

    @classmethod
    def load(cls, run_dir: str | Path, checkpoint: str = "best.pt", device: str | torch.device = "auto"
             ) -> "InferenceRun":
        """Read ``run_dir/checkpoint`` (the best-val checkpoint by default) onto ``device`` ("auto": GPU if any)."""
        run_dir = Path(run_dir).expanduser()
        if not run_dir.is_dir():
            raise FileNotFoundError(f"run folder {run_dir} does not exist; pass a folder written by `foodlib train`")
        if not (run_dir / checkpoint).is_file():
            others = sorted(p.name for p in run_dir.glob("*.pt"))
            raise FileNotFoundError(
                f"{run_dir} has no {checkpoint}"
                + (f" (it has {', '.join(others)}; pass checkpoint=/--checkpoint one of them)" if others
                   else "; the run has not finished an epoch yet")
            )
        device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
        model, loss, cfg, classes = load_run(run_dir, checkpoint, device)
        return cls(run_dir, model, loss, cfg, list(classes), device, checkpoint)

    @property
    def image_size(self) -> int:
        """Side of the center crop the network sees."""
        return self.cfg.data.image_size

    @property
    def side(self) -> int:
        """Side of the decoded square the crop is taken from (the cache's side)."""
        return cache_side(self.image_size)

    @property
    def interpolation(self) -> str:
        """The decode's resampling, ``"bilinear"`` or ``"bicubic"``: the backbone's, as in training."""
        return normalization(self.model)["interpolation"]

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The autocast dtype fit() used for evaluation on this device (None: float32)."""
        return autocast_dtype(self.cfg.train.amp, self.device)

    @property
    def metric(self) -> str:
        return trained_metric(self.cfg.loss.loss)


def _as_run(run_dir: str | Path | InferenceRun, checkpoint: str, device) -> InferenceRun:
    return run_dir if isinstance(run_dir, InferenceRun) else InferenceRun.load(run_dir, checkpoint, device)


# ----- image files ------------------------------------------------------------------------------

def collect_image_paths(paths: str | Path | Sequence[str | Path]) -> list[str]:
    """Absolute paths of the images named by ``paths``: files as given, folders searched recursively.

    A file named explicitly is kept whatever its suffix (it is tried, and skipped if unreadable);
    in folders only image suffixes (:data:`foodlib.data.images.IMAGE_EXTENSIONS`) count and hidden
    files and folders are ignored. Order: arguments in order, each folder's files sorted;
    duplicates are kept once.

    Raises:
        FileNotFoundError: a path does not exist, or no image file was found at all.

    >>> collect_image_paths(["photos/", "extra/ramen.jpg"])   # doctest: +SKIP
    ['/home/me/photos/a.jpg', '/home/me/photos/sub/b.png', '/home/me/extra/ramen.jpg']
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: dict[str, None] = {}  # an ordered set
    for given in paths:
        path = Path(given).expanduser()
        if path.is_dir():
            root = path.resolve()
            for file in sorted(root.rglob("*")):
                hidden = any(part.startswith(".") for part in file.relative_to(root).parts)
                if file.is_file() and not hidden and file.suffix.lower() in IMAGE_EXTENSIONS:
                    found[str(file)] = None
        elif path.is_file():
            found[str(path.resolve())] = None
        else:
            raise FileNotFoundError(f"{given}: no such file or folder; pass image files or folders of images")
    if not found:
        raise FileNotFoundError(
            f"no image files in {', '.join(map(str, paths))} (looked for {', '.join(sorted(IMAGE_EXTENSIONS)[:8])}...)"
        )
    return list(found)


class _DecodedBatches:
    """Batches ``(uint8 (B, S, S, 3), dummy labels)`` of ``paths`` for :func:`extract_features`.

    Decoding runs in threads (Pillow releases the GIL) one batch ahead of the model. Files that do
    not decode land in ``skipped`` (path -> reason); ``kept`` lists, in order, the files that did.
    """

    def __init__(self, paths: list[str], side: int, batch_size: int, threads: int | None = None,
                 interpolation: str = "bilinear"):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.paths, self.side, self.batch_size = paths, side, batch_size
        self.interpolation = interpolation
        self.threads = threads or min(8, os.cpu_count() or 1)
        self.kept: list[str] = []
        self.skipped: dict[str, str] = {}

    def __len__(self) -> int:
        return math.ceil(len(self.paths) / self.batch_size)

    def _decode(self, path: str) -> np.ndarray | str:
        try:
            return load_image_array(path, self.side, self.interpolation)  # (S, S, 3) uint8: the cache's decode
        except ImageDecodeError as error:
            return error.reason
        except OSError as error:  # vanished, unreadable permissions, a folder...
            return f"{type(error).__name__}: {error.strerror or error}"

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        chunks = [self.paths[i: i + self.batch_size] for i in range(0, len(self.paths), self.batch_size)]
        with ThreadPoolExecutor(self.threads) as pool:
            pending = [pool.submit(self._decode, p) for p in chunks[0]] if chunks else []
            for i, chunk in enumerate(chunks):
                results = [f.result() for f in pending]
                if i + 1 < len(chunks):  # decode the next batch while the model runs on this one
                    pending = [pool.submit(self._decode, p) for p in chunks[i + 1]]
                arrays = []
                for path, result in zip(chunk, results):
                    if isinstance(result, str):
                        self.skipped[path] = result
                    else:
                        self.kept.append(path)
                        arrays.append(result)
                if arrays:
                    yield torch.from_numpy(np.stack(arrays)), torch.zeros(len(arrays), dtype=torch.int64)


# ----- predict / embed --------------------------------------------------------------------------

@dataclass
class Predictions:
    """Embeddings and prediction logits of images, with the files that could not be read.

    Attributes:
        paths: the images that were read, in input order (row i of the arrays).
        classes: the run's class names (column j of ``logits``).
        embeddings: ``(N, D)`` float32.
        logits: ``(N, C)`` float32 from ``loss.predict`` (for L-GM: class log-likelihoods).
        skipped: unreadable files, path -> reason.
        top_k: how many classes :meth:`rows`, :meth:`table` and :meth:`save` show.
    """

    paths: list[str]
    classes: list[str]
    embeddings: np.ndarray
    logits: np.ndarray
    skipped: dict[str, str] = field(default_factory=dict)
    top_k: int = 5

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def probabilities(self) -> np.ndarray:
        """Soft-max of the logits ``(N, C)``: the class posteriors (uniform prior for L-GM)."""
        from scipy.special import softmax

        return softmax(self.logits.astype(np.float64), axis=1).astype(np.float32)

    @property
    def predicted(self) -> list[str]:
        """The top-1 class name of each image."""
        return [self.classes[j] for j in self.logits.argmax(1)] if len(self) else []

    def top(self, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Indices ``(N, k)`` and probabilities ``(N, k)`` of the k most probable classes, best first."""
        k = min(k or self.top_k, len(self.classes))
        order = np.argsort(-self.logits, axis=1, kind="stable")[:, :k]  # (N, k)
        return order, np.take_along_axis(self.probabilities, order, axis=1)

    def rows(self, k: int | None = None) -> list[dict[str, Any]]:
        """One dict per image: ``path``, ``class_1``, ``probability_1``, ... ``error`` (skipped files last)."""
        k = min(k or self.top_k, len(self.classes))
        order, probs = self.top(k)
        rows = []
        for i, path in enumerate(self.paths):
            row: dict[str, Any] = {"path": path}
            for r in range(k):
                row[f"class_{r + 1}"] = self.classes[order[i, r]]
                row[f"probability_{r + 1}"] = round(float(probs[i, r]), 6)
            rows.append(row | {"error": ""})
        for path, reason in self.skipped.items():
            rows.append({"path": path, **{f"{c}_{r + 1}": "" for r in range(k) for c in ("class", "probability")},
                         "error": reason})
        return rows

    def table(self, k: int | None = None) -> str:
        """A plain-text table: file (relative to the common folder) and the top-k ``class (p)``."""
        k = min(k or self.top_k, len(self.classes))
        if not self.paths:
            return "(no readable images)"
        order, probs = self.top(k)
        names = _short_names(self.paths)
        cells = [[f"{self.classes[order[i, r]]} ({probs[i, r]:.2f})" for r in range(k)] for i in range(len(self))]
        header = ["file"] + [f"top-{r + 1}" for r in range(k)]
        widths = [max(len(header[0]), *map(len, names))]
        widths += [max(len(header[r + 1]), *(len(row[r]) for row in cells)) for r in range(k)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
        lines += ["  ".join(c.ljust(w) for c, w in zip([name, *row], widths)) for name, row in zip(names, cells)]
        return "\n".join(line.rstrip() for line in lines)

    def save(self, path: str | Path) -> Path:
        """Write ``.csv`` (one row per image, top-k columns, skipped files with ``error``), ``.json``
        (``{"classes", "predictions", "skipped"}``) or ``.npz`` (paths, embeddings, logits, classes,
        skipped paths and reasons); the suffix decides."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".csv":
            rows = self.rows()
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["path", "error"])
            writer.writeheader()
            writer.writerows(rows)
            return atomic_write_text(path, buffer.getvalue())
        if suffix == ".json":
            order, probs = self.top()
            predictions = [
                {"path": p, "top": [{"class": self.classes[order[i, r]], "probability": round(float(probs[i, r]), 6)}
                                    for r in range(order.shape[1])]}
                for i, p in enumerate(self.paths)
            ]
            return atomic_write_json(path, {"classes": self.classes, "predictions": predictions,
                                            "skipped": self.skipped})
        if suffix == ".npz":
            arrays = {
                "paths": np.asarray(self.paths, dtype=str), "embeddings": self.embeddings, "logits": self.logits,
                "classes": np.asarray(self.classes, dtype=str),
                "skipped_paths": np.asarray(list(self.skipped), dtype=str),
                "skipped_reasons": np.asarray(list(self.skipped.values()), dtype=str),
            }
            return atomic_write(path, lambda f: np.savez(f, **arrays))
        raise ValueError(f"cannot save predictions as {path.name!r}: use a .csv, .json or .npz file name")


def _short_names(paths: list[str]) -> list[str]:
    """Paths relative to their common folder (the file name alone for a single path)."""
    if len(paths) == 1:
        return [Path(paths[0]).name]
    common = os.path.commonpath(paths)
    return [os.path.relpath(p, common) for p in paths]


def _infer(run: InferenceRun, paths: list[str], batch_size: int, progress: bool, desc: str) -> Predictions:
    batches = _DecodedBatches(paths, run.side, batch_size, interpolation=run.interpolation)
    try:
        # The very function fit() wrote features.npz with: eval_transform, autocast, loss.predict.
        features = extract_features(run.model, run.loss, batches, run.image_size, run.device, run.amp_dtype,
                                    run.cfg.train.channels_last, progress=progress, desc=desc)
    except ValueError:
        if batches.kept:
            raise
        # Every file failed to decode (extract_features refuses an empty loader): empty arrays.
        features = {"embeddings": np.zeros((0, run.model.embedding_dim), np.float32),
                    "logits": np.zeros((0, len(run.classes)), np.float32)}
    return Predictions(batches.kept, run.classes, features["embeddings"], features["logits"], batches.skipped)


def predict(
    run_dir: str | Path | InferenceRun,
    paths: str | Path | Sequence[str | Path],
    top_k: int = 5,
    batch_size: int = 64,
    device: str | torch.device = "auto",
    checkpoint: str = "best.pt",
    progress: bool = True,
) -> Predictions:
    """Top-k classes with probabilities for image files or folders, from the run's best checkpoint.

    Preprocessing is the run's evaluation path exactly (decode to the cache's square, center crop,
    the backbone's normalisation), so a test image gets the prediction the run's test evaluation gave it.

    Args:
        run_dir: a finished run folder, or an :class:`InferenceRun`.
        paths: image files and/or folders (searched recursively), see :func:`collect_image_paths`.
        top_k: classes to show per image (the arrays always hold all C).
        batch_size: images per forward pass.
        device: "auto" (GPU if any), "cpu", "cuda"...
        checkpoint: file in the run folder; ``best.pt`` (best val top-1) by default.
        progress: a progress bar over batches.

    Returns:
        :class:`Predictions` (``.table()``, ``.rows()``, ``.save("preds.csv")``); unreadable
        files are in ``.skipped``, not raised.

    >>> preds = predict("runs/demo/center-s0", "photos/", top_k=3, progress=False)   # doctest: +SKIP
    >>> preds.predicted[:2], preds.skipped                                          # doctest: +SKIP
    (['ramen', 'pho'], {'/home/me/photos/broken.jpg': 'truncated or corrupt (image file is truncated)'})
    """
    if top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1")
    run = _as_run(run_dir, checkpoint, device)
    result = _infer(run, collect_image_paths(paths), batch_size, progress, desc="predict")
    if (run.run_dir / "enrolled.npz").is_file():  # dishes added by `foodlib enroll`, ranked with the run's own

        result = with_enrolled(run, result)
    result.top_k = top_k
    return result


def embed(
    run_dir: str | Path | InferenceRun,
    paths: str | Path | Sequence[str | Path],
    out: str | Path | None = None,
    batch_size: int = 64,
    device: str | torch.device = "auto",
    checkpoint: str = "best.pt",
    progress: bool = True,
) -> Predictions:
    """Embeddings ``(N, D)`` and prediction logits ``(N, C)`` of any images; optionally saved to ``out`` (.npz).

    The same computation as :func:`predict` (and as the run's ``features.npz``). The .npz holds
    ``paths``, ``embeddings``, ``logits``, ``classes``, ``skipped_paths`` and ``skipped_reasons``.

    >>> emb = embed("runs/demo/center-s0", "photos/", out="photos.npz", progress=False)   # doctest: +SKIP
    >>> emb.embeddings.shape                                                              # doctest: +SKIP
    (12, 512)
    """
    run = _as_run(run_dir, checkpoint, device)
    result = _infer(run, collect_image_paths(paths), batch_size, progress, desc="embed")
    if out is not None:
        if Path(out).suffix.lower() != ".npz":
            raise ValueError(f"out={str(out)!r}: embeddings are written as .npz; use a file name ending in .npz")
        result.save(out)
    return result


# ----- enrol new dishes (stored by foodlib.enrolled) ------------------------------------------------

@dataclass
class Enrollment:
    """What one :func:`enroll` call did."""

    names: list[str]  # dishes added
    counts: list[int]  # photos used per added dish
    skipped: dict[str, str] = field(default_factory=dict)  # unreadable photo -> reason
    empty: list[str] = field(default_factory=list)  # dish folders with no readable photo (not added)


def _dish_folders(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; pass FOLDER with one subfolder of photos per dish")
    dishes = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not dishes:
        raise ValueError(f"{folder} has no dish folders; put each new dish's photos in FOLDER/<dish name>/")
    return dishes


def enroll(run_dir, folder, checkpoint: str = "best.pt", device="auto", batch_size: int = 64,
           progress: bool = False) -> Enrollment:
    """Enroll every ``folder/<dish>/`` photo folder as a new dish of the run (saved in ``RUN/enrolled.npz``).

    Raises:
        ValueError: a dish name the run already has (its own classes or enrolled ones), a loss
            without class geometry (softmax), a folder without dish folders, or no readable photo at all.

    Unreadable photos are skipped and listed in ``Enrollment.skipped``; a dish folder without a
    readable photo is left out and listed in ``Enrollment.empty``.
    """
    run = _as_run(run_dir, checkpoint, device)
    check_enrollable(run)
    existing = enrolled_dishes(run.run_dir)
    if existing is not None and existing.checkpoint != run.checkpoint:
        raise ValueError(f"{run.run_dir / ENROLLED_FILE} holds dishes embedded with {existing.checkpoint}; "
                         f"enroll with --checkpoint {existing.checkpoint} or remove them first")
    dishes = _dish_folders(Path(folder).expanduser())
    taken = set(run.classes) | set(existing.names if existing is not None else [])
    clashes = [d.name for d in dishes if d.name in taken]
    if clashes:
        raise ValueError(f"dish name(s) {clashes} already exist in {run.run_dir}; rename the folder(s), or remove the "
                         "enrolled dish first (foodlib enroll RUN --remove NAME)")

    photos, photo_dish = [], []
    empty = []
    for i, dish in enumerate(dishes):
        files = sorted(str(p.resolve()) for p in dish.rglob("*")
                       if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            empty.append(dish.name)
        photos += files
        photo_dish += [i] * len(files)
    if not photos:
        raise ValueError(f"no photos in the dish folders of {folder} (looked for {', '.join(sorted(IMAGE_EXTENSIONS)[:6])}...)")
    embedded = _infer(run, photos, batch_size, progress, desc="enroll")
    dish_of = dict(zip(photos, photo_dish))
    kept_dish = np.asarray([dish_of[p] for p in embedded.paths], dtype=np.int64)

    prior_var = None
    if run.cfg.loss.loss == "lgm" and run.loss.log_var is not None:
        prior_var = np.exp(run.loss.log_var.detach().float().cpu().numpy()).mean(0)  # (D,)
    names, means, log_vars, counts, labels = [], [], [], [], []
    for i, dish in enumerate(dishes):
        rows = np.flatnonzero(kept_dish == i)
        if not len(rows):
            if dish.name not in empty:
                empty.append(dish.name)  # every photo unreadable
            continue
        emb = embedded.embeddings[rows].astype(np.float64)  # (n, D)
        names.append(dish.name)
        means.append(emb.mean(0))
        counts.append(len(rows))
        labels.append(np.full(len(rows), len(names) - 1))
        if prior_var is not None:
            n = len(rows) - 1  # degrees of freedom of the sample variance
            sample = emb.var(0, ddof=1) if n > 0 else prior_var
            log_vars.append(np.log((n * sample + PRIOR_PHOTOS * prior_var) / (n + PRIOR_PHOTOS)))
    if not names:
        raise ValueError(f"no readable photo in any dish folder of {folder}; skipped: {embedded.skipped}")

    dim = embedded.embeddings.shape[1]
    added = EnrolledDishes(names, np.asarray(means, np.float32).reshape(-1, dim), np.asarray(counts),
                           np.asarray(log_vars, np.float32) if prior_var is not None else None,
                           list(embedded.paths), np.concatenate(labels), embedded.embeddings, run.checkpoint)
    if existing is not None and len(existing):
        added = merge_dishes(existing, added)
    added.save(run.run_dir)
    return Enrollment(names, [int(c) for c in counts], dict(embedded.skipped), empty)


# ----- nearest neighbours -----------------------------------------------------------------------

def _split_features(run_dir: Path, split: str, classes: list[str]) -> tuple[list[str], dict[str, np.ndarray]]:
    """Paths and features of one split, checked to line up row by row."""
    features_file = run_dir / "features.npz"
    if not features_file.is_file():
        raise FileNotFoundError(f"{features_file} does not exist; train with features=True (the default)")
    features = load_features(features_file)
    if split not in features:
        raise ValueError(f"{features_file} has no {split!r} split; it has {sorted(k for k in features if k != 'classes')}")
    paths, names = read_split_file(run_dir, split)
    feats = features[split]
    labels = np.asarray([classes.index(n) for n in names], dtype=np.int64)
    if len(paths) != len(feats["labels"]) or not np.array_equal(labels, feats["labels"]):
        raise ValueError(
            f"{run_dir}: splits/{split}.txt ({len(paths)} files) does not line up with the {split} rows of "
            f"features.npz ({len(feats['labels'])}); the run folder was changed after training. Re-extract the "
            "features (retrain, or rerun fit with resume=True after deleting features.npz)"
        )
    return paths, feats


def nearest_neighbours(
    run_dir: str | Path | InferenceRun,
    queries: str | Path | Sequence[str | Path] | np.ndarray,
    k: int = 5,
    metric: str | None = None,
    gallery: str = "train",
    batch_size: int = 64,
    device: str | torch.device = "auto",
    checkpoint: str = "best.pt",
    progress: bool = False,
) -> Neighbours:
    """The ``k`` most similar gallery images (training images by default) of each query, in embedding space.

    The gallery is the run's own ``features.npz`` rows of split ``gallery``, with paths from
    ``splits/<gallery>.txt`` (checked to line up). Queries are image files / folders, embedded with
    :func:`embed`, or an ``(Q, D)`` array of embeddings. Search: scikit-learn ``NearestNeighbors``.

    Args:
        metric: "euclidean" or "cosine"; ``None`` takes the metric the run's loss trains for
            (:func:`foodlib.losses.trained_metric`: the loss class's ``metric``).
        gallery: the split searched ("train", "val" or "test").

    Returns:
        :class:`Neighbours` (``.rows()``, ``.figure()``, ``.save()``); unreadable query files are
        in ``.skipped``.

    >>> found = nearest_neighbours("runs/demo/center-s0", "photos/ramen.jpg", k=5)  # doctest: +SKIP
    >>> found.neighbour_classes(0), found.distances[0]                           # doctest: +SKIP
    (['ramen', 'ramen', 'pho', 'ramen', 'ramen'], array([3.1, 3.4, 3.9, 4.0, 4.2], dtype=float32))
    """
    from sklearn.neighbors import NearestNeighbors

    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    run = _as_run(run_dir, checkpoint, device)
    metric = metric or run.metric
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} is not supported; choose one of {', '.join(METRICS)}")
    gallery_paths, gallery_feats = _split_features(run.run_dir, gallery, run.classes)
    gallery_embeddings = gallery_feats["embeddings"]  # (G, D)
    gallery_labels, classes = gallery_feats["labels"], run.classes
    if gallery == "train" and (run.run_dir / "enrolled.npz").is_file():  # enrolled dishes' photos join the gallery

        gallery_paths, gallery_embeddings, gallery_labels, classes = add_enrolled_gallery(
            run, gallery_paths, gallery_embeddings, gallery_labels)

    skipped: dict[str, str] = {}
    if isinstance(queries, np.ndarray):
        query_embeddings = np.atleast_2d(queries).astype(np.float32)  # (Q, D)
        query_paths: list[str | None] = [None] * len(query_embeddings)
        query_predicted: list[str | None] = [None] * len(query_embeddings)
    else:
        embedded = embed(run, queries, batch_size=batch_size, progress=progress)
        query_embeddings, query_paths, skipped = embedded.embeddings, list(embedded.paths), embedded.skipped
        query_predicted = list(embedded.predicted)
    if query_embeddings.shape[1] != gallery_embeddings.shape[1]:
        raise ValueError(f"queries have {query_embeddings.shape[1]} dims but the run's embeddings have "
                         f"{gallery_embeddings.shape[1]}; pass embeddings from this run")

    k_used = min(k, len(gallery_paths))
    if len(query_embeddings):
        index = NearestNeighbors(n_neighbors=k_used, metric=metric).fit(gallery_embeddings)
        distances, indices = index.kneighbors(query_embeddings)  # (Q, k) each, closest first
    else:
        distances, indices = np.zeros((0, k_used)), np.zeros((0, k_used), dtype=np.int64)
    known = _known_classes(run.run_dir)
    query_classes = [known.get(p) if p is not None else None for p in query_paths]
    return Neighbours(query_paths, query_classes, query_predicted, indices.astype(np.int64),
                      distances.astype(np.float32), gallery_paths, gallery_labels, classes, metric,
                      run.image_size, skipped)


def _known_classes(run_dir: Path) -> dict[str, str]:
    """path -> class of every file in the run's split files."""
    known: dict[str, str] = {}
    for file in sorted((run_dir / "splits").glob("*.txt")):
        paths, names = read_split_file(run_dir, file.stem)
        known.update(zip(paths, names))
    return known


# ----- most-confused class pairs ----------------------------------------------------------------

@dataclass
class ConfusedPair:
    """Images of class ``true_class`` that the run took for ``predicted_class``."""

    true_class: str
    predicted_class: str
    count: int
    paths: list[str]


def confused_pairs(run_dir: str | Path | InferenceRun, split: str = "test", n: int = 3) -> list[ConfusedPair]:
    """The run's ``n`` most-confused ordered class pairs on ``split``, with the mistaken files.

    Read from ``features.npz`` (the run's own predictions) and ``splits/<split>.txt``.

    >>> pairs = confused_pairs("runs/demo/center-s0", n=3)                  # doctest: +SKIP
    >>> pairs[0].true_class, pairs[0].predicted_class, pairs[0].count        # doctest: +SKIP
    ('pho', 'ramen', 9)
    """
    run_dir_path = run_dir.run_dir if isinstance(run_dir, InferenceRun) else Path(run_dir)
    classes = [str(c) for c in json.loads((run_dir_path / "classes.json").read_text())]
    paths, feats = _split_features(run_dir_path, split, classes)
    predicted = feats["logits"].argmax(1)
    out = []
    confusion = M.confusion_matrix(feats["labels"], predicted, len(classes))  # (C, C): rows true
    for true, pred, count in M.most_frequent_mistakes(confusion, n):
        members = np.flatnonzero((feats["labels"] == true) & (predicted == pred))
        out.append(ConfusedPair(classes[true], classes[pred], count, [paths[i] for i in members]))
    return out


# ----- export -----------------------------------------------------------------------------------

class InferenceModule(nn.Module):
    """Model and prediction head as one module: normalised images ``(N, 3, H, W)`` -> (embedding, logits).

    The form :func:`export_model` traces: float32, eval mode, no foodlib code needed to run it.

    >>> from foodlib.models import create_model
    >>> from foodlib.losses import create_loss
    >>> module = InferenceModule(create_model("smallcnn"), create_loss("softmax", embedding_dim=256, num_classes=3))
    >>> [t.shape for t in module.eval()(torch.zeros(2, 3, 32, 32))]
    [torch.Size([2, 256]), torch.Size([2, 3])]
    """

    def __init__(self, model: nn.Module, loss: DiscriminativeLoss):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.model(images).float()  # (N, D)
        return embedding, self.loss.predict(embedding)  # (N, D), (N, C)


def export_metadata(run: InferenceRun) -> dict[str, str]:
    """The JSON texts that travel with an exported model: classes, preprocessing, model description."""
    preprocessing = {
        "input": "float32 (N, 3, image_size, image_size), RGB, normalised: (pixel / 255 - mean) / std",
        "image_size": run.image_size,
        "resize_side": run.side,
        "crop_fraction": CROP_FRACTION,
        "resize": f"resize the short side to resize_side ({run.interpolation}, antialiased), take the center "
                  "square, then the center image_size crop (image_size = crop_fraction * resize_side)",
        "interpolation": run.interpolation,  # the resize's resampling (PIL's, antialiased when shrinking)
        "mean": list(normalization(run.model)["mean"]),
        "std": list(normalization(run.model)["std"]),
        "weights_interpolation": getattr(getattr(run.model, "preprocessing", None), "interpolation", "bilinear"),
        "outputs": ["embedding (N, D) float32", "logits (N, C) float32; softmax gives class probabilities"],
    }
    model = {
        "backbone": run.cfg.model.backbone, "loss": run.cfg.loss.loss, "embedding_dim": int(run.model.embedding_dim),
        "num_classes": len(run.classes), "neighbour_metric": run.metric, "checkpoint": run.checkpoint,
        "run_dir": str(run.run_dir), "foodlib": foodlib.__version__, "torch": torch.__version__,
    }
    texts = {"classes.json": json.dumps(run.classes), "preprocessing.json": json.dumps(preprocessing, indent=2),
             "model.json": json.dumps(model, indent=2)}
    if (run.run_dir / "enrolled.npz").is_file():  # dishes added by `foodlib enroll`: every class's mean, to score them

        texts.update(enrolled_metadata(run))
    return texts


def export_model(
    run_dir: str | Path | InferenceRun,
    format: str = "pt2",
    out: str | Path | None = None,
    checkpoint: str = "best.pt",
) -> Path:
    """Write the run's model as a self-contained file: normalised images -> (embedding, logits).

    ``pt2`` (the default) is a ``torch.export`` ExportedProgram (dynamic batch size) saved with
    ``torch.export.save``; ``classes.json``, ``preprocessing.json`` and ``model.json`` travel
    inside it (``extra_files``) and, merged, as ``model.json`` next to it. Load it without foodlib:
    ``program = torch.export.load("model.pt2"); embedding, logits = program.module()(images)``.

    TorchScript (``torch.jit.trace`` of :class:`InferenceModule`, any batch size) carries
    ``classes.json``, ``preprocessing.json`` (image size, resize side, mean/std, crop fraction)
    and ``model.json`` as ``_extra_files``; ONNX (needs ``pip install onnx onnxscript``) carries
    the same texts as ``metadata_props``. Load a TorchScript export without foodlib with
    ``torch.jit.load(path, _extra_files={"classes.json": ""})`` (or :func:`load_exported`).

    Args:
        format: "pt2" (torch.export), "torchscript" or "onnx".
        out: the file to write; default ``RUN_DIR/export/model.pt2`` (``.pt`` for TorchScript, ``.onnx``).
        checkpoint: file in the run folder; ``best.pt`` by default.

    >>> path = export_model("runs/demo/center-s0")                                       # doctest: +SKIP
    >>> extra = {"classes.json": ""}                                                      # doctest: +SKIP
    >>> program = torch.export.load(str(path), extra_files=extra)                         # doctest: +SKIP
    >>> embedding, logits = program.module()(torch.zeros(2, 3, 64, 64)); json.loads(extra["classes.json"])[:2]  # doctest: +SKIP
    ['apple_pie', 'bibimbap']
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"format={format!r} is not supported; choose one of {', '.join(EXPORT_FORMATS)}")
    suffix = {"pt2": ".pt2", "torchscript": ".pt", "onnx": ".onnx"}[format]
    if out is not None and Path(out).suffix != suffix:  # load_exported (and people) tell formats apart by it
        raise ValueError(f"out={str(out)!r} does not end in {suffix}, the suffix of format={format!r}; name the "
                         f"file {Path(out).with_suffix(suffix).name} or pass the format that fits {Path(out).suffix or 'it'}")
    if format == "onnx":
        _require_onnx()
    run = _as_run(run_dir, checkpoint, "cpu")
    out = Path(out) if out is not None else run.run_dir / "export" / f"model{suffix}"
    out.parent.mkdir(parents=True, exist_ok=True)
    # A copy: a run passed in stays on its device and dtype.
    module = InferenceModule(copy.deepcopy(run.model), copy.deepcopy(run.loss))
    metadata = export_metadata(run)
    if format == "pt2":
        _export_program(module, _example_batch(run.image_size), out, metadata)
    elif format == "torchscript":
        traced = trace_module(module, run.image_size)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
            torch.jit.save(traced, str(out), _extra_files=metadata)
    else:
        with torch.no_grad():
            _export_onnx(module.float().cpu().eval(), _example_batch(run.image_size), out, metadata)
    return out


def _example_batch(image_size: int) -> torch.Tensor:
    # Two images: with batch norm in eval mode nothing depends on the batch, so any N works later.
    return torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))


def trace_module(module: InferenceModule, image_size: int, check: bool = True) -> torch.jit.ScriptModule:
    """``torch.jit.trace`` of ``module`` (moved to CPU, float32, eval mode) for any batch size.

    ``check`` re-traces and compares (torch's ``check_trace``): a guard against backbones with
    data-dependent control flow, worth its few seconds once per export.

    >>> from foodlib.models import create_model
    >>> from foodlib.losses import create_loss
    >>> module = InferenceModule(create_model("smallcnn"), create_loss("lgm", embedding_dim=256, num_classes=3))
    >>> embedding, logits = trace_module(module, 32, check=False)(torch.zeros(5, 3, 32, 32))
    >>> logits.shape
    torch.Size([5, 3])
    """
    module = module.float().cpu().eval()
    with torch.no_grad(), warnings.catch_warnings():
        # The losses' shape check (D is fixed) becomes a trace constant, as it should; and recent
        # torch marks TorchScript deprecated, which is no news to someone asking for TorchScript.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        return torch.jit.trace(module, _example_batch(image_size), check_trace=check)


def _require_onnx() -> None:
    """torch's ONNX exporter needs onnx and onnxscript; neither is a foodlib dependency."""
    import importlib

    missing = []
    for name in ("onnx", "onnxscript"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UserError(
            f"ONNX export needs the {' and '.join(missing)} package(s): pip install onnx onnxscript "
            "(TorchScript export, format='torchscript', needs nothing extra)"
        )


def _export_onnx(module: nn.Module, example: torch.Tensor, out: Path, metadata: dict[str, str]) -> None:
    import onnx

    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(module, (example,), str(out), input_names=["images"], output_names=["embedding", "logits"],
                      dynamic_shapes={"images": {0: batch}}, external_data=False, dynamo=True, verbose=False)
    proto = onnx.load(str(out))
    onnx.helper.set_model_props(proto, metadata)
    onnx.save(proto, str(out))


def _export_program(module: nn.Module, example: torch.Tensor, out: Path, metadata: dict[str, str]) -> None:
    """``torch.export`` of ``module`` (float32, CPU, eval) with a dynamic batch; metadata inside and alongside."""
    module = module.float().cpu().eval()
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.export.export(module, (example,), dynamic_shapes={"images": {0: batch}})
    atomic_write(out, lambda f: torch.export.save(program, f, extra_files=metadata))
    atomic_write_json(out.with_suffix(".json"), {name.removesuffix(".json"): json.loads(text)
                                                 for name, text in metadata.items()})


def load_exported(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Load an export and its metadata: ``(module, {"classes", "preprocessing", "model"})``.

    A ``.pt2`` file gives ``torch.export.load(path).module()``, anything else ``torch.jit.load``.
    Shown here for convenience; it uses nothing but torch, so the same lines work where foodlib
    is not installed.

    >>> module, meta = load_exported("runs/demo/center-s0/export/model.pt")   # doctest: +SKIP
    >>> meta["preprocessing"]["image_size"], meta["classes"][:2]              # doctest: +SKIP
    (64, ['apple_pie', 'bibimbap'])
    """
    extra = {"classes.json": "", "preprocessing.json": "", "model.json": "", "enrolled.json": ""}
    if Path(path).suffix == ".pt2":
        program = torch.export.load(str(path), extra_files=extra)
        return program.module(), {name.removesuffix(".json"): json.loads(text) for name, text in extra.items() if text}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return module, {name.removesuffix(".json"): json.loads(text) for name, text in extra.items() if text}
