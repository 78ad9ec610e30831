"""Numbers from saved arrays: accuracy, feature-space geometry, and uncertainty across samples and seeds.

Every function takes numpy arrays (logits ``(N, C)``, embeddings ``(N, D)``, integer labels ``(N,)``)
and returns plain Python floats, lists and dicts, so results go straight into ``metrics.json``.
The two exceptions are :func:`per_class_accuracy` and :func:`confusion_matrix`, whose natural
result is an array. This module is a leaf: it imports numpy, scipy and scikit-learn, never torch.

>>> import numpy as np
>>> logits = np.array([[2.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 1.0, 2.0], [2.0, 0.0, 1.0]])
>>> accuracy(logits, np.array([0, 2, 2, 1]), k=(1, 2))
{'top1': 0.5, 'top2': 0.75}

Feature metrics follow the papers' notation: class means ``mu_c``, overall mean ``mu``,
within-class scatter ``S_W = sum_i (x_i - mu_{y_i})(x_i - mu_{y_i})^T`` and between-class scatter
``S_B = sum_c n_c (mu_c - mu)(mu_c - mu)^T``.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
from scipy import stats
from scipy.spatial.distance import pdist
from sklearn.cluster import KMeans
from sklearn.metrics import confusion_matrix as _sk_confusion_matrix
from sklearn.metrics import normalized_mutual_info_score, silhouette_score
from sklearn.neighbors import KNeighborsClassifier

__all__ = [
    "accuracy", "top1_accuracy", "topk_accuracy", "per_class_accuracy", "confusion_matrix",
    "most_confused_pairs", "most_frequent_mistakes", "intra_class_variance", "class_mean_distances", "fisher_ratio", "silhouette",
    "knn_accuracy", "nmi", "bootstrap_ci", "paired_comparison", "mean_ci", "feature_metrics",
    "classification_metrics",
]

SILHOUETTE_MAX_SAMPLES = 5000  # silhouette is O(N^2); 5000 points: ~1 s, seed-to-seed spread ~0.002
KNN_MAX_QUERIES = 10_000  # kNN queries per split in feature_metrics: standard error < 0.005, bounded time
KMEANS_N_INIT = 4  # k-means restarts for NMI; 10 gave the same NMI on benchmark-like embeddings, 1 was 0.008 lower


# -- input checks ------------------------------------------------------------------------------------


def _as_logits(logits, labels) -> tuple[np.ndarray, np.ndarray]:
    logits = np.asarray(logits)
    labels = _as_labels(labels, "labels")
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (N, C); got shape {logits.shape}. "
                         "Pass one row of class scores per sample.")
    if len(logits) != len(labels):
        raise ValueError(f"logits has {len(logits)} rows but labels has {len(labels)} entries; "
                         "pass the labels of the same samples, in the same order.")
    if len(labels) and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise ValueError(f"labels must lie in [0, {logits.shape[1] - 1}] for logits with {logits.shape[1]} "
                         f"columns; got min {labels.min()}, max {labels.max()}.")
    return logits, labels


def _as_labels(labels, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of class indices; got shape {labels.shape}.")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.equal(np.mod(labels, 1), 0)):
            raise ValueError(f"{name} must hold integer class indices; got dtype {labels.dtype} "
                             "with non-integer values.")
        labels = labels.astype(np.int64)
    return labels


def _as_embeddings(emb, labels, name: str = "emb", min_classes: int = 1) -> tuple[np.ndarray, np.ndarray]:
    emb = np.asarray(emb, dtype=np.float64)  # float64: sums of squares over 30k x 512 float32 lose digits
    labels = _as_labels(labels, f"{name} labels")
    if emb.ndim != 2:
        raise ValueError(f"{name} must have shape (N, D); got shape {emb.shape}. Flatten features to one "
                         "row per sample.")
    if len(emb) != len(labels):
        raise ValueError(f"{name} has {len(emb)} rows but its labels have {len(labels)} entries; "
                         "pass the labels of the same samples.")
    if not np.all(np.isfinite(emb)):
        raise ValueError(f"{name} contains NaN or inf values; check the model output (diverged training?).")
    n_classes = len(np.unique(labels))
    if n_classes < min_classes:
        raise ValueError(f"this metric needs at least {min_classes} classes in the labels; got {n_classes}.")
    return emb, labels


def _class_means(emb: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class means of the classes present, the counts, and each sample's class row index."""
    classes, row_of_sample, counts = np.unique(labels, return_inverse=True, return_counts=True)
    sums = np.zeros((len(classes), emb.shape[1]))  # (C, D)
    np.add.at(sums, row_of_sample, emb)
    return sums / counts[:, None], counts, row_of_sample  # (C, D), (C,), (N,)


# -- accuracy ----------------------------------------------------------------------------------------


def topk_accuracy(logits, labels, k: int = 5) -> float:
    """Fraction of samples whose label is among the ``k`` highest logits.

    ``k`` is clamped to the number of classes C, so top-5 with C < 5 is top-C, which is 1.0: every
    label is among all the classes. Ties between logits are broken by class index (lower first).

    Args:
        logits: class scores, shape ``(N, C)``.
        labels: true class indices, shape ``(N,)``.
        k: how many top classes count as a hit.

    >>> topk_accuracy(np.array([[0.1, 0.5, 0.4]]), np.array([2]), k=2)
    1.0
    """
    logits, labels = _as_logits(logits, labels)
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}.")
    if len(labels) == 0:
        raise ValueError("accuracy of an empty set is undefined; pass at least one sample.")
    k = min(int(k), logits.shape[1])
    # By hand rather than sklearn.top_k_accuracy_score: that treats two-class input as binary and
    # rejects k >= C, while this is one stable sort and covers every C.
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]  # (N, k)
    return float(np.mean(np.any(top == labels[:, None], axis=1)))


def top1_accuracy(logits, labels) -> float:
    """Fraction of samples whose highest logit is the true class (ties: lower class index wins).

    >>> top1_accuracy(np.array([[0.1, 0.9], [0.8, 0.2]]), np.array([1, 1]))
    0.5
    """
    return topk_accuracy(logits, labels, k=1)


def accuracy(logits, labels, k: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracies as ``{"top1": ..., "top5": ...}``; see :func:`topk_accuracy` for the clamping.

    >>> accuracy(np.array([[0.2, 0.8], [0.6, 0.4]]), np.array([1, 1]))
    {'top1': 0.5, 'top5': 1.0}
    """
    return {f"top{int(kk)}": topk_accuracy(logits, labels, int(kk)) for kk in k}


def confusion_matrix(labels, pred, num_classes: int) -> np.ndarray:
    """Counts ``(C, C)``: row = true class, column = predicted class (scikit-learn's convention).

    >>> confusion_matrix(np.array([0, 0, 1]), np.array([0, 1, 1]), 2).tolist()
    [[1, 1], [0, 1]]
    """
    labels, pred = _as_labels(labels, "labels"), _as_labels(pred, "pred")
    if len(labels) != len(pred):
        raise ValueError(f"labels has {len(labels)} entries but pred has {len(pred)}; pass matching arrays.")
    return _sk_confusion_matrix(labels, pred, labels=np.arange(num_classes))


def per_class_accuracy(pred, labels, num_classes: int) -> np.ndarray:
    """Recall of each class, shape ``(C,)``; NaN for a class with no samples in ``labels``.

    >>> per_class_accuracy(np.array([0, 1, 1, 1]), np.array([0, 0, 1, 1]), 3).tolist()
    [0.5, 1.0, nan]
    """
    confusion = confusion_matrix(labels, pred, num_classes)  # (C, C)
    support = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(confusion) / np.maximum(support, 1), np.nan)


def most_confused_pairs(confusion, class_names: Sequence[str] | None = None, k: int = 5,
                        normalize: bool = False) -> list[tuple]:
    """The ``k`` unordered class pairs most often mistaken for each other, most confused first.

    A pair's count is ``confusion[a, b] + confusion[b, a]`` (errors in both directions). With
    ``normalize=True`` it is a rate instead: that count over the number of samples of a and b,
    ``(c_ab + c_ba) / (n_a + n_b)``, so large classes do not dominate. Pairs never confused are
    left out, so fewer than ``k`` pairs may come back. Ties are ordered by class index.

    Args:
        confusion: counts ``(C, C)`` from :func:`confusion_matrix`.
        class_names: names for the ``C`` classes; ``None`` returns class indices instead.
        k: how many pairs at most.
        normalize: report rates instead of counts.

    Returns:
        ``[(a, b, value), ...]`` with ``a`` before ``b`` in class order.

    >>> most_confused_pairs(np.array([[5, 2, 0], [3, 4, 1], [0, 0, 9]]), ["pho", "ramen", "soup"], k=2)
    [('pho', 'ramen', 5), ('ramen', 'soup', 1)]
    """
    confusion = np.asarray(confusion)
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion must be a square (C, C) matrix; got shape {confusion.shape}.")
    n_classes = confusion.shape[0]
    if class_names is not None and len(class_names) != n_classes:
        raise ValueError(f"class_names has {len(class_names)} names for a {n_classes}-class confusion matrix.")
    a_idx, b_idx = np.triu_indices(n_classes, k=1)
    pair_counts = confusion[a_idx, b_idx] + confusion[b_idx, a_idx]  # (C(C-1)/2,)
    if normalize:
        support = confusion.sum(axis=1)
        values = pair_counts / np.maximum(support[a_idx] + support[b_idx], 1)
    else:
        values = pair_counts
    order = np.lexsort((b_idx, a_idx, -values))  # value descending, then class order
    order = [i for i in order if pair_counts[i] > 0][:k]
    name = (lambda i: int(i)) if class_names is None else (lambda i: class_names[i])
    cast = float if normalize else int
    return [(name(a_idx[i]), name(b_idx[i]), cast(values[i])) for i in order]


# -- feature space -----------------------------------------------------------------------------------



def most_frequent_mistakes(confusion, k: int = 3) -> list[tuple[int, int, int]]:
    """The ``k`` most frequent mistakes as ``(true class, predicted class, count)``, most frequent first.

    Unlike :func:`most_confused_pairs`, the direction counts: "a taken for b" and "b taken for a"
    are separate mistakes (what ``foodlib.inference.confused_pairs`` shows images of). Mistakes
    that never occur are left out; ties keep the lower (true, predicted).

    >>> most_frequent_mistakes(confusion_matrix(np.array([0, 0, 0, 1, 2, 2]), np.array([1, 1, 0, 1, 0, 2]), 3))
    [(0, 1, 2), (2, 0, 1)]
    """
    confusion = np.array(confusion)  # a copy: the diagonal is cleared
    num_classes = confusion.shape[0]
    np.fill_diagonal(confusion, 0)
    flat = np.argsort(-confusion.ravel(), kind="stable")[:k]
    mistakes = [(int(i // num_classes), int(i % num_classes), int(confusion.flat[i])) for i in flat]
    return [m for m in mistakes if m[2] > 0]


def intra_class_variance(emb, labels) -> float:
    """Mean squared distance of each sample to its class mean, averaged over samples.

    ``(1/N) sum_i ||x_i - mu_{y_i}||^2 = trace(S_W) / N``. Averaged over samples rather than over
    classes because that is the quantity Center Loss minimises (its ``1/2 ||x_i - c_{y_i}||^2`` is
    summed over samples), it matches the denominator of :func:`fisher_ratio`, and a class with
    three images cannot swing it.

    >>> intra_class_variance(np.array([[0.0, 0.0], [2.0, 0.0], [5.0, 5.0]]), np.array([0, 0, 1]))
    0.6666666666666666
    """
    emb, labels = _as_embeddings(emb, labels)
    means, _, row_of_sample = _class_means(emb, labels)
    return float(np.mean(np.sum((emb - means[row_of_sample]) ** 2, axis=1)))


def class_mean_distances(emb, labels) -> dict[str, float]:
    """Euclidean distances between class means over all pairs of classes: ``{"min", "mean"}``.

    >>> class_mean_distances(np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]]), np.array([0, 1, 2]))
    {'min': 3.0, 'mean': 4.0}
    """
    emb, labels = _as_embeddings(emb, labels, min_classes=2)
    means, _, _ = _class_means(emb, labels)
    distances = pdist(means)  # (C(C-1)/2,) Euclidean
    return {"min": float(distances.min()), "mean": float(distances.mean())}


def fisher_ratio(emb, labels) -> float:
    """Between-class over within-class scatter, ``trace(S_B) / trace(S_W)``.

    ``trace(S_B) = sum_c n_c ||mu_c - mu||^2`` and ``trace(S_W) = sum_i ||x_i - mu_{y_i}||^2``
    (the scatter matrices in the module docstring), computed without forming the ``(D, D)``
    matrices. Higher means tighter, farther-apart classes; ``inf`` when every class is a point.

    >>> fisher_ratio(np.array([[0.0], [2.0], [10.0], [12.0]]), np.array([0, 0, 1, 1]))
    25.0
    """
    emb, labels = _as_embeddings(emb, labels, min_classes=2)
    means, counts, row_of_sample = _class_means(emb, labels)
    overall_mean = emb.mean(axis=0)  # (D,)
    between = float(np.sum(counts * np.sum((means - overall_mean) ** 2, axis=1)))
    within = float(np.sum((emb - means[row_of_sample]) ** 2))
    return between / within if within > 0 else float("inf")


def silhouette(emb, labels, max_samples: int | None = SILHOUETTE_MAX_SAMPLES, seed: int = 0) -> float:
    """Mean silhouette coefficient (scikit-learn, Euclidean) on at most ``max_samples`` points.

    The silhouette needs all pairwise distances (O(N^2)), so above ``max_samples`` points it is
    computed on a random subset drawn with ``seed`` (scikit-learn's ``sample_size``), which is
    reproducible. ``None`` uses every point.

    >>> silhouette(np.array([[0.0], [0.1], [5.0], [5.1]]), np.array([0, 0, 1, 1])) > 0.9
    True
    """
    emb, labels = _as_embeddings(emb, labels, min_classes=2)
    if len(np.unique(labels)) >= len(labels):
        raise ValueError(f"silhouette needs fewer classes than samples; got {len(labels)} samples, "
                         "each in its own class.")
    sample_size = max_samples if max_samples is not None and len(labels) > max_samples else None
    return float(silhouette_score(emb, labels, sample_size=sample_size, random_state=seed))


def knn_accuracy(gallery_emb, gallery_labels, query_emb=None, query_labels=None, k: int = 1,
                 metric: str = "euclidean", max_queries: int | None = None, seed: int = 0) -> float:
    """Accuracy of a k-nearest-neighbour vote (scikit-learn) from a labelled gallery.

    Args:
        gallery_emb: labelled reference embeddings ``(M, D)`` (usually the train split).
        gallery_labels: their labels ``(M,)``.
        query_emb: embeddings to classify ``(N, D)``; ``None`` means leave-one-out on the gallery
            (each gallery point is classified by its neighbours other than itself).
        query_labels: their labels ``(N,)``.
        k: neighbours that vote (uniform weights; ties go to the lower class index, as in
            ``KNeighborsClassifier.predict``).
        metric: ``"euclidean"`` or ``"cosine"`` (angle only, for normalised-feature losses).
        max_queries: classify at most this many queries, a random subset drawn with ``seed``
            (10,000 queries give a standard error under 0.005); ``None`` uses all.
        seed: seed of that subset.

    >>> gallery = np.array([[0.0, 0.0], [0.0, 1.0], [9.0, 9.0]])
    >>> knn_accuracy(gallery, np.array([0, 0, 1]), np.array([[1.0, 0.0], [8.0, 9.0]]), np.array([0, 0]))
    0.5
    """
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"metric must be 'euclidean' or 'cosine'; got {metric!r}.")
    gallery_emb, gallery_labels = _as_embeddings(gallery_emb, gallery_labels, "gallery_emb")
    leave_one_out = query_emb is None
    if k < 1 or k > len(gallery_labels) - int(leave_one_out):
        raise ValueError(f"k must be between 1 and the gallery size ({len(gallery_labels)}"
                         f"{' - 1 for leave-one-out' if leave_one_out else ''}); got {k}.")
    if leave_one_out:
        query_emb, query_labels = gallery_emb, gallery_labels
    else:
        query_emb, query_labels = _as_embeddings(query_emb, query_labels, "query_emb")
        if query_emb.shape[1] != gallery_emb.shape[1]:
            raise ValueError(f"query_emb has D={query_emb.shape[1]} but gallery_emb has D={gallery_emb.shape[1]}.")
    query_rows = np.arange(len(query_labels))  # (N,)
    if max_queries is not None and len(query_rows) > max_queries:
        query_rows = np.sort(np.random.default_rng(seed).choice(len(query_rows), max_queries, replace=False))
    classifier = KNeighborsClassifier(n_neighbors=k, metric=metric).fit(gallery_emb, gallery_labels)
    if not leave_one_out:
        return float(np.mean(classifier.predict(query_emb[query_rows]) == query_labels[query_rows]))
    # Leave-one-out: ask for k + 1 neighbours and drop the query itself (moved last by a stable sort;
    # when exact duplicates push it out of the list, the first k are all others anyway).
    neighbours = classifier.kneighbors(gallery_emb[query_rows], n_neighbors=k + 1, return_distance=False)
    is_self = neighbours == query_rows[:, None]  # (n, k + 1)
    neighbours = np.take_along_axis(neighbours, np.argsort(is_self, axis=1, kind="stable")[:, :k], axis=1)
    # The vote of KNeighborsClassifier.predict: counts per class, argmax takes the lower class on ties.
    neighbour_rows = np.searchsorted(classifier.classes_, gallery_labels[neighbours])  # (n, k)
    votes = np.zeros((len(query_rows), len(classifier.classes_)), dtype=np.int64)  # (n, C)
    np.add.at(votes, (np.arange(len(query_rows))[:, None], neighbour_rows), 1)
    return float(np.mean(classifier.classes_[votes.argmax(axis=1)] == gallery_labels[query_rows]))


def nmi(emb, labels, seed: int = 0, n_init: int = KMEANS_N_INIT) -> float:
    """Normalised mutual information between k-means clusters (k = number of classes) and labels.

    scikit-learn ``KMeans(n_clusters=C, random_state=seed, n_init=n_init)``, then
    ``normalized_mutual_info_score`` (arithmetic normalisation). 1 means the clusters are the
    classes; about 0 means they are unrelated.

    >>> nmi(np.array([[0.0], [0.1], [5.0], [5.1]]), np.array([0, 0, 1, 1]))
    1.0
    """
    emb, labels = _as_embeddings(emb, labels, min_classes=2)
    n_classes = len(np.unique(labels))
    clusters = KMeans(n_clusters=n_classes, random_state=seed, n_init=n_init).fit_predict(emb)
    return float(normalized_mutual_info_score(labels, clusters))


def feature_metrics(train_emb, train_labels, emb, labels, knn_k: int = 1, seed: int = 0,
                    knn_max_queries: int | None = KNN_MAX_QUERIES) -> dict[str, float | None]:
    """All feature-space numbers for one split, as stored in ``metrics.json``.

    Keys: ``intra_class_variance``, ``inter_class_distance`` (mean distance between class means),
    ``inter_class_distance_min``, ``fisher_ratio``, ``silhouette``, ``knn_top1`` (train embeddings
    are the gallery, this split's are the queries; when this split *is* the train split, i.e. the
    arrays are equal, leave-one-out so a sample cannot find itself; at most ``knn_max_queries``
    queries, see :func:`knn_accuracy`) and ``nmi``. Silhouette, kNN subset and k-means use ``seed``.
    ``silhouette`` is None when every class has a single sample (it is undefined there).

    >>> x = np.array([[0.0, 0.0], [0.0, 1.0], [9.0, 9.0], [9.0, 8.0]]); y = np.array([0, 0, 1, 1])
    >>> sorted(feature_metrics(x, y, x, y))  # doctest: +NORMALIZE_WHITESPACE
    ['fisher_ratio', 'inter_class_distance', 'inter_class_distance_min', 'intra_class_variance',
     'knn_top1', 'nmi', 'silhouette']
    """
    emb, labels = _as_embeddings(emb, labels, min_classes=2)
    train_emb, train_labels = _as_embeddings(train_emb, train_labels, "train_emb")
    is_train_split = emb.shape == train_emb.shape and np.array_equal(emb, train_emb) \
        and np.array_equal(labels, train_labels)
    distances = class_mean_distances(emb, labels)
    return {
        "intra_class_variance": intra_class_variance(emb, labels),
        "inter_class_distance": distances["mean"],
        "inter_class_distance_min": distances["min"],
        "fisher_ratio": fisher_ratio(emb, labels),
        # undefined when every class has one sample (a small val split): None, not a crash after training
        "silhouette": silhouette(emb, labels, seed=seed) if len(np.unique(labels)) < len(labels) else None,
        "knn_top1": knn_accuracy(train_emb, train_labels, None if is_train_split else emb,
                                 None if is_train_split else labels, k=knn_k, max_queries=knn_max_queries,
                                 seed=seed),
        "nmi": nmi(emb, labels, seed=seed),
    }


# -- uncertainty -------------------------------------------------------------------------------------


def bootstrap_ci(correct, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval for an accuracy, from per-sample hits.

    Resampling N hits with replacement and counting the ones is exactly a draw from
    ``Binomial(N, mean(correct))``, so the ``n_boot`` resampled accuracies are drawn that way:
    the same distribution as the textbook loop, in O(n_boot) instead of O(n_boot * N).

    Args:
        correct: per-sample hits, bool or 0/1, shape ``(N,)``.
        n_boot: bootstrap resamples.
        level: coverage of the interval, e.g. 0.95.
        seed: seed of the resampling, so the interval is reproducible.

    Returns:
        ``(low, high)`` quantiles ``(1 - level) / 2`` and ``(1 + level) / 2`` of the resampled accuracies.

    >>> low, high = bootstrap_ci(np.array([True] * 80 + [False] * 20))
    >>> bool(0.70 < low < 0.8 < high < 0.9)
    True
    """
    correct = np.asarray(correct)
    if correct.ndim != 1 or correct.size == 0:
        raise ValueError(f"correct must be a non-empty 1-D array of per-sample hits; got shape {correct.shape}.")
    if not np.all((correct == 0) | (correct == 1)):
        raise ValueError("correct must hold booleans or 0/1 (one hit flag per sample), e.g. pred == labels.")
    _check_level(level)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1; got {n_boot}.")
    n = correct.size
    resampled = np.random.default_rng(seed).binomial(n, float(np.mean(correct)), size=n_boot) / n  # (n_boot,)
    low, high = np.quantile(resampled, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def mean_ci(values, level: float = 0.95) -> tuple[float, float, float]:
    """Mean with a Student-t interval, for "mean and 95% CI over seeds" tables.

    ``mean -+ t_{(1+level)/2, n-1} * s / sqrt(n)`` with the sample standard deviation ``s``.
    With one value the interval is undefined: ``(value, nan, nan)``.

    >>> mean, low, high = mean_ci([0.70, 0.72, 0.74])
    >>> round(mean, 2), round(high - mean, 4)
    (0.72, 0.0497)
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"values must be a non-empty 1-D array (one number per seed); got shape {values.shape}.")
    _check_level(level)
    mean = float(values.mean())
    if values.size == 1:
        return mean, float("nan"), float("nan")
    half_width = stats.t.ppf((1 + level) / 2, df=values.size - 1) * stats.sem(values)
    return mean, float(mean - half_width), float(mean + half_width)


def paired_comparison(a_scores, b_scores, level: float = 0.95) -> dict[str, float]:
    """Is method a better than b across the same seeds? Mean difference, t interval, paired t-test.

    Pairs ``a_scores[i]`` with ``b_scores[i]`` (same seed / split), so seed-to-seed variation
    shared by both methods cancels. Works from n = 2 pairs (1 degree of freedom: wide intervals).
    When every difference is the same, the spread is zero and the test is undefined: the interval
    collapses to that difference and ``t`` and ``p_value`` are NaN.

    Args:
        a_scores: one score per seed for method a, shape ``(n,)``.
        b_scores: the matching scores for method b, shape ``(n,)``.
        level: coverage of the interval.

    Returns:
        ``{"n", "mean_a", "mean_b", "mean_diff" (a - b), "ci_low", "ci_high", "t", "p_value"}``
        (two-sided p-value of ``scipy.stats.ttest_rel``).

    >>> result = paired_comparison([0.80, 0.82, 0.85], [0.78, 0.79, 0.83])
    >>> round(result["mean_diff"], 4), result["n"]
    (0.0233, 3)
    """
    a = np.asarray(a_scores, dtype=np.float64)
    b = np.asarray(b_scores, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"a_scores and b_scores must be 1-D with one score per seed each, paired by position; "
                         f"got shapes {a.shape} and {b.shape}.")
    if a.size < 2:
        raise ValueError(f"a paired comparison needs at least 2 pairs (seeds); got {a.size}.")
    _check_level(level)
    diff = a - b  # (n,)
    mean_diff = float(diff.mean())
    # Equal differences up to rounding (0.9 - 0.8 vs 0.8 - 0.7) count as zero spread.
    if np.ptp(diff) <= 1e-9 * max(np.abs(a).max(), np.abs(b).max(), 1e-300):
        t_stat, p_value, low, high = float("nan"), float("nan"), mean_diff, mean_diff
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # precision-loss warnings on near-equal scores
            result = stats.ttest_rel(a, b)
        interval = result.confidence_interval(confidence_level=level)
        t_stat, p_value, low, high = float(result.statistic), float(result.pvalue), interval.low, interval.high
    return {"n": int(a.size), "mean_a": float(a.mean()), "mean_b": float(b.mean()), "mean_diff": mean_diff,
            "ci_low": float(low), "ci_high": float(high), "t": t_stat, "p_value": p_value}


def classification_metrics(logits, labels, n_boot: int = 2000, level: float = 0.95,
                           seed: int = 0) -> dict[str, object]:
    """Top-1, top-5 (clamped to C, see :func:`topk_accuracy`), a bootstrap CI of top-1, and N.

    >>> out = classification_metrics(np.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]]), np.array([0, 1, 1]))
    >>> out["top1"], out["top5"], out["n"]
    (0.6666666666666666, 1.0, 3)
    """
    logits, labels = _as_logits(logits, labels)
    correct = np.argsort(-logits, axis=1, kind="stable")[:, 0] == labels  # (N,) same tie rule as top-1
    low, high = bootstrap_ci(correct, n_boot=n_boot, level=level, seed=seed)
    return {**accuracy(logits, labels, k=(1, 5)), "top1_ci": [low, high], "n": int(len(labels))}


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1 (e.g. 0.95 for a 95% interval); got {level}.")
