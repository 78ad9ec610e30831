"""Open-set evaluation: how well an embedding retrieves, recognises and verifies dishes it never trained on.

Three families of numbers, all from embeddings ``(N, D)`` and labels ``(N,)`` (numpy in, numbers out):

* retrieval (:func:`retrieval_metrics`), leave-one-out over the set: Precision@1, R-Precision and
  MAP@R as defined by Musgrave, Belongie and Lim, "A Metric Learning Reality Check" (ECCV 2020),
  computed by pytorch-metric-learning's ``AccuracyCalculator``; Recall@K (K = 1, 2, 4, 8: a same-class
  image among the K nearest, Song et al. 2016), by scikit-learn's ``NearestNeighbors``;
* few-shot (:func:`few_shot_accuracy`): k-shot nearest-class-mean accuracy over random episodes,
  with its spread across episodes;
* verification (:func:`verification_metrics`): ROC AUC and the true-accept rate at false-accept
  rates 1e-2 and 1e-3 over all same-dish / different-dish pairs (scikit-learn's ROC).

Distances are the loss's own geometry: Euclidean for center, island and L-GM (and softmax by
convention: each loss class's ``metric``), cosine available for every function.

:func:`evaluate_openset` runs all of it at the end of ``fit()`` when ``novel_classes`` held classes
out: the ``novel`` section of ``metrics.json`` (over the pool of held-out images) and the same
retrieval numbers on the known classes' test split (in ``metrics["test"]``).

>>> emb = np.array([[0.0], [1.0], [3.0], [4.0], [10.0]]); labels = np.array([0, 0, 1, 0, 1])
>>> r = retrieval_metrics(emb, labels)
>>> round(r["precision_at_1"], 3), round(r["r_precision"], 3), round(r["map_at_r"], 3), r["recall_at_2"]
(0.4, 0.3, 0.25, 0.8)
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure

from foodlib import plots as P
from foodlib.features import extract_features, load_features, save_features
from foodlib.files import atomic_write_json, atomic_write_text
from foodlib.runfolder import read_split_file

METRICS = ("euclidean", "cosine")
RECALL_KS = (1, 2, 4, 8)
SHOTS = (1, 5)
EPISODES = 200  # few-shot episodes: the mean's standard error is std / sqrt(200), below 0.01 here
FARS = (1e-2, 1e-3)
MAX_VERIFICATION_IMAGES = 3000  # all pairs of at most this many images (4.5 M pairs, ~0.5 s); a random subset above


def _check(emb, labels, metric: str) -> tuple[np.ndarray, np.ndarray]:
    emb = np.asarray(emb, dtype=np.float32)
    labels = np.asarray(labels).astype(np.int64).ravel()
    if emb.ndim != 2 or len(emb) != len(labels):
        raise ValueError(f"embeddings {emb.shape} and labels ({len(labels)},) must be (N, D) and (N,)")
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} is not supported; choose one of {', '.join(METRICS)}")
    if len(np.unique(labels)) < 2:
        raise ValueError(f"open-set metrics need at least 2 classes; the labels hold {len(np.unique(labels))}")
    return emb, labels


def pairwise_distances(a: np.ndarray, b: np.ndarray, metric: str = "euclidean") -> np.ndarray:
    """Distances ``(len(a), len(b))``: Euclidean, or cosine distance ``1 - cos``."""
    from sklearn.metrics import pairwise_distances as sk_distances

    return sk_distances(a, b, metric=metric).astype(np.float64)


# ----- retrieval --------------------------------------------------------------------------------

def retrieval_metrics(emb, labels, metric: str = "euclidean", ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """Leave-one-out retrieval over one set: every image queries all the others.

    Musgrave et al. (2020): for a query with R other images of its class, Precision@1 is whether
    the nearest image shares its class; R-Precision is the fraction of its class among the R
    nearest; MAP@R is ``(1/R) * sum_{i<=R} P(i) * [i-th nearest is of its class]`` with P(i) the
    precision among the i nearest. Each is averaged over queries (images alone in their class are
    no query). Recall@K: the fraction of queries with an image of their class among the K nearest.

    Returns:
        ``precision_at_1``, ``r_precision``, ``map_at_r``, ``recall_at_<K>`` for each K.
    """
    import torch
    from pytorch_metric_learning.distances import CosineSimilarity, LpDistance
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN
    from sklearn.neighbors import NearestNeighbors

    emb, labels = _check(emb, labels, metric)
    distance = LpDistance(normalize_embeddings=False) if metric == "euclidean" else CosineSimilarity()
    calculator = AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r"), k="max_bin_count",
        device=torch.device("cpu"), knn_func=CustomKNN(distance),
        kmeans_func=lambda *args: None,  # clustering metrics are not asked for; avoids needing faiss
    )
    x, y = torch.from_numpy(emb), torch.from_numpy(labels)
    found = calculator.get_accuracy(x, y, x, y, ref_includes_query=True)
    out = {"precision_at_1": float(found["precision_at_1"]), "r_precision": float(found["r_precision"]),
           "map_at_r": float(found["mean_average_precision_at_r"])}

    k_max = min(max(ks), len(emb) - 1)
    # k_max + 1 neighbours, then the query itself (distance 0, first unless duplicated) is removed
    index = NearestNeighbors(n_neighbors=k_max + 1, metric=metric).fit(emb)
    _, nearest = index.kneighbors(emb)  # (N, k_max + 1)
    rows = np.arange(len(emb))
    others = np.array([[j for j in row if j != i][:k_max] for i, row in zip(rows, nearest)])  # (N, k_max)
    hits = labels[others] == labels[:, None]  # (N, k_max)
    has_pair = np.bincount(labels)[labels] > 1  # queries with another image of their class
    for k in ks:
        out[f"recall_at_{k}"] = float(hits[has_pair, : min(k, k_max)].any(axis=1).mean())
    return out


# ----- few-shot ---------------------------------------------------------------------------------

def nearest_mean_accuracy(support_emb, support_labels, query_emb, query_labels, metric: str = "euclidean") -> float:
    """Accuracy of assigning each query to the class whose support mean is nearest."""
    support_labels = np.asarray(support_labels)
    classes = np.unique(support_labels)
    means = np.stack([support_emb[support_labels == c].mean(0) for c in classes])  # (C, D)
    predicted = classes[pairwise_distances(query_emb, means, metric).argmin(1)]
    return float((predicted == np.asarray(query_labels)).mean())


def few_shot_accuracy(emb, labels, shots: int, episodes: int = EPISODES, metric: str = "euclidean",
                      seed: int = 0) -> dict[str, float]:
    """k-shot nearest-class-mean accuracy over random episodes (all classes with > ``shots`` images at once).

    Each episode draws ``shots`` support images per class; every other image of those classes is
    a query, assigned to the nearest support mean. The support draw is the only randomness (seeded).

    Returns:
        ``mean`` and ``std`` of the episode accuracies, ``ci95`` (half-width of the normal 95%
        interval of the mean), ``episodes``, ``ways`` (classes used) and ``shots``.
    """
    emb, labels = _check(emb, labels, metric)
    counts = np.bincount(labels)
    ways = np.flatnonzero(counts > shots)
    if len(ways) < 2:
        raise ValueError(f"{shots}-shot episodes need 2 classes with more than {shots} images; counts {counts.tolist()}")
    members = {c: np.flatnonzero(labels == c) for c in ways}
    rng = np.random.default_rng(seed)
    accuracies = np.empty(episodes)
    for e in range(episodes):
        support = np.concatenate([rng.choice(members[c], size=shots, replace=False) for c in ways])
        query = np.setdiff1d(np.concatenate([members[c] for c in ways]), support)
        accuracies[e] = nearest_mean_accuracy(emb[support], labels[support], emb[query], labels[query], metric)
    std = float(accuracies.std(ddof=1)) if episodes > 1 else 0.0
    return {"mean": float(accuracies.mean()), "std": std, "ci95": 1.96 * std / np.sqrt(episodes),
            "episodes": int(episodes), "ways": int(len(ways)), "shots": int(shots)}


# ----- verification -----------------------------------------------------------------------------

def verification_from_scores(scores, same, fars: Sequence[float] = FARS) -> dict[str, float]:
    """ROC AUC and true-accept rates at false-accept rates from pair scores (higher = more alike).

    TAR@FAR f is the largest true-accept rate of a threshold that accepts at most a fraction f of
    the different-class pairs (0 when none does).
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    scores, same = np.asarray(scores, dtype=np.float64), np.asarray(same, dtype=bool)
    if same.all() or not same.any():
        raise ValueError("verification needs both same-class and different-class pairs")
    fpr, tpr, _ = roc_curve(same, scores)
    out = {"roc_auc": float(roc_auc_score(same, scores))}
    for far in fars:
        ok = fpr <= far
        out[f"tar_at_far_{far:g}"] = float(tpr[ok].max()) if ok.any() else 0.0
    out.update(pairs_same=int(same.sum()), pairs_different=int((~same).sum()))
    return out


def verification_metrics(emb, labels, metric: str = "euclidean", fars: Sequence[float] = FARS,
                         max_images: int = MAX_VERIFICATION_IMAGES, seed: int = 0) -> dict[str, float]:
    """:func:`verification_from_scores` over every pair of images (score: minus the distance).

    Above ``max_images`` images a random subset (``seed``) of that size is paired.
    """
    emb, labels = _check(emb, labels, metric)
    if len(emb) > max_images:
        keep = np.sort(np.random.default_rng(seed).choice(len(emb), max_images, replace=False))
        emb, labels = emb[keep], labels[keep]
    upper = np.triu_indices(len(emb), k=1)
    scores = -pairwise_distances(emb, emb, metric)[upper]  # (P,)
    return verification_from_scores(scores, labels[upper[0]] == labels[upper[1]], fars)


# ----- all of it --------------------------------------------------------------------------------

def openset_metrics(emb, labels, metric: str = "euclidean", shots: Sequence[int] = SHOTS,
                    episodes: int = EPISODES, seed: int = 0) -> dict[str, Any]:
    """Retrieval, few-shot (flattened as ``shot<k>_mean`` etc.) and verification numbers of one set."""
    emb, labels = _check(emb, labels, metric)
    out: dict[str, Any] = {"metric": metric, "n": int(len(labels)), "classes": int(len(np.unique(labels)))}
    out.update(retrieval_metrics(emb, labels, metric))
    for k in shots:
        try:
            few = few_shot_accuracy(emb, labels, k, episodes, metric, seed)
        except ValueError:
            continue  # too few images per class for k shots: left out, not invented
        out.update({f"shot{k}_{name}": value for name, value in few.items() if name in ("mean", "std", "ci95")})
        out["episodes"], out[f"shot{k}_ways"] = few["episodes"], few["ways"]
    out.update(verification_metrics(emb, labels, metric, seed=seed))
    return out


def evaluate_openset(run_dir, model, loss, data, cfg, metrics: dict[str, Any], device="cpu",
                     progress: bool = False) -> dict[str, Any]:
    """At the end of ``fit()``: embed the held-out pool, add ``metrics["novel"]`` and the known test retrieval.

    Writes ``novel_features.npz`` (split ``novel``, classes = the held-out names). Does nothing
    when the run holds no classes out (``data.novel`` is None).
    """
    import torch

    from foodlib.losses import trained_metric  # lazy: torch (the metrics here are numpy-only)
    from foodlib.runtime import autocast_dtype, loader_workers  # lazy: torch

    if getattr(data, "novel", None) is None:
        return metrics
    run_dir, device = Path(run_dir), torch.device(device)
    metric = trained_metric(cfg.loss.loss)
    loader = data.loader("novel", max(cfg.train.batch_size, 128), shuffle=False, workers=loader_workers(cfg, device))
    novel = extract_features(model, loss, loader, cfg.data.image_size, device, autocast_dtype(cfg.train.amp, device),
                             cfg.train.channels_last, progress, desc="features novel")
    save_features(run_dir / "novel_features.npz", {"novel": novel}, data.novel.classes)
    metrics["novel"] = openset_metrics(novel["embeddings"], novel["labels"], metric, seed=cfg.data.split_seed)
    metrics["novel"]["held_out"] = list(data.novel.classes)
    if metric != "cosine":  # the usual alternative, for losses (softmax) that train no metric
        metrics["novel"]["cosine"] = retrieval_metrics(novel["embeddings"], novel["labels"], "cosine")
    features_file = run_dir / "features.npz"
    if "test" in metrics and features_file.is_file():
        test = load_features(features_file).get("test")
        if test is not None and len(np.unique(test["labels"])) > 1:
            metrics["test"].update(retrieval_metrics(test["embeddings"], test["labels"], metric))
        if cfg.train.figures:
            make_openset_figures(run_dir, cfg.data.image_size)
    return metrics


# ----- nearest-neighbour results -------------------------------------------------------------------

@dataclass
class Neighbours:
    """The k nearest gallery images of each query, closest first.

    Attributes:
        query_paths: the query files (``None`` entries for queries given as embeddings).
        query_classes: each query's class when its file is in one of the run's splits, else None.
        query_predicted: each query's predicted class (None for queries given as embeddings).
        indices: ``(Q, k)`` rows of the gallery.
        distances: ``(Q, k)`` in ``metric``, ascending along each row.
        gallery_paths, gallery_labels: the gallery split's files and labels ``(G,)``.
        classes: the run's class names.
        metric: "euclidean" or "cosine" (cosine distance = 1 - cosine similarity).
        image_side: side of the network's input crop, for :meth:`figure`.
        skipped: unreadable query files, path -> reason.
    """

    query_paths: list[str | None]
    query_classes: list[str | None]
    query_predicted: list[str | None]
    indices: np.ndarray
    distances: np.ndarray
    gallery_paths: list[str]
    gallery_labels: np.ndarray
    classes: list[str]
    metric: str
    image_side: int = 64
    skipped: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.indices)

    def neighbour_paths(self, query: int) -> list[str]:
        return [self.gallery_paths[j] for j in self.indices[query]]

    def neighbour_classes(self, query: int) -> list[str]:
        return [self.classes[self.gallery_labels[j]] for j in self.indices[query]]

    def rows(self) -> list[dict[str, Any]]:
        """One dict per (query, rank): query, query_class, rank, path, class, distance."""
        return [
            {"query": self.query_paths[q], "query_class": self.query_classes[q], "rank": r + 1,
             "path": self.gallery_paths[j], "class": self.classes[self.gallery_labels[j]],
             "distance": float(self.distances[q, r])}
            for q in range(len(self)) for r, j in enumerate(self.indices[q])
        ]

    def save(self, path: str | Path) -> Path:
        """Write :meth:`rows` as ``.csv`` or ``.json`` (with the metric and skipped queries)."""
        path = Path(path)
        rows = self.rows()
        if path.suffix.lower() == ".csv":
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=["query", "query_class", "rank", "path", "class", "distance"])
            writer.writeheader()
            writer.writerows(rows)
            return atomic_write_text(path, buffer.getvalue())
        if path.suffix.lower() == ".json":
            return atomic_write_json(path, {"metric": self.metric, "neighbours": rows, "skipped": self.skipped})
        raise ValueError(f"cannot save neighbours as {path.name!r}: use a .csv or .json file name")

    def figure(self, max_queries: int | None = 8, cell_inches: float = 1.5):
        """One row per query: the query image, then its neighbours with class and distance.

        Neighbours of the query's own class are titled in green, others in red (grey when the
        query's class is unknown). Images are the network's view: the evaluation center crop.

        Returns:
            A matplotlib ``Figure`` (not registered with pyplot; save it or show it in a notebook).
        """
        n_rows = len(self) if max_queries is None else min(len(self), max_queries)
        n_cols = self.indices.shape[1] + 1
        fig = Figure(figsize=(cell_inches * n_cols, cell_inches * 1.25 * max(n_rows, 1)), layout="constrained")
        axes = fig.subplots(max(n_rows, 1), n_cols, squeeze=False)
        for ax in axes.ravel():
            ax.set_axis_off()
        for q in range(n_rows):
            query_class = self.query_classes[q]
            title = "query" + (f"\n{query_class}" if query_class else "")
            if self.query_predicted[q] is not None and self.query_predicted[q] != query_class:
                title += f"\n-> {self.query_predicted[q]}"
            _show(axes[q, 0], self.query_paths[q], self.image_side, title, "black")
            for r, j in enumerate(self.indices[q]):
                name = self.classes[self.gallery_labels[j]]
                colour = "grey" if query_class is None else ("tab:green" if name == query_class else "tab:red")
                _show(axes[q, r + 1], self.gallery_paths[j], self.image_side,
                      f"{name}\nd={self.distances[q, r]:.3g}", colour)
        fig.suptitle(f"nearest training images ({self.metric} distance)", fontsize=9)
        return fig


def _show(ax, path: str | None, image_size: int, title: str, colour: str) -> None:
    ax.set_title(title, fontsize=7, color=colour)
    if path is None:
        return
    from foodlib.data.augment import cache_side  # lazy: foodlib.data imports torch (the metrics here are numpy-only)
    from foodlib.data.images import ImageDecodeError, load_image_array  # lazy: as above

    try:
        square = load_image_array(path, cache_side(image_size))  # (S, S, 3)
    except (ImageDecodeError, OSError):
        return
    top = (square.shape[0] - image_size) // 2
    ax.imshow(square[top: top + image_size, top: top + image_size])  # the eval center crop


# ----- figures ----------------------------------------------------------------------------------

def novel_umap(known_emb, novel_emb, novel_labels, novel_classes: Sequence[str], ax=None, title: str | None = None,
               cache_path=None):
    """One UMAP of the known classes' images (grey, behind) and the held-out dishes (a colour per dish).

    Both sets are laid out together, so the figure shows whether the loss gives dishes it never
    saw their own regions or folds them into the known ones.

    Returns:
        The matplotlib Figure.
    """
    known_emb, novel_emb = np.asarray(known_emb, np.float32), np.asarray(novel_emb, np.float32)
    novel_labels = np.asarray(novel_labels)
    both = np.concatenate([known_emb, novel_emb])  # (Nk + Nn, D)
    coords = both if both.shape[1] == 2 else P.umap_embed(both, cache_path=cache_path)
    known_xy, novel_xy = coords[: len(known_emb)], coords[len(known_emb):]
    fig, ax = P._figure_and_axes(ax, figsize=(7.5, 6))
    ax.scatter(known_xy[:, 0], known_xy[:, 1], s=4, c="0.8", linewidths=0, label="known classes (test images)")
    colours, markers = P.class_palette(len(novel_classes)), P.class_markers(len(novel_classes))
    for c, name in enumerate(novel_classes):
        mine = novel_xy[novel_labels == c]
        ax.scatter(mine[:, 0], mine[:, 1], s=10, color=colours[c], marker=markers[c], linewidths=0, label=name)
    ax.legend(fontsize=7, markerscale=1.5, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title(title or "UMAP: held-out dishes (colours) over the known classes (grey)", fontsize=9)
    return fig


def retrieval_grid(paths: Sequence[str], labels, classes: Sequence[str], emb, metric: str = "euclidean",
                   n_queries: int = 6, k: int = 5, image_side: int = 64, seed: int = 0):
    """Query photos of held-out dishes and their ``k`` nearest other photos of the pool, right and wrong marked.

    Queries: ``n_queries`` drawn at random (``seed``), spread over the dishes. Each row is a query
    (its dish in the title) and its neighbours, nearest first: a green title is the query's dish,
    red another dish; ``d`` is the distance in ``metric``.
    """
    from sklearn.neighbors import NearestNeighbors

    emb, labels = np.asarray(emb, np.float32), np.asarray(labels)
    rng = np.random.default_rng(seed)
    dishes = rng.permutation(np.unique(labels))
    queries = [int(rng.choice(np.flatnonzero(labels == dishes[i % len(dishes)]))) for i in range(n_queries)]
    k = min(k, len(emb) - 1)
    distances, indices = NearestNeighbors(n_neighbors=k + 1, metric=metric).fit(emb).kneighbors(emb[queries])
    keep = indices != np.asarray(queries)[:, None]  # drop the query itself
    indices = np.stack([row[m][:k] for row, m in zip(indices, keep)])
    distances = np.stack([row[m][:k] for row, m in zip(distances, keep)])
    found = Neighbours([paths[q] for q in queries], [classes[labels[q]] for q in queries], [None] * len(queries),
                       indices, distances.astype(np.float32), list(paths), labels, list(classes), metric, image_side)
    fig = found.figure(max_queries=None)
    fig.suptitle(f"held-out dishes: each query (left) and its {k} nearest other held-out photos ({metric} distance d); "
                 "green: same dish, red: another dish", fontsize=8)
    return fig


def make_openset_figures(run_dir, image_size: int) -> list[Path]:
    """``figures/novel_umap.png`` and ``figures/novel_retrieval.png`` of a run with held-out classes."""
    from foodlib.losses import trained_metric  # lazy: torch (the metrics here are numpy-only)

    run_dir = Path(run_dir)
    novel = load_features(run_dir / "novel_features.npz")
    known = load_features(run_dir / "features.npz")
    split = "test" if "test" in known else "val"
    loss = "softmax"
    if (run_dir / "config.yaml").is_file():
        import yaml

        loss = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("loss", {}).get("loss", loss)
    classes, feats = novel["classes"], novel["novel"]
    written = [P.save_figure(novel_umap(known[split]["embeddings"], feats["embeddings"], feats["labels"], classes,
                                        cache_path=run_dir / "umap_novel.npz",
                                        title=f"{loss}: held-out dishes (colours) over the known {split} images (grey)"),
                             run_dir / "figures" / "novel_umap.png")]
    paths, _ = read_split_file(run_dir, "novel")
    written.append(P.save_figure(retrieval_grid(paths, feats["labels"], classes, feats["embeddings"],
                                                trained_metric(loss), image_side=image_size),
                                 run_dir / "figures" / "novel_retrieval.png"))
    return written
