"""Figures from saved arrays: UMAP of embeddings, the papers' 2-D feature plot, curves, confusion, accuracy.

Every plotting function takes numpy arrays and returns a :class:`matplotlib.figure.Figure`
(or draws into the ``ax`` it is given and returns that axes' figure). Figures are built as
``Figure`` objects, not through ``pyplot``, so nothing registers with pyplot's global figure
list: no figure leaks, no backend is switched (a notebook keeps its inline backend; scripts and
tests render with Agg when saving), and nothing is ever shown. In a notebook, end a cell with
the figure or ``display(fig)``; in scripts use :func:`save_figure`. This module is a leaf: it
never imports torch, and umap-learn is imported only when :func:`umap_embed` runs.

>>> import numpy as np
>>> coords = np.random.default_rng(0).normal(size=(100, 2)); labels = np.arange(100) % 4
>>> fig = umap_scatter(coords, labels, class_names=["pho", "ramen", "udon", "soba"], title="demo")
>>> save_figure(fig, "runs/demo/umap.png")  # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from foodlib.metrics import most_confused_pairs

__all__ = [
    "umap_embed", "umap_scatter", "umap_grid", "features_2d", "training_curves", "confusion_heatmap",
    "per_class_accuracy_bars", "accuracy_with_ci", "save_figure", "class_palette", "class_markers",
]

# UMAP defaults, chosen on benchmarks/bench_umap.py (30,000 x 512, 59 classes, 2 CPU cores): see
# benchmarks/RESULTS.md, section "UMAP + scatter", for the measurements behind each.
UMAP_PCA_DIMS = 50  # PCA first: kNN cost grows with D; 50 dims kept the neighbourhoods (trustworthiness 0.97)
UMAP_EXACT_KNN_MAX_POINTS = 50_000  # up to here an exact BLAS kNN (~2 s at 30k) beats pynndescent's compile
UMAP_LARGE_N_EPOCHS = 100  # above 10,000 points; umap-learn uses 200: same picture, half the time

LEGEND_MAX_CLASSES = 20  # above this a legend is a wall of text: names are written at the class means instead
SAVE_DPI = 150  # sharp on screens and in PDFs, PNGs stay well under 1 MB
_MARKER_SHAPES = ("o", "s", "^", "D", "v", "P")  # one shape per lightness band of the palette
_SPLIT_COLOURS = {"train": "tab:blue", "val": "tab:orange", "test": "tab:green"}
KNOWN_LOSS_TERMS = ("ce", "center", "island", "lkd", "contrastive_center", "pml")  # term columns foodlib's losses write to trace.csv


# -- UMAP --------------------------------------------------------------------------------------------


def umap_embed(emb, random_state: int | None = 0, pca_dims: int | None = UMAP_PCA_DIMS, cache_path=None,
               n_neighbors: int = 15, min_dist: float = 0.1, n_epochs: int | None = None,
               init: str = "spectral") -> np.ndarray:
    """2-D UMAP coordinates of embeddings, optionally cached on disk.

    Steps: PCA to ``pca_dims`` (scikit-learn) when D is larger; the k nearest neighbours, exact
    (scikit-learn, brute force on BLAS) up to ``UMAP_EXACT_KNN_MAX_POINTS`` points, else
    umap-learn's approximate search; then umap-learn's layout.

    With an integer ``random_state`` the result is reproducible and umap-learn runs its layout on
    one thread; ``random_state=None`` lets it use every core but the layout then changes from run
    to run. On the 2-core benchmark the parallel layout was even slower (27 s against 21 s: longer
    compilation, busy cores), so reproducible is the default.

    Args:
        emb: embeddings, shape ``(N, D)``.
        random_state: seed of PCA and UMAP; ``None`` for a parallel, non-reproducible layout.
        pca_dims: PCA target dimension; ``None`` skips PCA.
        cache_path: an ``.npz`` file. When it holds coordinates computed from the same array (a hash
            of its shape, dtype and full content) and the same parameters, they are returned
            without recomputing; otherwise they are computed and the file is (re)written.
        n_neighbors: size of the local neighbourhood (clamped to N - 1).
        min_dist: how tightly UMAP packs points together.
        n_epochs: layout optimisation epochs; ``None``: ``UMAP_LARGE_N_EPOCHS`` (100) above 10,000
            points, umap-learn's default (500) below. umap-learn would use 200 above 10,000; half
            that gave the same layout on the benchmark at half the cost, which keeps a 30,000-point
            figure within 30 s on 2 cores.
        init: ``"spectral"`` (umap-learn's default) or ``"pca"``.

    Returns:
        Coordinates, shape ``(N, 2)``, float32.

    >>> emb = np.random.default_rng(0).normal(size=(200, 64)).astype(np.float32)
    >>> umap_embed(emb, cache_path="runs/demo/umap_test.npz").shape  # doctest: +SKIP
    (200, 2)
    """
    emb = np.asarray(emb)
    if emb.ndim != 2:
        raise ValueError(f"emb must have shape (N, D); got shape {emb.shape}.")
    if len(emb) < 4:
        raise ValueError(f"UMAP needs at least 4 points; got {len(emb)}. Plot so few points directly.")
    if not np.all(np.isfinite(emb)):
        raise ValueError("emb contains NaN or inf values; check the model output (diverged training?).")
    if n_epochs is None and len(emb) > 10_000:
        n_epochs = UMAP_LARGE_N_EPOCHS
    params = {"random_state": random_state, "pca_dims": pca_dims, "n_neighbors": min(n_neighbors, len(emb) - 1),
              "min_dist": min_dist, "n_epochs": n_epochs, "init": init}
    if cache_path is None:
        return _fit_umap(emb, **params)
    cache_path = Path(cache_path)
    if cache_path.suffix != ".npz":
        raise ValueError(f"cache_path must end in .npz (it stores the coordinates and their key); got {cache_path}.")
    key = _umap_cache_key(emb, params)
    cached = _read_umap_cache(cache_path, key, len(emb))
    if cached is not None:
        return cached
    coords = _fit_umap(emb, **params)
    _write_umap_cache(cache_path, key, coords)
    return coords


def _fit_umap(emb: np.ndarray, random_state, pca_dims, n_neighbors, min_dist, n_epochs, init) -> np.ndarray:
    import warnings

    import umap  # imported here: it pulls in numba (~2 s), which only this function needs
    from sklearn.decomposition import PCA
    from sklearn.neighbors import NearestNeighbors

    x = emb.astype(np.float32)  # (N, D); float16 features are upcast, UMAP wants float32
    if pca_dims is not None and x.shape[1] > pca_dims:
        x = PCA(n_components=min(pca_dims, len(x)), random_state=random_state or 0).fit_transform(x)
    precomputed_knn = (None, None, None)
    if len(x) <= UMAP_EXACT_KNN_MAX_POINTS:
        # Exact neighbours by BLAS in seconds, where pynndescent spends ~25 s compiling on 2 cores.
        # kneighbors(None) skips each point itself; umap-learn expects the point first at distance 0,
        # exactly 0, not a rounding residue that would shift its local-connectivity offset.
        distances, indices = NearestNeighbors(n_neighbors=n_neighbors - 1, algorithm="brute").fit(x).kneighbors()
        indices = np.hstack([np.arange(len(x))[:, None], indices])  # (N, k)
        distances = np.hstack([np.zeros((len(x), 1)), distances]).astype(np.float32)  # (N, k)
        precomputed_knn = (indices, distances)
    reducer = umap.UMAP(n_neighbors=n_neighbors, min_dist=min_dist, n_epochs=n_epochs, init=init,
                        random_state=random_state, n_jobs=1 if random_state is not None else -1,
                        precomputed_knn=precomputed_knn)
    with warnings.catch_warnings():
        # Expected notices: "n_jobs overridden by random_state", "no knn search index, transform disabled".
        warnings.simplefilter("ignore", UserWarning)
        coords = reducer.fit_transform(x)
    return np.asarray(coords, dtype=np.float32)  # (N, 2)


def _umap_cache_key(emb: np.ndarray, params: dict) -> str:
    # The whole array is hashed, not a sample: a sample could miss a partly re-extracted split, and
    # blake2b reads 60 MB (30k x 512 float32) in ~0.1 s.
    from importlib.metadata import version  # not `import umap`: a cache hit should not pay for numba

    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps({"shape": emb.shape, "dtype": str(emb.dtype), "params": params,
                              "umap": version("umap-learn")}, sort_keys=True).encode())
    digest.update(np.ascontiguousarray(emb).view(np.uint8).reshape(-1))
    return digest.hexdigest()


def _read_umap_cache(path: Path, key: str, n_points: int) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as cache:
            if str(cache["key"]) != key or cache["coords"].shape != (n_points, 2):
                return None
            return cache["coords"].astype(np.float32)
    except (OSError, ValueError, KeyError):  # truncated or foreign file: recompute and overwrite it
        return None


def _write_umap_cache(path: Path, key: str, coords: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written to a temporary file and renamed, so a reader never sees half a cache.
    handle, tmp_name = tempfile.mkstemp(prefix=path.stem, suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as f:
            np.savez(f, key=np.array(key), coords=coords)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


# -- class colours -----------------------------------------------------------------------------------


def class_palette(n_classes: int) -> list[tuple[float, float, float]]:
    """``n_classes`` distinguishable RGB colours, stable for a given count.

    Up to 10 classes: tab10; up to 20: tab20. Beyond that, 3 lightness bands of evenly spaced husl
    hues (60 classes: 20 hues x 3 bands), used with :func:`class_markers` so each class also has its
    own marker shape.

    >>> len(class_palette(59)), len(set(class_palette(59)))
    (59, 59)
    """
    import seaborn as sns

    if n_classes <= 10:
        return [tuple(c) for c in sns.color_palette("tab10", n_classes)]
    if n_classes <= 20:
        return [tuple(c) for c in sns.color_palette("tab20", n_classes)]
    bands = (0.45, 0.65, 0.82)  # husl lightness: dark, middle, pale (min CIELAB distance ~8.5 at 60)
    n_hues = math.ceil(n_classes / len(bands))
    colours = []
    for band, lightness in enumerate(bands):
        hues = sns.husl_palette(n_hues, l=lightness, s=1.0, h=0.01 + band / (3 * n_hues))  # bands offset in hue
        colours += [tuple(c) for c in hues]
    return colours[:n_classes]


def class_markers(n_classes: int) -> list[str]:
    """A marker shape per class, changing with the palette's lightness band (all ``"o"`` up to 20 classes).

    >>> class_markers(3), class_markers(60)[19:22]
    (['o', 'o', 'o'], ['o', 's', 's'])
    """
    if n_classes <= 20:
        return ["o"] * n_classes
    n_hues = math.ceil(n_classes / 3)
    return [_MARKER_SHAPES[i // n_hues] for i in range(n_classes)]


# -- scatter plots -----------------------------------------------------------------------------------


def umap_scatter(coords_or_emb, labels, class_names: Sequence[str] | None = None, ax=None,
                 title: str | None = "UMAP of embeddings", legend: bool | str = "auto",
                 annotate: bool | str = "auto", point_size: float | None = None,
                 umap_kwargs: Mapping[str, Any] | None = None) -> Figure:
    """Points coloured by class, with each class mean marked; legible up to ~60 classes.

    Args:
        coords_or_emb: 2-D coordinates ``(N, 2)``, or embeddings ``(N, D)`` which are first reduced
            with :func:`umap_embed` (``umap_kwargs`` passed on, e.g. a ``cache_path``).
        labels: class index per point ``(N,)``.
        class_names: names of all C classes (colours follow the class index, so they match across
            figures); ``None`` names classes by index.
        ax: axes to draw into; ``None`` makes a new figure.
        title: axes title.
        legend: ``"auto"`` shows a legend beside the plot up to 20 classes; ``True`` forces a compact
            multi-column one; ``False`` only a small one saying what dots and mean markers are;
            ``None`` none (the caller explains the marks, as :func:`umap_grid` does).
        annotate: ``"auto"`` writes class names at the class means above 20 classes; ``True``/``False``.
        point_size: marker area; ``None`` shrinks it as N grows.

    Returns:
        The figure. The axes hold one scatter collection for the points (drawn in shuffled order so no
        class hides under another) and one for the class means.

    >>> coords = np.random.default_rng(0).normal(size=(60, 2)); labels = np.arange(60) % 3
    >>> len(umap_scatter(coords, labels).axes[0].collections)
    2
    """
    coords = np.asarray(coords_or_emb)
    if coords.ndim == 2 and coords.shape[1] != 2:
        coords = umap_embed(coords, **dict(umap_kwargs or {}))
    coords, labels, n_classes, names = _check_points(coords, labels, class_names)
    fig, ax = _figure_and_axes(ax, figsize=(8.5, 7) if n_classes > LEGEND_MAX_CLASSES else (7.5, 6))
    colours, markers = class_palette(n_classes), class_markers(n_classes)

    order = np.random.default_rng(0).permutation(len(labels))  # shuffled: the last class drawn is not on top
    size = point_size if point_size is not None else float(np.clip(2e4 / len(labels), 1.0, 20.0))
    ax.scatter(coords[order, 0], coords[order, 1], s=size, c=np.array(colours)[labels[order]],
               alpha=0.7 if len(labels) > 2000 else 0.9, linewidths=0, rasterized=len(labels) > 2000)

    present = np.unique(labels)
    means = np.stack([coords[labels == c].mean(axis=0) for c in present])  # (C_present, 2)
    for marker in sorted(set(markers[c] for c in present)):
        with_marker = np.array([markers[c] == marker for c in present])
        ax.scatter(means[with_marker, 0], means[with_marker, 1], s=70, marker=marker,
                   c=np.array(colours)[present[with_marker]], edgecolors="black", linewidths=1.0, zorder=3)

    if annotate == "auto":
        annotate = n_classes > LEGEND_MAX_CLASSES
    if annotate:
        for c, (x, y) in zip(present, means):
            ax.annotate(names[c], (x, y), xytext=(3, 3), textcoords="offset points", fontsize=6, zorder=4,
                        bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.6))
    if legend == "auto":
        legend = n_classes <= LEGEND_MAX_CLASSES
    if legend:  # class names, then what a dot and a mean marker are
        _class_legend(ax, [names[c] for c in present], [colours[c] for c in present],
                      [markers[c] for c in present], extra=_mark_handles())
    elif legend is not None:  # None: the caller draws one legend for several axes (umap_grid)
        ax.legend(handles=_mark_handles(), loc="best", fontsize=7, framealpha=0.8)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")
    if title:
        ax.set_title(title)
    return fig


def umap_grid(panels: Sequence[tuple[str, Any, Any]], class_names: Sequence[str] | None = None,
              panel_size: float = 4.5, max_columns: int = 4, **scatter_kwargs) -> Figure:
    """:func:`umap_scatter` panels, e.g. one per loss on the same test set, ``max_columns`` to a row.

    Colours follow the class index, so a class has the same colour in every panel. Up to 20 classes
    one shared legend sits under the row; beyond that each panel names classes at their means.

    Args:
        panels: ``[(title, coords (N, 2) or embeddings (N, D), labels (N,)), ...]``.
        class_names: names of all C classes.
        panel_size: width and height of each panel, inches.
        max_columns: panels per row; more panels wrap onto further rows (a figure stays readable
            at page width).
        **scatter_kwargs: passed to :func:`umap_scatter` (``annotate``, ``point_size``, ``umap_kwargs``).

    >>> rng = np.random.default_rng(0); y = np.arange(90) % 3
    >>> len(umap_grid([("softmax", rng.normal(size=(90, 2)), y), ("center", rng.normal(size=(90, 2)), y)]).axes)
    2
    """
    if not panels:
        raise ValueError("panels is empty; pass [(title, coords, labels), ...] with at least one entry.")
    n_classes = _n_classes(np.concatenate([np.asarray(p[2]) for p in panels]), class_names)
    names = _class_names(class_names, n_classes)  # one class count for all panels: one palette
    fig, axes = panel_grid(len(panels), panel_size, panel_size, max_columns, extra_height=0.6)
    for ax, (title, coords, labels) in zip(axes, panels):
        umap_scatter(coords, labels, class_names=names, ax=ax, title=title, legend=None, **scatter_kwargs)
    handles = _mark_handles()
    if n_classes <= LEGEND_MAX_CLASSES:
        handles = _legend_handles(names, class_palette(n_classes), class_markers(n_classes)) + handles
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    return fig


def features_2d(emb, labels, centers=None, class_names: Sequence[str] | None = None, ax=None,
                title: str | None = None, point_size: float | None = None) -> Figure:
    """The papers' raw 2-D feature plot (Wen et al. 2016, Fig. 2/3 style): dense points, centers as black x.

    Args:
        emb: 2-D embeddings ``(N, 2)`` (a model trained with ``embedding_dim=2``).
        labels: class index per point ``(N,)``.
        centers: learned class centers / Gaussian means ``(C, 2)`` to mark; ``None`` marks none.
        class_names: names of all C classes for the legend (shown up to 20 classes).
        ax: axes to draw into; ``None`` makes a new figure.
        title: axes title.
        point_size: marker area; ``None`` shrinks it as N grows.

    >>> rng = np.random.default_rng(0); y = np.arange(100) % 10
    >>> fig = features_2d(rng.normal(size=(100, 2)), y, centers=rng.normal(size=(10, 2)))
    >>> len(fig.axes[0].collections)
    2
    """
    emb = np.asarray(emb)
    if emb.ndim != 2 or emb.shape[1] != 2:
        raise ValueError(f"features_2d needs 2-D embeddings (N, 2); got shape {emb.shape}. "
                         "Train with embedding_dim=2, or use umap_scatter for D > 2.")
    emb, labels, n_classes, names = _check_points(emb, labels, class_names)
    if centers is not None:
        centers = np.asarray(centers)
        if centers.ndim != 2 or centers.shape[1] != 2:
            raise ValueError(f"centers must have shape (C, 2); got {centers.shape}.")
        n_classes = max(n_classes, len(centers))
        names = _class_names(class_names, n_classes)
    fig, ax = _figure_and_axes(ax, figsize=(6.5, 6))
    colours = class_palette(n_classes)
    order = np.random.default_rng(0).permutation(len(labels))
    size = point_size if point_size is not None else float(np.clip(1e4 / len(labels), 0.5, 12.0))
    ax.scatter(emb[order, 0], emb[order, 1], s=size, c=np.array(colours)[labels[order]], linewidths=0,
               rasterized=len(labels) > 2000)
    if centers is not None:
        ax.scatter(centers[:, 0], centers[:, 1], s=80, marker="x", c="black", linewidths=2.0, zorder=3)
    ax.axhline(0, color="0.6", linewidth=0.6, zorder=0)
    ax.axvline(0, color="0.6", linewidth=0.6, zorder=0)
    ax.set_aspect("equal", adjustable="datalim")  # angles matter for softmax / L-GM features: keep them true
    if n_classes <= LEGEND_MAX_CLASSES:
        present = np.unique(labels)
        centre_mark = [Line2D([], [], linestyle="", marker="x", markersize=7, color="black", markeredgewidth=2.0,
                              label="black x: learned class center")] if centers is not None else []
        _class_legend(ax, [names[c] for c in present], [colours[c] for c in present], ["o"] * len(present),
                      extra=centre_mark)
    if title:
        ax.set_title(title)
    return fig


# -- curves, confusion, accuracy ---------------------------------------------------------------------


def training_curves(trace, terms: Sequence[str] | None = None, title: str | None = None,
                    n_classes: int | None = None) -> Figure:
    """Loss and top-1 accuracy per epoch for each split, plus a panel of loss terms when logged.

    Args:
        trace: rows of ``trace.csv``: a list of dicts, a dict of columns, or a pandas DataFrame.
            Needs columns ``epoch``, ``split`` (train / val), ``loss`` and ``top1``; optional term
            columns (``ce``, ``center``, ``island``, ``lkd``, ``contrastive_center``, ``pml``) get their own panel.
        terms: which term columns to plot; ``None`` takes those of ``KNOWN_LOSS_TERMS`` present.
        title: figure title.
        n_classes: the number of classes; top-5 is drawn only above 5 classes (with 5 or fewer it
            is 1 by definition). ``None``: drawn unless every top-5 value is 1.

    Returns:
        A figure with 2 axes (loss, accuracy), or 3 when there are terms to plot.

    >>> rows = [{"epoch": e, "split": s, "loss": 1 / e, "top1": 0.5 + e / 10, "ce": 1 / e}
    ...         for e in (1, 2, 3) for s in ("train", "val")]
    >>> len(training_curves(rows).axes)
    3
    """
    columns = _trace_columns(trace)
    missing = [c for c in ("epoch", "split", "loss", "top1") if c not in columns]
    if missing:
        raise ValueError(f"trace lacks the columns {missing}; it has {sorted(columns)}. Pass the rows of a run's "
                         "trace.csv (epoch, split, loss, top1, ...).")
    if terms is None:
        terms = [t for t in KNOWN_LOSS_TERMS if t in columns and np.any(np.isfinite(_floats(columns[t])))]
    else:
        unknown = [t for t in terms if t not in columns]
        if unknown:
            raise ValueError(f"terms {unknown} are not columns of the trace; it has {sorted(columns)}.")
    epochs, splits = _floats(columns["epoch"]), np.asarray(columns["split"]).astype(str)
    n_panels = 3 if terms else 2
    top5 = _floats(columns["top5"]) if "top5" in columns else np.array([])
    show_top5 = top5.size > 0 and (n_classes > 5 if n_classes is not None else not np.all(top5[np.isfinite(top5)] == 1))
    fig = Figure(figsize=(4.2 * n_panels, 3.6), layout="constrained")
    axes = fig.subplots(1, n_panels)
    for split in dict.fromkeys(splits):  # first-seen order
        rows = splits == split
        colour = _SPLIT_COLOURS.get(split)
        axes[0].plot(epochs[rows], _floats(columns["loss"])[rows], marker=".", label=split, color=colour)
        axes[1].plot(epochs[rows], _floats(columns["top1"])[rows], marker=".", label=f"{split} top-1", color=colour)
        if show_top5:
            axes[1].plot(epochs[rows], _floats(columns["top5"])[rows], linestyle=":", color=colour,
                         label=f"{split} top-5")
        for i, term in enumerate(terms):
            values = _floats(columns[term])[rows]
            if np.any(np.isfinite(values)):
                axes[2].plot(epochs[rows], values, color=f"C{i}", linestyle="-" if split == "train" else "--",
                             label=f"{term} ({split})")
    axes[0].set(xlabel="epoch", ylabel="loss", title="loss")
    axes[1].set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    if terms:
        term_values = np.concatenate([_floats(columns[t]) for t in terms])
        finite = term_values[np.isfinite(term_values)]
        if finite.size and np.all(finite > 0):
            axes[2].set_yscale("log")  # terms differ by orders of magnitude (center vs ce)
        axes[2].set(xlabel="epoch", ylabel="term value", title="loss terms")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    if title:
        fig.suptitle(title)
    return fig


def confusion_heatmap(confusion, class_names: Sequence[str] | None = None, highlight: int = 5,
                      normalize: bool = True, ax=None, title: str | None = "confusion matrix",
                      vmax: float | None = None, colorbar: bool = True, explain_boxes: bool = True) -> Figure:
    """Heatmap of a confusion matrix with the ``highlight`` most confused class pairs boxed in red.

    Args:
        confusion: counts ``(C, C)``, row = true class, column = predicted.
        class_names: tick labels.
        highlight: how many unordered pairs to box (both cells of each pair, from
            :func:`foodlib.metrics.most_confused_pairs`); 0 for none.
        normalize: colour by row rates (each true class sums to 1) rather than counts.
        ax: axes to draw into; ``None`` makes a new figure.
        title: axes title.
        vmax: top of the colour scale (default: 1 when normalised, else the largest count); pass the
            same value to panels that are to be compared.
        colorbar: draw this heatmap's colour bar (False when a figure shares one).
        explain_boxes: add a line under the title saying what the red boxes are.

    >>> fig = confusion_heatmap(np.array([[8, 2], [1, 9]]), ["pho", "ramen"], highlight=1)
    >>> len(fig.axes[0].patches)  # one box per cell of the pair
    2
    """
    import seaborn as sns

    confusion = np.asarray(confusion)
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion must be a square (C, C) matrix; got shape {confusion.shape}.")
    n_classes = len(confusion)
    names = _class_names(class_names, n_classes)
    side = float(np.clip(0.22 * n_classes + 3.0, 5.0, 18.0))
    fig, ax = _figure_and_axes(ax, figsize=(side + 1.0, side))
    values = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1) if normalize else confusion
    if vmax is None:
        vmax = 1.0 if normalize else float(max(confusion.max(), 1))
    sns.heatmap(values, ax=ax, cmap="viridis", square=True, xticklabels=names, yticklabels=names,
                annot=n_classes <= 12, fmt=".2f" if normalize else "d", annot_kws={"fontsize": 7},
                vmin=0.0, vmax=vmax, cbar=colorbar,
                cbar_kws={"label": "fraction of true class" if normalize else "count", "shrink": 0.7})
    tick_size = float(np.clip(220 / n_classes, 4, 9))
    ax.tick_params(labelsize=tick_size)
    boxed = most_confused_pairs(confusion, None, k=highlight) if highlight > 0 else []
    for a, b, _ in boxed:
        for row, col in ((a, b), (b, a)):
            ax.add_patch(Rectangle((col, row), 1, 1, fill=False, edgecolor="red", linewidth=2.0, clip_on=False))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    note = box_note(len(boxed)) if explain_boxes and boxed else None
    if title or note:
        ax.set_title("\n".join(t for t in (title, note) if t), fontsize=None if not note else 9)
    return fig


def box_note(n_pairs: int) -> str:
    """What the red boxes of :func:`confusion_heatmap` mean, for a title or caption."""
    pairs = "the most confused pair" if n_pairs == 1 else f"the {n_pairs} most confused pairs"
    return f"red boxes: {pairs} of classes (both cells of a pair)"



def per_class_accuracy_bars(acc, class_names: Sequence[str] | None = None, sort: bool = True, ax=None,
                            title: str | None = "per-class accuracy") -> Figure:
    """Horizontal bars of per-class accuracy (worst at the top when sorted), with the mean as a line.

    Classes with no samples (NaN accuracy) are left out.

    >>> fig = per_class_accuracy_bars(np.array([0.9, 0.5, np.nan]), ["pho", "ramen", "udon"])
    >>> len(fig.axes[0].patches)
    2
    """
    acc = np.asarray(acc, dtype=np.float64)
    if acc.ndim != 1:
        raise ValueError(f"acc must be a 1-D array of per-class accuracies (C,); got shape {acc.shape}.")
    names = _class_names(class_names, len(acc))
    shown = np.flatnonzero(np.isfinite(acc))
    if sort:
        shown = shown[np.argsort(acc[shown], kind="stable")[::-1]]  # best at the bottom: barh draws upwards
    fig, ax = _figure_and_axes(ax, figsize=(6.0, float(np.clip(0.2 * len(shown) + 1.5, 3.0, 16.0))))
    ax.barh(np.arange(len(shown)), acc[shown], color="tab:blue")  # one colour: it carries no meaning
    tick_size = float(np.clip(300 / max(len(shown), 1), 5, 9))
    ax.set_yticks(np.arange(len(shown)), [names[i] for i in shown], fontsize=tick_size)
    if shown.size:
        mean = float(acc[shown].mean())
        ax.axvline(mean, color="black", linestyle="--", linewidth=1, label=f"mean {mean:.3f}")
        ax.legend(loc="upper right", fontsize=8)  # the worst classes, at the top, have the shortest bars
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy")
    if title:
        ax.set_title(title)
    return fig


def accuracy_with_ci(names: Sequence[str], means, lows, highs, ax=None, title: str | None = None,
                     ylabel: str = "top-1 accuracy") -> Figure:
    """Points with interval bars comparing methods (e.g. losses: mean and 95% CI over seeds).

    Points rather than bars: accuracies sit far from 0 and bars would hide the differences.
    A NaN bound (one seed, no interval) draws the point without a bar.

    >>> fig = accuracy_with_ci(["softmax", "center"], [0.70, 0.74], [0.68, 0.71], [0.72, 0.77])
    >>> len(fig.axes[0].containers)
    1
    """
    means, lows, highs = (np.asarray(v, dtype=np.float64) for v in (means, lows, highs))
    if not (len(names) == len(means) == len(lows) == len(highs)):
        raise ValueError(f"names, means, lows and highs must have one entry per method; got lengths "
                         f"{len(names)}, {len(means)}, {len(lows)}, {len(highs)}.")
    below, above = np.nan_to_num(means - lows), np.nan_to_num(highs - means)
    if np.any(below < 0) or np.any(above < 0):
        raise ValueError("each interval must contain its mean (low <= mean <= high); check the order of "
                         "lows and highs.")
    fig, ax = _figure_and_axes(ax, figsize=(max(4.0, 1.1 * len(names) + 2.0), 4.0))
    x = np.arange(len(names))
    ax.errorbar(x, means, yerr=np.vstack([below, above]), fmt="o", capsize=5, color="black", ecolor="0.3")
    for xi, mean in zip(x, means):
        ax.annotate(f"{mean:.3f}", (xi, mean), xytext=(6, 0), textcoords="offset points", fontsize=8,
                    va="center")
    ax.set_xticks(x, list(names), rotation=30 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center")
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title)
    return fig


def save_figure(fig: Figure, path, dpi: int = SAVE_DPI) -> Path:
    """Save ``fig`` to ``path`` (PNG unless the suffix says otherwise), creating parent folders.

    >>> save_figure(umap_scatter(np.zeros((4, 2)), np.array([0, 0, 1, 1])), "runs/demo/x.png")  # doctest: +SKIP
    PosixPath('runs/demo/x.png')
    """
    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


# -- helpers -----------------------------------------------------------------------------------------


def panel_grid(n_panels: int, width: float, height: float, max_columns: int = 4,
               extra_height: float = 0.0) -> tuple[Figure, list]:
    """A Figure with ``n_panels`` axes of ``width`` x ``height`` inches, ``max_columns`` to a row.

    More panels wrap onto further rows, so a figure stays readable at page width; the empty
    cells of the last row are removed. ``extra_height`` leaves room for a legend or title.

    >>> fig, axes = panel_grid(7, 4.0, 4.0)
    >>> len(axes), fig.get_size_inches().tolist()
    (7, [16.0, 8.0])
    """
    n_cols = min(n_panels, max(1, max_columns))
    n_rows = -(-n_panels // n_cols)
    fig = Figure(figsize=(width * n_cols, height * n_rows + extra_height), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        fig.delaxes(ax)
    return fig, list(axes[:n_panels])


def _figure_and_axes(ax, figsize):
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _n_classes(labels: np.ndarray, class_names) -> int:
    return len(class_names) if class_names is not None else int(labels.max()) + 1


def _class_names(class_names, n_classes: int) -> list[str]:
    return [str(c) for c in (class_names if class_names is not None else range(n_classes))]


def _check_points(coords, labels, class_names):
    coords, labels = np.asarray(coords, dtype=np.float64), np.asarray(labels)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"coordinates must have shape (N, 2); got {coords.shape}.")
    if labels.shape != (len(coords),):
        raise ValueError(f"labels must have shape ({len(coords)},) to match the points; got {labels.shape}.")
    if len(labels) == 0:
        raise ValueError("there are no points to plot.")
    labels = labels.astype(np.int64)
    n_classes = _n_classes(labels, class_names)
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(f"labels must lie in [0, {n_classes - 1}] for {n_classes} class names; got "
                         f"min {labels.min()}, max {labels.max()}.")
    return coords, labels, n_classes, _class_names(class_names, n_classes)


def _legend_handles(names, colours, markers) -> list[Line2D]:
    return [Line2D([], [], linestyle="", marker=m, markersize=6, markerfacecolor=c, markeredgecolor="black",
                   markeredgewidth=0.5, label=n) for n, c, m in zip(names, colours, markers)]


def _mark_handles() -> list[Line2D]:
    """Legend entries saying what a small dot and a large black-edged marker are."""
    return [Line2D([], [], linestyle="", marker="o", markersize=3, markerfacecolor="0.5", markeredgewidth=0,
                   label="small dot: one image"),
            Line2D([], [], linestyle="", marker="o", markersize=8, markerfacecolor="0.5", markeredgecolor="black",
                   markeredgewidth=1.0, label="large, black edge: class mean")]


def _class_legend(ax, names, colours, markers, extra: Sequence[Line2D] = ()) -> None:
    # Outside the axes, so it never covers points; columns keep 60 names to about 30 lines.
    ax.legend(handles=_legend_handles(names, colours, markers) + list(extra), loc="upper left",
              bbox_to_anchor=(1.01, 1.0),
              fontsize=7 if len(names) > 10 else 8, ncol=math.ceil(len(names) / 30), frameon=False,
              handletextpad=0.2, columnspacing=0.8)


def _trace_columns(trace) -> dict[str, np.ndarray]:
    if hasattr(trace, "columns") and hasattr(trace, "to_numpy"):  # a pandas DataFrame, without importing pandas
        return {str(c): trace[c].to_numpy() for c in trace.columns}
    if isinstance(trace, Mapping):
        return {str(k): np.asarray(v) for k, v in trace.items()}
    rows = list(trace)
    if not rows or not all(isinstance(r, Mapping) for r in rows):
        raise ValueError("trace must be a non-empty list of dict rows, a dict of columns, or a DataFrame.")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return {str(k): np.array([r.get(k, np.nan) for r in rows], dtype=object) for k in keys}


def _floats(values) -> np.ndarray:
    """Numbers from a trace column; blanks (a CSV cell of a term the split did not log) become NaN."""
    out = np.full(len(values), np.nan)
    for i, v in enumerate(values):
        try:
            out[i] = float(v)
        except (TypeError, ValueError):
            pass
    return out
