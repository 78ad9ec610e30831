"""foodlib.metrics on tiny hand-made arrays whose answers are worked out by hand in each test."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from foodlib import metrics as M


def two_clusters(n_per_class=20, distance=100.0, spread=0.1, dims=3, seed=0):
    """Two tight clusters far apart: (2n, D) embeddings and their labels."""
    rng = np.random.default_rng(seed)
    centre_b = np.zeros(dims)
    centre_b[0] = distance
    emb = np.concatenate([rng.normal(0.0, spread, (n_per_class, dims)),
                          centre_b + rng.normal(0.0, spread, (n_per_class, dims))])
    return emb, np.repeat([0, 1], n_per_class)


def test_importing_metrics_does_not_import_torch():
    code = "import sys, foodlib.metrics; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- accuracy ---------------------------------------------------------------------------------------


def test_topk_accuracy_by_hand():
    logits = np.array([[0.9, 0.05, 0.03, 0.02],   # label 0: top-1 hit
                       [0.1, 0.2, 0.6, 0.1],      # label 1: 2nd highest -> top-2 hit only
                       [0.4, 0.3, 0.2, 0.1],      # label 3: lowest -> hit only at top-4
                       [0.1, 0.1, 0.1, 0.7]])     # label 2: tie with 0 and 1 at 0.1 -> rank 4 (index order)
    labels = np.array([0, 1, 3, 2])
    assert M.top1_accuracy(logits, labels) == 0.25
    assert M.topk_accuracy(logits, labels, k=2) == 0.5
    assert M.topk_accuracy(logits, labels, k=3) == 0.5
    assert M.topk_accuracy(logits, labels, k=4) == 1.0
    assert M.accuracy(logits, labels, k=(1, 2)) == {"top1": 0.25, "top2": 0.5}


def test_top5_is_clamped_to_the_number_of_classes():
    logits = np.array([[0.1, 0.5, 0.4], [0.3, 0.3, 0.4]])
    labels = np.array([0, 0])
    assert M.accuracy(logits, labels) == {"top1": 0.0, "top5": 1.0}  # top-5 of 3 classes = top-3


def test_accuracy_rejects_bad_shapes_with_the_value():
    with pytest.raises(ValueError, match="labels must lie in"):
        M.top1_accuracy(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match=r"shape \(N, C\)"):
        M.top1_accuracy(np.zeros(3), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="2 rows but labels has 3"):
        M.top1_accuracy(np.zeros((2, 3)), np.array([0, 1, 2]))


def test_confusion_and_per_class_accuracy():
    labels = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 1, 1, 1, 0, 2])
    confusion = M.confusion_matrix(labels, pred, 4)
    assert confusion.tolist() == [[1, 2, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    per_class = M.per_class_accuracy(pred, labels, 4)
    np.testing.assert_allclose(per_class[:3], [1 / 3, 1 / 2, 1.0])
    assert math.isnan(per_class[3])  # class 3 never occurs


def test_most_confused_pairs_counts_both_directions_and_sorts():
    confusion = np.array([[10, 1, 0, 3],
                          [4, 10, 0, 0],
                          [0, 0, 4, 2],
                          [0, 0, 2, 4]])
    names = ["pho", "ramen", "udon", "soba"]  # 14, 14, 6 and 6 samples
    # counts: (pho, ramen) 1+4=5, (udon, soba) 2+2=4, (pho, soba) 3+0=3; all others 0
    assert M.most_confused_pairs(confusion, names, k=5) == [("pho", "ramen", 5), ("udon", "soba", 4),
                                                            ("pho", "soba", 3)]
    assert M.most_confused_pairs(confusion, None, k=1) == [(0, 1, 5)]
    # rates: (udon, soba) 4/(6+6) beats (pho, ramen) 5/(14+14), then (pho, soba) 3/(14+6)
    rates = M.most_confused_pairs(confusion, names, k=3, normalize=True)
    assert [(a, b) for a, b, _ in rates] == [("udon", "soba"), ("pho", "ramen"), ("pho", "soba")]
    np.testing.assert_allclose([r for *_, r in rates], [4 / 12, 5 / 28, 3 / 20])


# -- feature space ----------------------------------------------------------------------------------


def test_intra_class_variance_by_hand():
    emb = np.array([[0.0, 0.0], [2.0, 0.0], [4.0, 0.0],   # class 0: mean (2, 0); squared distances 4, 0, 4
                    [10.0, 1.0], [10.0, 5.0]])            # class 1: mean (10, 3); squared distances 4, 4
    labels = np.array([0, 0, 0, 1, 1])
    assert M.intra_class_variance(emb, labels) == pytest.approx((4 + 0 + 4 + 4 + 4) / 5)  # over samples


def test_class_mean_distances_by_hand():
    emb = np.array([[0.0, 0.0], [2.0, 0.0],   # class 0 mean (1, 0)
                    [4.0, 4.0], [4.0, 4.0],   # class 1 mean (4, 4): 5 from class 0
                    [1.0, 2.0]])              # class 2 mean (1, 2): 2 from class 0, sqrt(13) from class 1
    distances = M.class_mean_distances(emb, np.array([0, 0, 1, 1, 2]))
    assert distances["min"] == pytest.approx(2.0)
    assert distances["mean"] == pytest.approx((5 + 2 + math.sqrt(13)) / 3)


def test_fisher_ratio_by_hand():
    emb = np.array([[0.0], [2.0], [10.0], [14.0]])  # means 1 and 12, overall 6.5
    between = 2 * (1 - 6.5) ** 2 + 2 * (12 - 6.5) ** 2
    within = 1 + 1 + 4 + 4
    assert M.fisher_ratio(emb, np.array([0, 0, 1, 1])) == pytest.approx(between / within)


def test_tight_far_clusters_score_high_and_shuffled_labels_score_low():
    emb, labels = two_clusters()
    assert M.fisher_ratio(emb, labels) > 1e4
    assert M.silhouette(emb, labels) > 0.99
    assert M.nmi(emb, labels) == pytest.approx(1.0)
    assert M.knn_accuracy(emb, labels, emb + 0.01, labels) == 1.0
    shuffled = np.random.default_rng(1).permutation(labels)
    assert M.fisher_ratio(emb, shuffled) < 1.0
    assert M.silhouette(emb, shuffled) < 0.2


def test_nmi_of_unrelated_labels_is_near_zero():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [50.0, 0.0], [0.0, 50.0], [50.0, 50.0]])
    clusters = np.repeat(np.arange(4), 100)
    emb = centres[clusters] + rng.normal(0.0, 1.0, (400, 2))
    assert M.nmi(emb, clusters) > 0.95
    assert M.nmi(emb, rng.integers(0, 4, 400)) < 0.05  # labels drawn independently of the clusters


def test_silhouette_subsamples_reproducibly():
    emb, labels = two_clusters(n_per_class=50, distance=1.0, spread=0.5, seed=3)
    full = M.silhouette(emb, labels, max_samples=None)
    from sklearn.metrics import silhouette_score
    assert full == pytest.approx(silhouette_score(emb, labels))
    sub_a = M.silhouette(emb, labels, max_samples=30, seed=0)
    assert sub_a == M.silhouette(emb, labels, max_samples=30, seed=0)
    assert sub_a != full  # a 30-point subset, not the whole set


def test_knn_accuracy_vote_and_leave_one_out():
    gallery = np.array([[1.0, 0.0], [10.0, 1.0], [0.0, 1.0], [1.0, 10.0]])
    gallery_labels = np.array([0, 0, 1, 1])
    queries = np.array([[8.0, 0.0], [0.2, 1.5], [0.9, 0.6]])  # nearest: (10, 1), (0, 1), (1, 0)
    assert M.knn_accuracy(gallery, gallery_labels, queries, np.array([0, 1, 1])) == pytest.approx(2 / 3)
    # k=3 for (0.9, 0.6): neighbours (1, 0) class 0, (0, 1) class 1, then (10, 1) class 0 -> votes 2:1 for 0
    assert M.knn_accuracy(gallery, gallery_labels, queries[2:], np.array([0]), k=3) == 1.0
    # Leave-one-out on the gallery: each point's nearest other point.
    # (1,0) -> (0,1) [1.41] class 1: wrong; (10,1) -> (1,0) [9.06] class 0: right;
    # (0,1) -> (1,0) [1.41] class 0: wrong; (1,10) -> (0,1) [9.06] class 1: right.
    assert M.knn_accuracy(gallery, gallery_labels, k=1) == 0.5
    # a seeded subset of queries: the mean of those queries' leave-one-out hits
    hits = np.array([0.0, 1.0, 0.0, 1.0])
    subset = np.random.default_rng(5).choice(4, 2, replace=False)
    assert M.knn_accuracy(gallery, gallery_labels, max_queries=2, seed=5) == hits[subset].mean()
    assert M.knn_accuracy(gallery, gallery_labels, max_queries=10) == 0.5
    with pytest.raises(ValueError, match="metric must be"):
        M.knn_accuracy(gallery, gallery_labels, metric="manhattan")
    with pytest.raises(ValueError, match="k must be between 1"):
        M.knn_accuracy(gallery, gallery_labels, k=4)  # leave-one-out leaves 3 neighbours


def test_knn_leave_one_out_drops_only_the_query_itself_among_duplicates():
    gallery = np.array([[0.0], [0.0], [5.0], [5.5]])
    labels = np.array([0, 1, 1, 1])
    # points 0 and 1 coincide: each one's nearest other point is its twin, of the other class (wrong);
    # 5.0 and 5.5 find each other (right)
    assert M.knn_accuracy(gallery, labels) == 0.5


def test_knn_cosine_differs_from_euclidean_where_it_should():
    gallery = np.array([[1.0, 0.0], [0.0, 5.0]])
    labels = np.array([0, 1])
    query = np.array([[0.5, 1.0]])  # closer to (1, 0) by distance (1.12 vs 4.03), closer to (0, 5) by angle
    assert M.knn_accuracy(gallery, labels, query, np.array([0])) == 1.0
    assert M.knn_accuracy(gallery, labels, query, np.array([0]), metric="cosine") == 0.0


def test_feature_metrics_keys_values_and_leave_one_out_on_train():
    emb, labels = two_clusters(n_per_class=10)
    out = M.feature_metrics(emb, labels, emb, labels)
    assert set(out) == {"intra_class_variance", "inter_class_distance", "inter_class_distance_min",
                        "fisher_ratio", "silhouette", "knn_top1", "nmi"}
    assert all(type(v) is float for v in out.values())
    json.dumps(out)
    assert out["intra_class_variance"] == M.intra_class_variance(emb, labels)
    assert out["inter_class_distance"] == out["inter_class_distance_min"] == pytest.approx(100.0, abs=0.2)
    # A point whose only same-class neighbour is far still has to be found by its neighbours, not itself:
    lonely = np.array([[0.0], [10.0], [10.5], [20.0]])
    lonely_labels = np.array([0, 1, 1, 0])
    # leave-one-out: 0 -> 10 (class 1) wrong, 10 -> 10.5 right, 10.5 -> 10 right, 20 -> 10.5 wrong
    assert M.feature_metrics(lonely, lonely_labels, lonely, lonely_labels)["knn_top1"] == 0.5
    # a different split (a copy shifted a little) uses the train split as gallery: each finds its twin
    assert M.feature_metrics(lonely, lonely_labels, lonely + 0.01, lonely_labels)["knn_top1"] == 1.0


def test_feature_metrics_error_names_the_problem():
    with pytest.raises(ValueError, match="at least 2 classes"):
        M.feature_metrics(np.zeros((4, 2)), np.zeros(4, int), np.ones((4, 2)), np.zeros(4, int))
    with pytest.raises(ValueError, match="NaN or inf"):
        M.intra_class_variance(np.array([[np.nan, 0.0]]), np.array([0]))


# -- uncertainty ------------------------------------------------------------------------------------


def test_bootstrap_ci_brackets_the_estimate_and_shrinks_with_n():
    small = np.array([True] * 40 + [False] * 10)
    large = np.tile(small, 40)
    low_s, high_s = M.bootstrap_ci(small, seed=1)
    low_l, high_l = M.bootstrap_ci(large, seed=1)
    assert low_s < 0.8 < high_s and low_l < 0.8 < high_l
    assert (high_l - low_l) < 0.25 * (high_s - low_s)  # width ~ 1/sqrt(N): 40x the data, ~1/6 the width
    # the percentile interval of a binomial proportion: width close to the normal 2 * 1.96 * sqrt(p(1-p)/N)
    assert high_l - low_l == pytest.approx(2 * 1.96 * math.sqrt(0.8 * 0.2 / 2000), rel=0.15)
    assert M.bootstrap_ci(small, seed=1) == (low_s, high_s)  # seeded: reproducible


def test_bootstrap_ci_coverage_is_near_nominal():
    rng = np.random.default_rng(123)
    true_accuracy, n_samples, n_datasets = 0.7, 300, 200
    covered = 0
    for i in range(n_datasets):
        correct = rng.random(n_samples) < true_accuracy
        low, high = M.bootstrap_ci(correct, n_boot=1000, seed=i)
        covered += low <= true_accuracy <= high
    # 95% nominal; with 200 datasets the standard error of the rate is ~1.5 points
    assert 0.90 <= covered / n_datasets <= 0.99


def test_bootstrap_ci_rejects_non_binary_input():
    with pytest.raises(ValueError, match="booleans or 0/1"):
        M.bootstrap_ci(np.array([0.2, 0.9]))


def test_mean_ci_by_hand():
    values = [0.70, 0.74, 0.78]  # mean 0.74, sample sd 0.04, sem 0.04 / sqrt(3)
    mean, low, high = M.mean_ci(values)
    half = stats.t.ppf(0.975, df=2) * 0.04 / math.sqrt(3)
    assert (mean, low, high) == pytest.approx((0.74, 0.74 - half, 0.74 + half))
    single = M.mean_ci([0.5])
    assert single[0] == 0.5 and math.isnan(single[1]) and math.isnan(single[2])


def test_paired_comparison_by_hand():
    a = [0.80, 0.83, 0.81, 0.84]
    b = [0.78, 0.80, 0.80, 0.80]
    diff = np.array([0.02, 0.03, 0.01, 0.04])  # mean 0.025, sd sqrt(0.0005/3)
    sem = diff.std(ddof=1) / 2
    t_stat = 0.025 / sem
    out = M.paired_comparison(a, b)
    assert out["n"] == 4
    assert out["mean_diff"] == pytest.approx(0.025)
    assert out["t"] == pytest.approx(t_stat)
    assert out["p_value"] == pytest.approx(2 * stats.t.sf(t_stat, df=3))
    half = stats.t.ppf(0.975, df=3) * sem
    assert (out["ci_low"], out["ci_high"]) == pytest.approx((0.025 - half, 0.025 + half))
    json.dumps(out)


def test_paired_comparison_two_seeds_and_degenerate_cases():
    out = M.paired_comparison([0.80, 0.90], [0.70, 0.70])  # differences 0.1 and 0.2; 1 degree of freedom
    half = stats.t.ppf(0.975, df=1) * np.std([0.1, 0.2], ddof=1) / math.sqrt(2)
    assert (out["ci_low"], out["ci_high"]) == pytest.approx((0.15 - half, 0.15 + half))
    same = M.paired_comparison([0.8, 0.9], [0.7, 0.8])  # identical differences: no spread
    assert same["ci_low"] == same["ci_high"] == pytest.approx(0.1) and math.isnan(same["p_value"])
    with pytest.raises(ValueError, match="at least 2 pairs"):
        M.paired_comparison([0.8], [0.7])
    with pytest.raises(ValueError, match="paired by position"):
        M.paired_comparison([0.8, 0.9], [0.7])


def test_classification_metrics_is_json_ready():
    logits = np.array([[3.0, 1.0, 0.0], [0.0, 1.0, 3.0], [1.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
    labels = np.array([0, 2, 0, 1])  # hits: yes, yes, no, no
    out = M.classification_metrics(logits, labels)
    assert out["top1"] == 0.5 and out["top5"] == 1.0 and out["n"] == 4
    assert isinstance(out["top1_ci"], list) and out["top1_ci"][0] <= 0.5 <= out["top1_ci"][1]
    assert json.loads(json.dumps(out)) == out
