"""foodlib.plots on small arrays: each figure's axes and artists are counted, and each saves as a PNG."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from foodlib import plots as P

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def no_pyplot_figures_left():
    """Every test must leave pyplot's figure list as it found it (plots builds Figure objects directly)."""
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    yield
    assert plt.get_fignums() == before


def clustered_points(n_classes=3, per_class=20, dims=2, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 10.0, (n_classes, dims))
    labels = np.repeat(np.arange(n_classes), per_class)
    return centres[labels] + rng.normal(0.0, 0.5, (len(labels), dims)), labels


def assert_png(path):
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_MAGIC


def legend_texts(ax):
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend else []


def test_importing_plots_does_not_import_torch_or_umap():
    code = "import sys, foodlib.plots; print('torch' in sys.modules, 'umap' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


def test_palette_and_markers_give_each_of_60_classes_its_own_look():
    colours, markers = P.class_palette(60), P.class_markers(60)
    assert len(colours) == 60 and len(set(colours)) == 60
    assert len(set(zip(colours, markers))) == 60
    assert len(set(markers)) == 3  # one shape per lightness band
    assert P.class_palette(7) == P.class_palette(7)  # stable: same class, same colour in every figure


MARKS = ["small dot: one image", "large, black edge: class mean"]


def test_umap_scatter_of_2d_points_few_classes(tmp_path):
    coords, labels = clustered_points(n_classes=3)
    fig = P.umap_scatter(coords, labels, class_names=["pho", "ramen", "udon"], title="t")
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    ax = fig.axes[0]
    scatters = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert len(scatters) == 2  # all points in one collection, the class means in another
    assert len(scatters[0].get_offsets()) == 60
    np.testing.assert_allclose(np.sort(scatters[1].get_offsets()[:, 0]),
                               np.sort([coords[labels == c, 0].mean() for c in range(3)]))
    assert legend_texts(ax) == ["pho", "ramen", "udon", *MARKS]  # names, then what the marks are
    assert len(ax.texts) == 0  # few classes: a legend, no name annotations
    assert_png(P.save_figure(fig, tmp_path / "deep" / "umap.png"))


def test_umap_scatter_many_classes_annotates_means_instead_of_a_legend():
    coords, labels = clustered_points(n_classes=60, per_class=3)
    fig = P.umap_scatter(coords, labels, class_names=[f"dish{i}" for i in range(60)])
    ax = fig.axes[0]
    assert legend_texts(ax) == MARKS  # no class legend: the names are at the means
    assert sorted(t.get_text() for t in ax.texts) == sorted(f"dish{i}" for i in range(60))
    # class means: one collection per marker shape (3 bands of 20 classes)
    assert len([c for c in ax.collections if isinstance(c, PathCollection)]) == 1 + 3
    forced = P.umap_scatter(coords, labels, legend=True, annotate=False)
    assert len(legend_texts(forced.axes[0])) == 60 + len(MARKS) and len(forced.axes[0].texts) == 0


def test_umap_scatter_draws_into_a_given_axes_and_checks_labels():
    fig = Figure()
    ax = fig.add_subplot()
    coords, labels = clustered_points()
    assert P.umap_scatter(coords, labels, ax=ax) is fig
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\]"):
        P.umap_scatter(coords, labels, class_names=["a", "b"])
    with pytest.raises(ValueError, match="labels must have shape"):
        P.umap_scatter(coords, labels[:-1])


def test_umap_scatter_reduces_embeddings_with_umap_embed(monkeypatch):
    emb, labels = clustered_points(dims=8)
    seen = {}

    def fake_fit(x, **params):
        seen["shape"], seen["params"] = x.shape, params
        return x[:, :2].astype(np.float32)

    monkeypatch.setattr(P, "_fit_umap", fake_fit)
    fig = P.umap_scatter(emb, labels, umap_kwargs={"n_neighbors": 5})
    assert seen["shape"] == (60, 8) and seen["params"]["n_neighbors"] == 5
    np.testing.assert_allclose(fig.axes[0].collections[0].get_offsets()[:, 0], emb[:, 0][
        np.random.default_rng(0).permutation(60)])


def test_umap_grid_one_axes_per_panel_and_one_shared_legend(tmp_path):
    coords, labels = clustered_points()
    panels = [("softmax", coords, labels), ("center", coords * 0.5, labels), ("lgm", -coords, labels)]
    fig = P.umap_grid(panels, class_names=["pho", "ramen", "udon"])
    assert len(fig.axes) == 3
    assert [ax.get_title() for ax in fig.axes] == ["softmax", "center", "lgm"]
    assert all(ax.get_legend() is None for ax in fig.axes)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["pho", "ramen", "udon", *MARKS]
    # the same class has the same colour in every panel
    mean_colours = [tuple(map(tuple, ax.collections[1].get_facecolors())) for ax in fig.axes]
    assert mean_colours[0] == mean_colours[1] == mean_colours[2]
    assert_png(P.save_figure(fig, tmp_path / "grid.png"))
    # without names, a panel lacking the last class still gets the palette of all classes
    partial = P.umap_grid([("all", coords, labels), ("two", coords[labels < 2], labels[labels < 2])])
    assert [tuple(c) for c in partial.axes[1].collections[1].get_facecolors()] == \
        [tuple(c) for c in partial.axes[0].collections[1].get_facecolors()[:2]]


def test_features_2d_points_and_black_centers(tmp_path):
    emb, labels = clustered_points(n_classes=10, per_class=10)
    centers = np.stack([emb[labels == c].mean(axis=0) for c in range(10)])
    fig = P.features_2d(emb, labels, centers=centers, title="2-D features")
    ax = fig.axes[0]
    points, marks = ax.collections
    assert len(points.get_offsets()) == 100
    np.testing.assert_allclose(marks.get_offsets(), centers)
    assert tuple(marks.get_facecolors()[0][:3]) == (0.0, 0.0, 0.0)
    assert len(legend_texts(ax)) == 10 + 1 and legend_texts(ax)[-1] == "black x: learned class center"
    assert len(P.features_2d(emb, labels).axes[0].collections) == 1  # no centers given: none drawn
    with pytest.raises(ValueError, match="features_2d needs 2-D embeddings"):
        P.features_2d(np.zeros((5, 3)), np.zeros(5, int))
    assert_png(P.save_figure(fig, tmp_path / "f2d.png"))


def trace_rows():
    rows = []
    for epoch in (1, 2, 3):
        rows.append({"epoch": epoch, "split": "train", "lr": 0.1, "loss": 2.0 / epoch, "ce": 1.5 / epoch,
                     "center": 5.0 / epoch, "top1": 0.3 * epoch, "top5": 0.3 + 0.2 * epoch})
        rows.append({"epoch": epoch, "split": "val", "loss": 2.2 / epoch, "ce": 1.7 / epoch, "center": 6.0 / epoch,
                     "top1": 0.25 * epoch, "top5": 0.25 + 0.2 * epoch})
    return rows


def test_training_curves_from_rows_columns_and_dataframe(tmp_path):
    rows = trace_rows()
    fig = P.training_curves(rows)
    loss_ax, acc_ax, term_ax = fig.axes
    assert [line.get_label() for line in loss_ax.get_lines()] == ["train", "val"]
    np.testing.assert_allclose(loss_ax.get_lines()[1].get_ydata(), [2.2, 1.1, 2.2 / 3])
    assert len(acc_ax.get_lines()) == 4  # top-1 and top-5 for each split
    assert len(term_ax.get_lines()) == 4  # ce and center for each split
    assert term_ax.get_yscale() == "log"
    assert_png(P.save_figure(fig, tmp_path / "curves.png"))

    columns = {key: [row.get(key, np.nan) for row in rows] for key in ("epoch", "split", "loss", "top1")}
    assert len(P.training_curves(columns).axes) == 2  # no term columns: no term panel
    pd = pytest.importorskip("pandas")
    assert len(P.training_curves(pd.DataFrame(rows)).axes) == 3


def test_training_curves_reads_csv_strings_and_names_missing_columns():
    rows = [{k: str(v) for k, v in row.items()} for row in trace_rows()]  # as csv.DictReader gives them
    rows[1]["center"] = ""  # a blank cell
    fig = P.training_curves(rows, terms=["center"])
    val_center = [line for line in fig.axes[2].get_lines() if line.get_label() == "center (val)"][0]
    assert np.isnan(val_center.get_ydata()[0]) and val_center.get_ydata()[1] == pytest.approx(3.0)
    with pytest.raises(ValueError, match=r"lacks the columns \['top1'\]"):
        P.training_curves([{"epoch": 1, "split": "train", "loss": 1.0}])
    with pytest.raises(ValueError, match="not columns of the trace"):
        P.training_curves(trace_rows(), terms=["island"])


def test_confusion_heatmap_boxes_both_cells_of_each_top_pair(tmp_path):
    confusion = np.array([[10, 1, 0, 3],
                          [4, 10, 0, 0],
                          [0, 0, 10, 2],
                          [0, 0, 2, 10]])  # pairs by count: (0, 1) 5, (2, 3) 4, (0, 3) 3
    fig = P.confusion_heatmap(confusion, ["pho", "ramen", "udon", "soba"], highlight=2)
    ax = fig.axes[0]
    boxes = sorted((int(p.get_y()), int(p.get_x())) for p in ax.patches if isinstance(p, Rectangle))
    assert boxes == [(0, 1), (1, 0), (2, 3), (3, 2)]  # (row, col) of both cells of the 2 top pairs
    assert [t.get_text() for t in ax.get_xticklabels()] == ["pho", "ramen", "udon", "soba"]
    assert len(fig.axes) == 2  # the heatmap and its colour bar
    assert len(P.confusion_heatmap(confusion, highlight=0).axes[0].patches) == 0
    assert_png(P.save_figure(fig, tmp_path / "confusion.png"))


def test_training_curves_leave_out_top5_with_5_classes_or_fewer():
    def has_top5(fig):
        return any("top-5" in t for t in legend_texts(fig.axes[1]))

    assert not has_top5(P.training_curves(trace_rows(), n_classes=5))  # top-5 of 5 classes is always 1
    assert has_top5(P.training_curves(trace_rows(), n_classes=6))
    ones = [{**row, "top5": 1.0} for row in trace_rows()]
    assert not has_top5(P.training_curves(ones)) and has_top5(P.training_curves(trace_rows()))


def test_confusion_heatmap_explains_its_red_boxes_and_takes_a_shared_scale():
    confusion = np.array([[8, 2, 0], [1, 9, 0], [0, 3, 7]])
    fig = P.confusion_heatmap(confusion, highlight=2, title="t")
    assert fig.axes[0].get_title() == "t\nred boxes: the 2 most confused pairs of classes (both cells of a pair)"
    assert fig.axes[1].get_ylim() == (0.0, 1.0)  # normalised: the colour bar spans 0..1, not the data's range
    shared = P.confusion_heatmap(confusion, normalize=False, vmax=20, colorbar=False, explain_boxes=False, title="t")
    assert len(shared.axes) == 1 and shared.axes[0].get_title() == "t"
    assert shared.axes[0].collections[0].get_clim() == (0.0, 20)


def test_per_class_accuracy_bars_sorted_without_empty_classes(tmp_path):
    acc = np.array([0.5, 0.9, np.nan, 0.7])
    fig = P.per_class_accuracy_bars(acc, ["pho", "ramen", "udon", "soba"])
    ax = fig.axes[0]
    widths = [p.get_width() for p in ax.patches]
    assert widths == [0.9, 0.7, 0.5]  # bar 0 at the bottom; udon (no samples) left out
    assert [t.get_text() for t in ax.get_yticklabels()] == ["ramen", "soba", "pho"]
    assert legend_texts(ax) == ["mean 0.700"]
    assert_png(P.save_figure(fig, tmp_path / "bars.png"))


def test_accuracy_with_ci_points_and_bars(tmp_path):
    fig = P.accuracy_with_ci(["softmax", "center", "lgm"], [0.70, 0.74, 0.73], [0.68, 0.71, np.nan],
                             [0.72, 0.77, np.nan], title="top-1 over 3 seeds")
    ax = fig.axes[0]
    (container,) = ax.containers
    np.testing.assert_allclose(container.lines[0].get_ydata(), [0.70, 0.74, 0.73])
    segments = container.lines[2][0].get_segments()
    np.testing.assert_allclose([s[:, 1] for s in segments], [[0.68, 0.72], [0.71, 0.77], [0.73, 0.73]])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["softmax", "center", "lgm"]
    with pytest.raises(ValueError, match="must contain its mean"):
        P.accuracy_with_ci(["a"], [0.7], [0.8], [0.9])
    assert_png(P.save_figure(fig, tmp_path / "ci.png"))


def test_save_figure_adds_png_suffix(tmp_path):
    path = P.save_figure(P.umap_scatter(*clustered_points()), tmp_path / "a" / "b" / "fig")
    assert path.suffix == ".png"
    assert_png(path)


# -- UMAP ---------------------------------------------------------------------------------------------


@pytest.fixture
def counting_fit(monkeypatch):
    """Replace the UMAP fit with a cheap, deterministic stand-in that counts its calls."""
    calls = []

    def fake_fit(x, **params):
        calls.append(params)
        return (x[:, :2] * params["min_dist"]).astype(np.float32)

    monkeypatch.setattr(P, "_fit_umap", fake_fit)
    return calls


def test_umap_cache_is_reused_and_invalidated(tmp_path, counting_fit):
    emb, _ = clustered_points(n_classes=4, per_class=50, dims=16)
    cache = tmp_path / "cache" / "umap_test.npz"
    first = P.umap_embed(emb, cache_path=cache)
    assert len(counting_fit) == 1 and cache.is_file()
    again = P.umap_embed(emb, cache_path=cache)
    assert len(counting_fit) == 1  # read from the cache, not recomputed
    np.testing.assert_array_equal(first, again)

    changed = emb.copy()
    changed[123, 5] += 1e-3  # one number in one row
    P.umap_embed(changed, cache_path=cache)
    assert len(counting_fit) == 2  # different data: recomputed
    P.umap_embed(changed, cache_path=cache, min_dist=0.3)
    assert len(counting_fit) == 3  # different parameters: recomputed
    np.testing.assert_allclose(P.umap_embed(changed, cache_path=cache, min_dist=0.3), changed[:, :2] * 0.3,
                               rtol=1e-6)
    assert len(counting_fit) == 3


def test_umap_cache_survives_a_corrupt_file_and_checks_the_suffix(tmp_path, counting_fit):
    emb, _ = clustered_points(dims=8)
    cache = tmp_path / "umap.npz"
    cache.write_bytes(b"not a zip file")
    assert P.umap_embed(emb, cache_path=cache).shape == (60, 2)
    assert len(counting_fit) == 1
    with pytest.raises(ValueError, match="must end in .npz"):
        P.umap_embed(emb, cache_path=tmp_path / "umap.npy")
    with pytest.raises(ValueError, match="at least 4 points"):
        P.umap_embed(emb[:3])


def test_umap_embed_clamps_neighbours_and_picks_epochs_by_size(counting_fit):
    emb, _ = clustered_points(n_classes=2, per_class=5, dims=8)
    P.umap_embed(emb, n_neighbors=15)
    assert counting_fit[0]["n_neighbors"] == 9
    assert counting_fit[0]["n_epochs"] is None  # small: umap-learn's own default
    P.umap_embed(np.zeros((10_001, 3), np.float32))
    assert counting_fit[1]["n_epochs"] == P.UMAP_LARGE_N_EPOCHS
    P.umap_embed(np.zeros((10_001, 3), np.float32), n_epochs=7)
    assert counting_fit[2]["n_epochs"] == 7


@pytest.mark.slow
def test_umap_embed_real_run_is_reproducible_and_keeps_classes_apart(tmp_path):
    from sklearn.neighbors import KNeighborsClassifier

    emb, labels = clustered_points(n_classes=4, per_class=50, dims=64)  # D > pca_dims: PCA runs first
    coords = P.umap_embed(emb, random_state=0, n_epochs=50)
    assert coords.shape == (200, 2) and coords.dtype == np.float32
    np.testing.assert_array_equal(coords, P.umap_embed(emb, random_state=0, n_epochs=50))
    # well-separated classes stay separated: 1-NN in the layout recovers every label
    assert KNeighborsClassifier(1).fit(coords[::2], labels[::2]).score(coords[1::2], labels[1::2]) == 1.0


def test_umap_grid_wraps_many_panels_into_rows():
    rng = np.random.default_rng(0)
    y = np.arange(60) % 3
    panels = [(f"loss {i}", rng.normal(size=(60, 2)), y) for i in range(7)]
    fig = P.umap_grid(panels, max_columns=4)
    assert len(fig.axes) == 7  # 4 + 3: the empty eighth cell is removed
    width, height = fig.get_size_inches()
    assert width == pytest.approx(4 * 4.5) and height > 2 * 4.5
