"""Open-set metrics against values worked out by hand on tiny examples."""
from __future__ import annotations

import numpy as np
import pytest

from foodlib.openset import (few_shot_accuracy, nearest_mean_accuracy, openset_metrics, retrieval_metrics,
                             verification_from_scores, verification_metrics)

# Five 1-D points, two classes. Leave-one-out neighbours (nearest first), by hand:
#   0 (a): 1a 3b 4a 10b   R=2  R-prec 1/2  AP@R (1/1)/2 = 1/2     P@1 1
#   1 (a): 0a 3b 4a 10b   R=2  R-prec 1/2  AP@R 1/2               P@1 1
#   3 (b): 4a 1a 0a 10b   R=1  R-prec 0    AP@R 0                 P@1 0
#   4 (a): 3b 1a 0a 10b   R=2  R-prec 1/2  AP@R (0 + 1/2)/2 = 1/4 P@1 0
#  10 (b): 4a 3b 1a 0a    R=1  R-prec 0    AP@R 0                 P@1 0
EMB = np.array([[0.0], [1.0], [3.0], [4.0], [10.0]])
LABELS = np.array([0, 0, 1, 0, 1])


def test_retrieval_matches_the_hand_computed_values():
    r = retrieval_metrics(EMB, LABELS)
    assert r["precision_at_1"] == pytest.approx(2 / 5)
    assert r["r_precision"] == pytest.approx((0.5 + 0.5 + 0 + 0.5 + 0) / 5)
    assert r["map_at_r"] == pytest.approx((0.5 + 0.5 + 0 + 0.25 + 0) / 5)
    # Recall@K: a same-class image among the K nearest. K=1: queries 0, 1; K=2: also 4 and 10; K=4: all.
    assert (r["recall_at_1"], r["recall_at_2"], r["recall_at_4"], r["recall_at_8"]) == pytest.approx((0.4, 0.8, 1, 1))


def test_retrieval_in_cosine_geometry_uses_angles_not_lengths():
    # Same direction, very different lengths: cosine retrieval is perfect, Euclidean is not.
    emb = np.array([[1.0, 0.0], [9.0, 0.1], [0.0, 1.0], [0.1, 9.0]])
    labels = np.array([0, 0, 1, 1])
    assert retrieval_metrics(emb, labels, "cosine")["map_at_r"] == pytest.approx(1.0)
    assert retrieval_metrics(emb, labels, "euclidean")["precision_at_1"] == pytest.approx(0.5)


def test_verification_roc_auc_and_tar_by_hand():
    # 5 same-class pairs; 1000 different-class pairs: 1 scoring 0.85, 5 at 0.3, 994 at 0.1.
    same_scores = [0.9, 0.8, 0.4, 0.2, 0.05]
    diff_scores = [0.85] + [0.3] * 5 + [0.1] * 994
    scores = np.array(same_scores + diff_scores)
    same = np.array([True] * 5 + [False] * 1000)
    v = verification_from_scores(scores, same)
    # AUC: per positive, the fraction of negatives scoring lower: 1000, 999, 999, 994, 0 (of 1000).
    assert v["roc_auc"] == pytest.approx((1000 + 999 + 999 + 994 + 0) / 5000)
    # At most 1 false accept (FAR 1e-3): threshold 0.4 accepts 3 of 5; at most 10 (1e-2): 0.2 accepts 4.
    assert v["tar_at_far_0.001"] == pytest.approx(3 / 5)
    assert v["tar_at_far_0.01"] == pytest.approx(4 / 5)
    assert (v["pairs_same"], v["pairs_different"]) == (5, 1000)


def test_verification_pairs_from_embeddings():
    # Pairs of EMB: same-class distances 1, 4, 3, 7; different-class 3, 10, 2, 9, 1, 6.
    # AUC = P(d_same < d_diff) with ties 1/2: (5.5 + 3 + 3.5 + 2) / 24.
    v = verification_metrics(EMB, LABELS)
    assert v["roc_auc"] == pytest.approx(14 / 24)
    assert (v["pairs_same"], v["pairs_different"]) == (4, 6)


def test_nearest_mean_accuracy_by_hand():
    support = np.array([[0.0], [2.0], [10.0]])
    queries = np.array([[1.0], [5.0], [7.0]])
    # means: class 0 at 1, class 1 at 10: queries go to 0, 0, 1
    assert nearest_mean_accuracy(support, [0, 0, 1], queries, [0, 1, 1]) == pytest.approx(2 / 3)


def test_one_shot_episodes_every_draw_gives_one_half():
    # Class a at {0, 10}, class b at {4, 6}. Each of the 4 possible 1-shot supports leaves one query
    # per class; by hand every support misplaces the a-query and places the b-query: 1/2 each time.
    emb = np.array([[0.0], [10.0], [4.0], [6.0]])
    few = few_shot_accuracy(emb, np.array([0, 0, 1, 1]), shots=1, episodes=100)
    assert few["mean"] == pytest.approx(0.5) and few["std"] == pytest.approx(0.0)
    assert (few["episodes"], few["ways"], few["shots"]) == (100, 2, 1)


def test_five_shot_episodes_have_spread_and_are_seeded():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 12)
    emb = rng.normal(size=(48, 3)) + labels[:, None] * 0.8  # overlapping classes: accuracy varies by draw
    a = few_shot_accuracy(emb, labels, shots=5, episodes=120, seed=1)
    assert a == few_shot_accuracy(emb, labels, shots=5, episodes=120, seed=1)
    assert 0 < a["std"] and a["ci95"] == pytest.approx(1.96 * a["std"] / np.sqrt(120))
    assert 0.25 < a["mean"] <= 1.0
    with pytest.raises(ValueError, match="more than 12"):
        few_shot_accuracy(emb, labels, shots=12)


def test_openset_metrics_collects_everything_and_skips_impossible_shots():
    out = openset_metrics(EMB, LABELS, episodes=20)
    assert out["map_at_r"] == pytest.approx(0.25) and out["roc_auc"] == pytest.approx(14 / 24)
    assert "shot1_mean" in out and "shot5_mean" not in out  # only 2-3 images per class
    with pytest.raises(ValueError, match="metric"):
        openset_metrics(EMB, LABELS, metric="manhattan")


def test_report_has_open_set_columns_and_paired_differences(tmp_path):
    import json

    from foodlib import report as R

    map_r = {("softmax", 0): 0.30, ("softmax", 1): 0.34, ("center", 0): 0.40, ("center", 1): 0.46}
    for (loss, seed), value in map_r.items():
        run_dir = tmp_path / f"{loss}-s{seed}"
        run_dir.mkdir()
        novel = {"map_at_r": value, "precision_at_1": value + 0.3, "shot5_mean": value + 0.2, "held_out": ["a", "b"]}
        (run_dir / "metrics.json").write_text(json.dumps({"test": {"top1": 0.5, "map_at_r": 0.5}, "novel": novel}))
    rows = R.collect_runs(tmp_path)
    assert {r["novel_map_at_r"] for r in rows} == set(map_r.values()) and "novel_held_out" not in rows[0]
    lines = "\n".join(R.openset_section(rows, "softmax"))
    assert "novel MAP@R" in lines and "known MAP@R" in lines and "novel 5-shot" in lines
    paired = R.paired_vs_baseline(rows, "softmax", metric="novel_map_at_r")[0]
    assert paired["mean_diff"] == pytest.approx(((0.40 - 0.30) + (0.46 - 0.34)) / 2)
    assert "| center | softmax | 2 |" in lines
    assert R.openset_section([{k: v for k, v in r.items() if not k.startswith("novel")} for r in rows], "softmax") == []


def test_figures_mark_known_in_grey_and_retrieval_right_and_wrong(tmp_path):
    from PIL import Image

    from foodlib.openset import novel_umap, retrieval_grid

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 4)
    emb = (labels[:, None] * 10 + rng.normal(size=(8, 2))).astype(np.float32)  # 2-D: drawn as is, no UMAP
    fig = novel_umap(rng.normal(size=(20, 2)), emb, labels, ["laksa", "poke"])
    ax = fig.axes[0]
    assert len(ax.collections) == 3 and [t.get_text() for t in ax.get_legend().get_texts()][1:] == ["laksa", "poke"]
    paths = []
    for i, y in enumerate(labels):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (20, 20), (200 * int(y), 50, 50)).save(paths[-1])
    grid = retrieval_grid(paths, labels, ["laksa", "poke"], emb, n_queries=2, k=3, image_side=16)
    titles = [a.get_title() for a in grid.axes]
    colours = [a.title.get_color() for a in grid.axes]
    assert len(titles) == 2 * 4 and titles[0].startswith("query")
    assert colours[1:4] == ["tab:green"] * 3  # well-separated dishes: the 3 nearest are the query's own
