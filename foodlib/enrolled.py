"""Dishes added to a trained run from a few photos each, without retraining: storage and scoring.

:func:`foodlib.inference.enroll` embeds the photos and stores them here; this module keeps them
(``RUN/enrolled.npz``), lists and removes them, and scores the run's classes and the enrolled
dishes together for ``predict``, ``neighbours`` and ``export``.

A dish is enrolled as the mean of its photos' embeddings (and, for L-GM with
``covariance="diagonal"``, per-dimension variances); :func:`foodlib.inference.predict` then scores
the run's own classes and the enrolled dishes together, in the loss's geometry:

* center and island loss: every class is a point, the class mean of its embeddings (the run's own
  classes: the mean of their training images' embeddings in ``features.npz``, computed under the
  same evaluation transform as the enrolled photos); the score is ``-1/2 ||x - mean||^2``, the
  distance both losses pull their features in by;
* L-GM: the run's classes are its Gaussians (``loss.means``, ``loss.log_var``), scored by the very
  log-likelihood ``loss.predict`` uses; an enrolled dish is a Gaussian at its photos' mean, with the
  identity covariance, or with diagonal covariance the photos' variance shrunk towards the run's
  average class variance (``PRIOR_PHOTOS`` pseudo-photos: a 5-photo variance alone is too noisy);
* softmax trains a linear classifier and no distance, so it has no class geometry to add a dish to:
  it is refused (its embeddings' open-set quality is still measured, by ``novel_classes``).

Everything lives in ``RUN/enrolled.npz`` (no pickle; rewritten atomically): ``names``, ``means``
``(E, D)``, ``log_var`` ``(E, D)`` (L-GM diagonal), ``counts``, and the photos' ``paths``,
``path_labels`` and ``embeddings`` (for ``neighbours``).

>>> added = enroll("runs/demo/center-s0", "new_dishes/")          # doctest: +SKIP
>>> added.names, added.skipped                                      # doctest: +SKIP
(['laksa', 'poke'], {'/home/me/new_dishes/poke/broken.jpg': 'truncated or corrupt'})
>>> predict("runs/demo/center-s0", "photos/").predicted             # doctest: +SKIP
['laksa', 'ramen', 'poke']

Command line: ``foodlib enroll RUN FOLDER``, ``foodlib enroll RUN --list``, ``foodlib enroll RUN
--remove NAME``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from foodlib.features import load_features
from foodlib.files import atomic_write


ENROLLED_FILE = "enrolled.npz"
SUPPORTED_LOSSES = ("center", "island", "lgm")
PRIOR_PHOTOS = 10  # L-GM diagonal: weight, in photos, of the run's average variance in an enrolled dish's variance

__all__ = ["EnrolledDishes", "class_scores", "enrolled_dishes", "merge_dishes", "remove_enrolled"]


@dataclass
class EnrolledDishes:
    """The dishes enrolled in a run (empty arrays when none)."""

    names: list[str]
    means: np.ndarray  # (E, D)
    counts: np.ndarray  # (E,) photos per dish
    log_var: np.ndarray | None = None  # (E, D), L-GM diagonal only
    paths: list[str] = field(default_factory=list)  # every enrolled photo
    path_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (P,) index into names
    embeddings: np.ndarray | None = None  # (P, D)
    checkpoint: str = "best.pt"

    def __len__(self) -> int:
        return len(self.names)

    def save(self, run_dir: str | Path) -> Path:
        arrays = {"names": np.asarray(self.names, dtype=str), "means": self.means.astype(np.float32),
                  "counts": self.counts.astype(np.int64), "paths": np.asarray(self.paths, dtype=str),
                  "path_labels": self.path_labels.astype(np.int64),
                  "embeddings": (self.embeddings if self.embeddings is not None
                                 else np.zeros((0, self.means.shape[1]))).astype(np.float32),
                  "checkpoint": np.asarray(self.checkpoint)}
        if self.log_var is not None:
            arrays["log_var"] = self.log_var.astype(np.float32)
        return atomic_write(Path(run_dir) / ENROLLED_FILE, lambda f: np.savez(f, **arrays))


def enrolled_dishes(run_dir: str | Path) -> EnrolledDishes | None:
    """The run's enrolled dishes, or None when nothing is enrolled (read without pickle)."""
    file = Path(run_dir) / ENROLLED_FILE
    if not file.is_file():
        return None
    try:
        with np.load(file, allow_pickle=False) as npz:
            return EnrolledDishes(
                names=[str(n) for n in npz["names"]], means=npz["means"], counts=npz["counts"],
                log_var=npz["log_var"] if "log_var" in npz.files else None, paths=[str(p) for p in npz["paths"]],
                path_labels=npz["path_labels"], embeddings=npz["embeddings"], checkpoint=str(npz["checkpoint"]))
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"{file} is unreadable ({error}); delete it and enroll the dishes again") from error


def check_enrollable(run) -> None:
    name = run.cfg.loss.loss
    if name not in SUPPORTED_LOSSES:
        raise ValueError(
            f"{run.run_dir} was trained with loss={name!r}, which learns a linear classifier and no class geometry "
            f"to add a dish to; enroll works with runs trained with {', '.join(SUPPORTED_LOSSES)}"
        )


# ----- scoring ----------------------------------------------------------------------------------

def _original_classes(run) -> tuple[np.ndarray, np.ndarray | None]:
    """Means ``(C, D)`` (and L-GM log-variances ``(C, D)`` or None) of the run's own classes."""
    if run.cfg.loss.loss == "lgm":
        log_var = run.loss.log_var
        return (run.loss.means.detach().float().cpu().numpy(),
                None if log_var is None else log_var.detach().float().cpu().numpy())

    file = run.run_dir / "features.npz"
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist; enroll needs the training embeddings (train with features=True)")
    train = load_features(file)["train"]
    counts = np.bincount(train["labels"], minlength=len(run.classes))
    if (counts == 0).any():
        missing = [run.classes[i] for i in np.flatnonzero(counts == 0)]
        raise ValueError(f"{file} has no training embeddings of {missing}; it does not belong to this run")
    sums = np.zeros((len(run.classes), train["embeddings"].shape[1]))
    np.add.at(sums, train["labels"], train["embeddings"])
    return (sums / counts[:, None]).astype(np.float32), None


def gaussian_scores(emb: np.ndarray, means: np.ndarray, log_var: np.ndarray | None) -> np.ndarray:
    """``-(1/2 sum_d (x_d - mu_kd)^2 / var_kd + 1/2 sum_d log var_kd)`` ``(N, K)``; unit variances when None."""
    emb, means = emb.astype(np.float64), means.astype(np.float64)
    if log_var is None:
        squared = (emb ** 2).sum(1)[:, None] - 2 * emb @ means.T + (means ** 2).sum(1)[None]
        return -0.5 * np.maximum(squared, 0.0)
    precision = np.exp(-log_var.astype(np.float64))  # (K, D)
    squared = (emb ** 2) @ precision.T - 2 * emb @ (means * precision).T + (means ** 2 * precision).sum(1)[None]
    return -0.5 * np.maximum(squared, 0.0) - 0.5 * log_var.sum(1)[None]


def class_scores(run, embeddings: np.ndarray, dishes: EnrolledDishes | None = None) -> tuple[list[str], np.ndarray]:
    """Class names (the run's, then the enrolled) and scores ``(N, C + E)``, higher = more likely."""
    check_enrollable(run)
    dishes = dishes if dishes is not None else enrolled_dishes(run.run_dir)
    means, log_var = _original_classes(run)
    names = list(run.classes)
    if dishes is not None and len(dishes):
        means = np.concatenate([means, dishes.means])
        if log_var is not None:
            log_var = np.concatenate([log_var, dishes.log_var])
        names += dishes.names
    return names, gaussian_scores(embeddings, means, log_var).astype(np.float32)


def with_enrolled(run, predictions):
    """``predictions`` (from :func:`foodlib.inference.predict`) re-scored over the run's and the enrolled dishes.

    Unchanged when nothing is enrolled, or when the enrolled dishes were embedded with another
    checkpoint (their means would sit in another space; a warning says so).
    """
    import warnings

    dishes = enrolled_dishes(run.run_dir)
    if dishes is None or not len(dishes):
        return predictions
    if dishes.checkpoint != run.checkpoint:
        warnings.warn(f"{run.run_dir / ENROLLED_FILE} was made with {dishes.checkpoint}, not {run.checkpoint}; "
                      "the enrolled dishes are left out of these predictions", stacklevel=2)
        return predictions
    predictions.classes, predictions.logits = class_scores(run, predictions.embeddings, dishes)
    return predictions


def add_enrolled_gallery(run, paths: list[str], embeddings: np.ndarray, labels: np.ndarray
                         ) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """A ``neighbours`` gallery with the enrolled photos appended (labels after the run's classes).

    Returns ``(paths, embeddings (G, D), labels (G,), class names)``; unchanged when nothing is
    enrolled with this checkpoint.
    """
    dishes = enrolled_dishes(run.run_dir)
    if dishes is None or not len(dishes) or dishes.checkpoint != run.checkpoint:
        return paths, embeddings, labels, list(run.classes)
    return (list(paths) + dishes.paths, np.concatenate([embeddings, dishes.embeddings.astype(embeddings.dtype)]),
            np.concatenate([labels, dishes.path_labels + len(run.classes)]), list(run.classes) + dishes.names)


def enrolled_metadata(run) -> dict[str, str]:
    """``{"enrolled.json": text}`` for an export: every class's mean (and L-GM log-variances) and the score.

    The exported model's own logits cover the trained classes only; with these means a consumer
    scores the trained and enrolled dishes together from the exported embedding. Empty when
    nothing is enrolled with the exported checkpoint.
    """
    import json

    dishes = enrolled_dishes(run.run_dir)
    if dishes is None or not len(dishes) or dishes.checkpoint != run.checkpoint:
        return {}
    means, log_var = _original_classes(run)
    names = list(run.classes) + dishes.names
    means = np.concatenate([means, dishes.means])
    if log_var is not None:
        log_var = np.concatenate([log_var, dishes.log_var])
    text = {"classes": names, "enrolled": dishes.names, "means": np.round(means, 6).tolist(),
            "log_var": None if log_var is None else np.round(log_var, 6).tolist(),
            "score": "higher is more likely: -(1/2 sum_d (x_d - mean_kd)^2 / var_kd + 1/2 sum_d log var_kd), "
                     "var = 1 when log_var is null; x is the exported embedding"}
    return {"enrolled.json": json.dumps(text)}


# ----- enrol / list / remove --------------------------------------------------------------------

def merge_dishes(old: EnrolledDishes, new: EnrolledDishes) -> EnrolledDishes:
    return EnrolledDishes(
        old.names + new.names, np.concatenate([old.means, new.means]), np.concatenate([old.counts, new.counts]),
        None if old.log_var is None else np.concatenate([old.log_var, new.log_var]), old.paths + new.paths,
        np.concatenate([old.path_labels, new.path_labels + len(old.names)]),
        np.concatenate([old.embeddings, new.embeddings]), old.checkpoint)


def remove_enrolled(run_dir, name: str) -> EnrolledDishes:
    """Remove one enrolled dish (the file is rewritten atomically; removed when it was the last)."""
    dishes = enrolled_dishes(run_dir)
    if dishes is None or name not in dishes.names:
        have = dishes.names if dishes is not None else []
        raise ValueError(f"{name!r} is not enrolled in {run_dir}; enrolled dishes: {have or 'none'}")
    i = dishes.names.index(name)
    keep = np.array([j for j in range(len(dishes)) if j != i], dtype=np.int64)
    photo_keep = dishes.path_labels != i
    relabel = np.arange(len(dishes)) - (np.arange(len(dishes)) > i)  # old dish index -> index after removal
    left = EnrolledDishes(
        [dishes.names[j] for j in keep], dishes.means[keep], dishes.counts[keep],
        None if dishes.log_var is None else dishes.log_var[keep],
        [p for p, k in zip(dishes.paths, photo_keep) if k], relabel[dishes.path_labels[photo_keep]],
        dishes.embeddings[photo_keep], dishes.checkpoint)
    if len(left):
        left.save(run_dir)
    else:
        (Path(run_dir) / ENROLLED_FILE).unlink()
    return left
