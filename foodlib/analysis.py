"""After training: features, feature-space metrics and figures for one run folder.

``fit()`` calls :func:`analyse_run`; it also works on any finished run (``foodlib analyse RUN``).
It writes ``features.npz``, adds per-split feature metrics to ``metrics.json`` (intra-class
variance, inter-class distance, Fisher ratio, silhouette, kNN top-1, NMI; for test also
``top1_ci``), and draws ``figures/`` (training curves, UMAP, confusion, per-class accuracy, and
the raw 2-D plot when D=2).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from foodlib import metrics as M
from foodlib.config import Config
from foodlib.features import extract_features, load_features, save_features
from foodlib import plots as P
from foodlib.files import atomic_write_json
from foodlib.openset import make_openset_figures


def analyse_run(run_dir, model, loss, data, cfg, metrics: dict[str, Any], device="cpu", figures: bool = True,
                trace: list[dict] | None = None, progress: bool = False) -> dict[str, Any]:
    """Extract features of every split from ``model`` / ``loss`` and add metrics and figures."""
    import torch

    from foodlib.runtime import autocast_dtype, loader_workers  # lazy: torch (reanalyse from features.npz needs none)

    run_dir, device = Path(run_dir), torch.device(device)
    amp_dtype = autocast_dtype(cfg.train.amp, device)
    features = {}
    for split in data.index.splits:
        if not len(data.index.splits[split]) or (split == "test" and not cfg.train.eval_test):
            continue  # eval_test=False (tuning on val): the test images are not looked at, not even here
        loader = data.loader(split, max(cfg.train.batch_size, 128), shuffle=False,
                             workers=loader_workers(cfg, device))
        features[split] = extract_features(model, loss, loader, cfg.data.image_size, device, amp_dtype,
                                           cfg.train.channels_last, progress, desc=f"features {split}")
    save_features(run_dir / "features.npz", features, data.classes, float16=len(data.labels("train")) > 50_000)
    metrics = add_feature_metrics(metrics, features)
    if figures:
        make_run_figures(run_dir, features, data.classes, trace)
    return metrics


def add_feature_metrics(metrics: dict[str, Any], features: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    """Per split: the feature metrics (train as the kNN gallery) and a bootstrap CI of top-1."""
    train = features["train"]
    for split, feats in features.items():
        entry = metrics.setdefault(split, {})
        entry.update(M.feature_metrics(train["embeddings"], train["labels"], feats["embeddings"], feats["labels"]))
        if split == "test":
            cls = M.classification_metrics(feats["logits"], feats["labels"])
            entry["top1_ci"] = cls["top1_ci"]
    return metrics


def make_run_figures(run_dir, features, classes, trace=None, max_umap_points: int = 20_000,
                     label: str | None = None) -> list[Path]:
    """Training curves, UMAP of the evaluation split, confusion heatmap, per-class accuracy (, 2-D plot).

    ``label`` names the run in the titles (default: the loss in the run's config.yaml, e.g. "center loss").
    """
    run_dir = Path(run_dir)
    fig_dir = run_dir / "figures"
    split = "test" if "test" in features else ("val" if "val" in features else "train")
    feats = features[split]
    written = []

    def save(fig, name):
        written.append(P.save_figure(fig, fig_dir / name))

    label = label if label is not None else _run_label(run_dir)
    who = f"{label}: " if label else ""

    if trace:
        save(P.training_curves(trace, title=label or None, n_classes=len(classes)), "training_curves.png")
    emb, labels = feats["embeddings"], feats["labels"]
    if len(labels) > max_umap_points:
        keep = np.random.default_rng(0).choice(len(labels), max_umap_points, replace=False)
        emb, labels = emb[keep], labels[keep]
    if emb.shape[1] == 2:
        save(P.features_2d(emb, labels, class_names=classes, title=f"{who}{split} embeddings"), "features_2d.png")
    coords = P.umap_embed(emb, cache_path=run_dir / f"umap_{split}.npz") if emb.shape[1] > 2 else emb
    save(P.umap_scatter(coords, labels, class_names=classes, title=f"{who}UMAP of {split} embeddings"), "umap.png")
    pred = feats["logits"].argmax(1)
    confusion = M.confusion_matrix(feats["labels"], pred, len(classes))
    save(P.confusion_heatmap(confusion, classes, title=f"{who}{split} confusion matrix"), "confusion.png")
    save(P.per_class_accuracy_bars(M.per_class_accuracy(pred, feats["labels"], len(classes)), classes,
                                   title=f"{who}{split} accuracy per class"), "per_class_accuracy.png")
    return written


def reanalyse(run_dir, figures: bool = True) -> dict[str, Any]:
    """Recompute feature metrics and figures from a run's saved ``features.npz`` (no model needed)."""
    import csv
    import json

    run_dir = Path(run_dir)
    features = load_features(run_dir / "features.npz")
    classes = features.pop("classes")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics = add_feature_metrics(metrics, features)
    trace = None
    if (run_dir / "trace.csv").is_file():
        with open(run_dir / "trace.csv") as f:
            trace = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]
    if figures:
        make_run_figures(run_dir, features, classes, trace)
        if (run_dir / "novel_features.npz").is_file():  # held-out dishes: their UMAP and retrieval grid too

            make_openset_figures(run_dir, Config.from_yaml(run_dir / "config.yaml").data.image_size)

    atomic_write_json(run_dir / "metrics.json", metrics)
    return metrics


def _run_label(run_dir: Path) -> str:
    """"center loss" from the run's config.yaml; "" when there is none."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return ""
    loss = ((yaml.safe_load(path.read_text()) or {}).get("loss") or {}).get("loss")
    return f"{loss} loss" if loss else ""


def _number(text: str):
    try:
        return float(text)
    except (TypeError, ValueError):
        return text
