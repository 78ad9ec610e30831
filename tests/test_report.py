"""foodlib.report on hand-made run folders: every number in the tables is recomputed here by hand.

Student-t quantiles come from a printed table (t_{0.975, 1} = 12.7062, t_{0.975, 2} = 4.3027), and
the two-sided p-value for 2 degrees of freedom from the closed form of that distribution's CDF,
F(t) = 1/2 + t / (2 sqrt(2 + t^2)): nothing is taken from scipy or from the code under test.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from foodlib import report as R
from foodlib.cli import main as cli_main

T_975 = {1: 12.7062, 2: 4.3027}  # Student-t 97.5% quantiles by degrees of freedom (table values)
SOFTMAX = {0: 0.60, 1: 0.70, 2: 0.65}  # test top-1 per seed
CENTER = {0: 0.66, 1: 0.73, 2: 0.68}
CLASSES = ["pho", "ramen", "udon", "soba"]


def write_run(suite_dir: Path, name: str, test: dict, loss: str | None = None, seed: int | None = None,
              features: dict | None = None) -> Path:
    run_dir = suite_dir / name
    run_dir.mkdir(parents=True)
    metrics = {"best_epoch": 3, "epochs": 4, "train_seconds": 12.0, "val": {"top1": test["top1"] - 0.01},
               "test": {"n": 40, "loss": 1.25, "top1_ci": [0.1, 0.9], **test}}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    if loss is not None:
        (run_dir / "config.yaml").write_text(
            f"data:\n  data: dishes\n  image_size: 32\nmodel:\n  backbone: smallcnn\nloss:\n  loss: {loss}\n"
            f"train:\n  seed: {seed}\n  epochs: 4\n")
    if features is not None:
        np.savez(run_dir / "features.npz", classes=np.array(CLASSES),
                 **{f"test_{k}": v for k, v in features.items()})
    return run_dir


def make_features(confusions: list[tuple[int, int, int]], seed: int = 0) -> dict:
    """Test split with 10 images per class; `confusions` lists (true, predicted, count) mistakes."""
    labels = np.repeat(np.arange(len(CLASSES)), 10)  # (40,)
    pred = labels.copy()
    for true, predicted, count in confusions:
        rows = np.flatnonzero((labels == true) & (pred == true))[:count]
        pred[rows] = predicted
    logits = np.eye(len(CLASSES), dtype=np.float32)[pred]  # (40, 4) one-hot: argmax is pred
    rng = np.random.default_rng(seed)
    emb = (np.eye(4, 2)[labels] * 3 + rng.normal(size=(40, 2))).astype(np.float32)  # (40, 2): no UMAP needed
    return {"embeddings": emb, "logits": logits, "labels": labels}




@pytest.fixture
def suite_dir(tmp_path) -> Path:
    suite = tmp_path / "demo"
    for seed, top1 in SOFTMAX.items():
        write_run(suite, f"softmax-s{seed}", {"top1": top1, "top5": 1.0, "fisher_ratio": 1.0 + seed,
                                              "silhouette": 0.1, "knn_top1": 0.5}, "softmax", seed,
                  make_features([(0, 1, 3), (2, 3, 1)], seed))
    for seed, top1 in CENTER.items():
        write_run(suite, f"center-s{seed}", {"top1": top1, "top5": 1.0, "fisher_ratio": 2.0, "silhouette": 0.2,
                                             "knn_top1": 0.6}, "center", seed,
                  make_features([(1, 0, 2), (3, 2, 1)], seed))
    (suite / "unfinished-s0").mkdir()  # no metrics.json: not a row
    return suite


def test_collect_runs(suite_dir):
    rows = R.collect_runs(suite_dir)
    assert [r["run"] for r in rows] == ["softmax-s0", "softmax-s1", "softmax-s2", "center-s0", "center-s1", "center-s2"]
    first = rows[0]
    assert (first["variant"], first["loss"], first["seed"]) == ("softmax", "softmax", 0)
    assert first["top1"] == 0.60 and first["fisher_ratio"] == 1.0 and first["val_top1"] == pytest.approx(0.59)
    assert first["best_epoch"] == 3 and first["train_seconds"] == 12.0 and first["run_dir"] == suite_dir / "softmax-s0"
    assert "top1_ci" not in first and (first["top1_boot_low"], first["top1_boot_high"]) == (0.1, 0.9)
    assert first["test_loss"] == 1.25  # the objective's value does not overwrite the loss name


def test_collect_runs_uses_suite_json_then_folder_names(tmp_path):
    suite = tmp_path / "s"
    write_run(suite, "center-lam0.1-s3", {"top1": 0.5})  # no config.yaml: identified by its name
    write_run(suite, "odd", {"top1": 0.4}, loss="island", seed=7)  # not <variant>-s<seed>: config.yaml decides
    rows = {r["run"]: r for r in R.collect_runs(suite)}
    assert (rows["center-lam0.1-s3"]["variant"], rows["center-lam0.1-s3"]["loss"], rows["center-lam0.1-s3"]["seed"]) \
        == ("center-lam0.1", "center", 3)
    assert (rows["odd"]["variant"], rows["odd"]["loss"], rows["odd"]["seed"]) == ("island", "island", 7)
    (suite / "suite.json").write_text(json.dumps({"runs": [
        {"name": "odd", "variant": "island-x", "loss": "island", "seed": 1},
        {"name": "center-lam0.1-s3", "variant": "center-lam0.1", "loss": "center", "seed": 3}]}))
    assert [(r["run"], r["variant"], r["seed"]) for r in R.collect_runs(suite)] == [
        ("odd", "island-x", 1), ("center-lam0.1-s3", "center-lam0.1", 3)]  # suite order, suite's names
    with pytest.raises(FileNotFoundError, match="foodlib suite"):
        R.collect_runs(tmp_path / "nowhere")


def mean_and_half_width(values: list[float]) -> tuple[float, float]:
    """By hand: mean and t_{0.975, n-1} * sample sd / sqrt(n)."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, T_975[n - 1] * sd / math.sqrt(n)


def test_summary_table_mean_and_ci(suite_dir):
    table = R.summary_table(R.collect_runs(suite_dir))
    assert [(e["variant"], e["n"], e["seeds"]) for e in table] == [("softmax", 3, [0, 1, 2]), ("center", 3, [0, 1, 2])]
    softmax, center = table
    mean, half = mean_and_half_width(list(SOFTMAX.values()))  # 0.65 and 4.3027 * 0.05 / sqrt(3) = 0.1242
    assert softmax["top1"] == pytest.approx(0.65)
    assert (softmax["top1_low"], softmax["top1_high"]) == (pytest.approx(mean - half, abs=1e-4),
                                                          pytest.approx(mean + half, abs=1e-4))
    assert half == pytest.approx(0.1242, abs=1e-4)
    mean, half = mean_and_half_width([1.0, 2.0, 3.0])  # Fisher ratio: mean 2, sd 1
    assert softmax["fisher_ratio"] == 2.0 and softmax["fisher_ratio_high"] == pytest.approx(2 + half, abs=1e-4)
    assert center["silhouette"] == pytest.approx(0.2) and center["silhouette_low"] == pytest.approx(0.2)  # no spread
    text = R.markdown_table(table)
    assert "| softmax | 3 | 0.650 [0.526, 0.774] |" in text


def test_one_seed_has_no_interval(tmp_path):
    write_run(tmp_path / "s", "softmax-s0", {"top1": 0.7})
    table = R.summary_table(R.collect_runs(tmp_path / "s"))
    assert table[0]["top1"] == 0.7 and math.isnan(table[0]["top1_low"]) and math.isnan(table[0]["fisher_ratio"])
    assert "| softmax | 1 | 0.700 | - |" in R.markdown_table(table)


def error_bars(fig) -> list[tuple[float, float]]:
    """(low, high) of each vertical error bar drawn by accuracy_with_ci."""
    segments = fig.axes[0].containers[0].lines[2][0].get_segments()
    return [(round(float(seg[0][1]), 6), round(float(seg[1][1]), 6)) for seg in segments]


def test_accuracy_figure_intervals(suite_dir, tmp_path):
    rows = R.collect_runs(suite_dir)
    fig = R.accuracy_figure(R.summary_table(rows), rows)
    assert fig.axes[0].get_title() == "test top-1: mean and 95% CI over 3 seeds"
    mean, half = mean_and_half_width(list(SOFTMAX.values()))
    assert error_bars(fig)[0] == pytest.approx((mean - half, mean + half), abs=1e-4)
    one = [r for r in rows if r["seed"] == 0]  # one seed per variant: each run's bootstrap interval instead
    fig = R.accuracy_figure(R.summary_table(one), one)
    assert fig.axes[0].get_title() == "test top-1, one seed: bootstrap 95% CI over test images"
    assert error_bars(fig) == [(0.1, 0.9), (0.1, 0.9)]


def test_paired_vs_baseline_by_hand(suite_dir):
    (entry,) = R.paired_vs_baseline(R.collect_runs(suite_dir), baseline="softmax")
    # differences 0.06, 0.03, 0.03: mean 0.04, sd sqrt(0.0006 / 2), standard error 0.01, t = 4
    assert (entry["variant"], entry["baseline"], entry["seeds"], entry["n"]) == ("center", "softmax", [0, 1, 2], 3)
    assert entry["mean_diff"] == pytest.approx(0.04)
    assert entry["mean_a"] == pytest.approx(0.69) and entry["mean_b"] == pytest.approx(0.65)
    assert entry["ci_low"] == pytest.approx(0.04 - 4.3027 * 0.01, abs=1e-5)
    assert entry["ci_high"] == pytest.approx(0.04 + 4.3027 * 0.01, abs=1e-5)
    t = 4.0
    assert entry["p_value"] == pytest.approx(2 * (1 - (0.5 + t / (2 * math.sqrt(2 + t * t)))), abs=1e-6)  # 0.0572
    assert "| center | softmax | 3 | 0.690 | 0.650 | +0.040 [-0.003, +0.083] | 0.057 |" in R.markdown_paired([entry])


def test_paired_pairs_shared_seeds_and_grid_labels(tmp_path):
    suite = tmp_path / "s"
    for name, top1 in [("softmax-lr0.1-s0", 0.5), ("softmax-lr0.1-s1", 0.6), ("softmax-lr0.1-s2", 0.9),
                       ("center-lr0.1-s0", 0.55), ("center-lr0.1-s1", 0.70),
                       ("softmax-lr1-s0", 0.3), ("lgm-lr1-s0", 0.4)]:
        write_run(suite, name, {"top1": top1})
    entries = {e["variant"]: e for e in R.paired_vs_baseline(R.collect_runs(suite), baseline="softmax")}
    assert set(entries) == {"center-lr0.1", "lgm-lr1"}
    center = entries["center-lr0.1"]
    assert center["baseline"] == "softmax-lr0.1" and center["seeds"] == [0, 1]  # seed 2 has no partner
    assert center["mean_diff"] == pytest.approx((0.05 + 0.10) / 2)
    # differences 0.05, 0.10: sd 0.0354, se 0.025, interval 0.075 -+ 12.7062 * 0.025
    assert center["ci_high"] == pytest.approx(0.075 + 12.7062 * 0.025, abs=1e-4)
    lgm = entries["lgm-lr1"]  # one shared seed: a difference, no interval
    assert lgm["baseline"] == "softmax-lr1" and lgm["mean_diff"] == pytest.approx(0.1) and math.isnan(lgm["ci_low"])


def test_lookalike_confusion_picks_the_most_confused_classes(suite_dir):
    rows = R.collect_runs(suite_dir)
    # summed over the 6 runs: pho<->ramen 3*3 + 3*2 = 15, udon<->soba 3*1 + 3*1 = 6
    fig = R.lookalike_confusion_figure(rows, max_classes=2)
    heatmaps = [ax for ax in fig.axes if ax.get_title() in ("softmax", "center")]
    assert [ax.get_title() for ax in heatmaps] == ["softmax", "center"]
    assert [t.get_text() for t in heatmaps[0].get_yticklabels()] == ["pho", "ramen"]
    fig = R.lookalike_confusion_figure(rows, max_classes=8)
    heatmaps = [ax for ax in fig.axes if ax.get_title() in ("softmax", "center")]
    assert [t.get_text() for t in heatmaps[1].get_xticklabels()] == CLASSES


def test_lookalike_confusion_panels_share_one_scale_and_fit_the_readme(suite_dir):
    rows = R.collect_runs(suite_dir)
    fig = R.lookalike_confusion_figure(rows, max_classes=4)
    heatmaps = [ax for ax in fig.axes if ax.get_title() in ("softmax", "center")]
    assert [ax.collections[0].get_clim() for ax in heatmaps] == [(0.0, 1.0)] * 2  # comparable colours
    assert len(fig.axes) == len(heatmaps) + 1  # one colour bar for the figure
    assert "red boxes" in fig.get_suptitle()
    width, height = fig.get_size_inches()
    assert width <= 12.5 and width / height < 2.5  # two panels a row at most: not a 4000 px strip


def test_write_report(suite_dir, tmp_path):
    (suite_dir / "suite.json").write_text(json.dumps({"name": "demo", "baseline": "softmax", "runs": [
        {"name": f"{loss}-s{seed}", "variant": loss, "loss": loss, "seed": seed, "status": "ok"}
        for loss in ("softmax", "center") for seed in range(3)] + [
        {"name": "lgm-s0", "variant": "lgm", "loss": "lgm", "seed": 0, "status": "failed"}]}))
    path = R.write_report(suite_dir, copy_to=tmp_path / "readme_pictures")
    text = path.read_text()
    assert path == suite_dir / "report.md"
    assert "| softmax | 3 | 0.650 [0.526, 0.774] | 1.000 [1.000, 1.000] | 2.000 [-0.484, 4.484] |" in text
    assert "| center | softmax | 3 | 0.690 | 0.650 | +0.040 [-0.003, +0.083] | 0.057 |" in text
    assert "lgm-s0 (failed)" in text
    assert "Shared settings: data=dishes, backbone=smallcnn, image_size=32, epochs=4." in text
    assert "| softmax-s1 | softmax | 1 | 0.700 | 0.690 | 3 | 12 |" in text
    for name in ("accuracy_ci", "umap_grid", "lookalike_confusion"):
        assert (suite_dir / "figures" / f"{name}.png").stat().st_size > 1000
        assert f"](figures/{name}.png)" in text
        assert (tmp_path / "readme_pictures" / f"demo_{name}.png").is_file()


def test_write_report_without_features_or_runs(tmp_path):
    write_run(tmp_path / "s", "softmax-s0", {"top1": 0.7})
    text = R.write_report(tmp_path / "s").read_text()
    assert "| softmax | 1 | 0.700 |" in text and "accuracy_ci.png" in text and "umap_grid" not in text
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no finished run"):
        R.write_report(tmp_path / "empty")


def test_tuning_suite_without_test_reports_val(tmp_path):
    for name, loss, val in (("softmax-s0", "softmax", 0.61), ("center-lam0.1-s0", "center", 0.64)):
        run_dir = tmp_path / "tune" / name
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.json").write_text(json.dumps(
            {"best_epoch": 5, "train_seconds": 9.0, "val": {"n": 50, "top1": val, "fisher_ratio": 1.5}}))
        (run_dir / "config.yaml").write_text(f"loss:\n  loss: {loss}\ntrain:\n  seed: 0\n")
    text = R.write_report(tmp_path / "tune").read_text()
    assert "## Val metrics" in text and "test" not in text.lower().replace("tests", "")
    assert "| center-lam0.1 | 1 | 0.640 |" in text
    assert "| center-lam0.1-s0 | center | 0 | 0.640 | 0.640 | 5 | 9 |" in text


def test_report_cli(suite_dir, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["report", str(suite_dir), "--readme-pictures"]) == 0
    assert "0.650 [0.526, 0.774]" in capsys.readouterr().out
    assert (tmp_path / "readme_pictures" / "demo_accuracy_ci.png").is_file()


# ----- dataset overview helpers ----------------------------------------------------------------------------

def write_images(folder: Path, sizes: list[tuple[int, int]]) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, size in enumerate(sizes):
        path = folder / f"{i}.png"
        Image.new("RGB", size, (i * 40 % 255, 100, 50)).save(path)
        paths.append(str(path))
    return paths


def test_image_sizes_reads_headers_and_marks_unreadable_files(tmp_path):
    paths = write_images(tmp_path, [(40, 30), (25, 60)])
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    sizes = R.image_sizes(paths + [str(tmp_path / "broken.jpg")])
    assert sizes.tolist() == [[40, 30], [25, 60], [-1, -1]]


def test_image_size_histogram(tmp_path):
    fig = R.image_size_histogram(np.array([[40, 30], [25, 60], [50, 50], [-1, -1]]))
    # short sides 30, 25, 50 (median 30); long sides 40, 60, 50 (median 50); the -1 row is left out
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["short side (min 25, median 30, max 50)", "long side (min 40, median 50, max 60)"]
    assert sum(p.get_height() for p in fig.axes[0].patches) == 6
    with pytest.raises(ValueError, match="no readable"):
        R.image_size_histogram(np.array([[-1, -1]]))


def test_sample_grid(tmp_path):
    paths = write_images(tmp_path / "a", [(20, 20)] * 5) + write_images(tmp_path / "b", [(30, 10)])
    labels = [0] * 5 + [2]  # class 1 has no image
    fig = R.sample_grid(paths, labels, ["a", "empty", "b"], per_class=3, side=16)
    axes = np.array(fig.axes).reshape(3, 3)
    assert [[len(ax.images) for ax in row] for row in axes] == [[1, 1, 1], [0, 0, 0], [1, 0, 0]]
    assert axes[0, 0].images[0].get_array().shape == (16, 16, 3)
    assert [axes[r, 0].get_ylabel() for r in range(3)] == ["a\n(5)", "empty\n(0)", "b\n(1)"]
    assert len(R.sample_grid(paths, labels, ["a", "empty", "b"], per_class=2, max_classes=1).axes) == 2
    with pytest.raises(ValueError, match="one label per file"):
        R.sample_grid(paths, labels[:2], ["a"])
