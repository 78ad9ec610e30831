"""Compare the runs of a suite: one table over seeds, paired tests against the baseline, figures, report.md.

A suite folder ``runs/<suite>/`` holds one run folder per run (``metrics.json``, ``config.yaml``,
``features.npz``) and ``suite.json`` from the suite runner (which run is which loss, variant and
seed). Numbers come from the test split of each run; the table gives the mean and the Student-t
95% interval over seeds (:func:`foodlib.metrics.mean_ci`), the paired table the difference to the
baseline seed by seed (:func:`foodlib.metrics.paired_comparison`).

>>> rows = collect_runs("runs/demo")                                  # doctest: +SKIP
>>> print(markdown_table(summary_table(rows)))                        # doctest: +SKIP
>>> write_report("runs/demo", copy_to="readme_pictures")              # doctest: +SKIP
PosixPath('runs/demo/report.md')

The second half holds the dataset-overview helpers of ``notebooks/data_overview.ipynb``:
:func:`sample_grid`, :func:`image_sizes` and :func:`image_size_histogram`.
"""
from __future__ import annotations

import json
import math
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from foodlib import metrics as M
from foodlib import plots as P
from foodlib.runfolder import is_retired
from foodlib.features import load_features
from foodlib.files import atomic_write_text
from foodlib.openset import novel_umap

#: test-split metrics of the summary table, in column order, with their labels.
TABLE_METRICS = {"top1": "top-1", "top5": "top-5", "fisher_ratio": "Fisher ratio", "silhouette": "silhouette",
                 "knn_top1": "kNN top-1"}
#: open-set columns (runs with novel_classes): the held-out pool's numbers (``novel_*``) and the same
#: retrieval numbers on the known classes' test split, with their labels.
OPENSET_METRICS = {"novel_precision_at_1": "novel P@1", "novel_r_precision": "novel R-Prec", "novel_map_at_r":
                   "novel MAP@R", "novel_recall_at_4": "novel R@4", "novel_shot1_mean": "novel 1-shot",
                   "novel_shot5_mean": "novel 5-shot", "novel_roc_auc": "novel ROC AUC",
                   "novel_tar_at_far_0.01": "novel TAR@1e-2", "precision_at_1": "known P@1", "map_at_r": "known MAP@R"}
OPENSET_PAIRED = ("novel_map_at_r", "novel_shot5_mean")  # paired against the baseline, as top-1 is
LOSS_ORDER = ("softmax", "center", "lgm", "island", "contrastive_center", "cosface", "arcface")  # report order when no suite.json says otherwise; pml:<LossName> runs follow
#: Config fields shown in the report's setup line when all runs share them.
SETUP_FIELDS = ("data", "dishes_classes", "dishes_per_class", "backbone", "embedding_dim", "pretrained", "image_size",
                "epochs", "batch_size", "optimizer", "lr", "augment")
LOOKALIKE_MAX_CLASSES = 8  # classes shown in the look-alike confusion panels
_RUN_NAME = re.compile(r"^(?P<variant>.+)-s(?P<seed>\d+)$")


# ----- collecting ---------------------------------------------------------------------------------

def collect_runs(suite_dir: str | Path, split: str = "test") -> list[dict[str, Any]]:
    """One row per finished run (a sub-folder with ``metrics.json``), in suite order.

    Each row: ``run``, ``variant`` (the run without its seed: what is averaged over seeds),
    ``loss``, ``seed``, ``run_dir``, the ``split`` metrics (``top1``, ``top5``, ``fisher_ratio``,
    ``silhouette``, ``knn_top1``, ``nmi``, ... when present; the objective's value as
    ``test_loss``), ``top1_boot_low`` / ``top1_boot_high`` (the run's bootstrap interval of
    top-1), ``val_top1``, ``best_epoch`` and ``train_seconds``. Loss and seed come from
    ``suite.json``, else from the run's ``config.yaml``, else from the folder name ``<variant>-s<seed>``.

    Raises:
        FileNotFoundError: ``suite_dir`` does not exist.

    >>> [r["variant"] for r in collect_runs("runs/demo")][:2]          # doctest: +SKIP
    ['softmax', 'center']
    """
    suite_dir = Path(suite_dir)
    if not suite_dir.is_dir():
        raise FileNotFoundError(f"suite folder {suite_dir} does not exist; run `foodlib suite suites/NAME.yaml` first")
    planned = {r["name"]: r for r in _suite_record(suite_dir).get("runs", [])}
    rows = []
    for metrics_path in sorted(suite_dir.glob("*/metrics.json")):
        run_dir = metrics_path.parent
        if is_retired(run_dir.name):  # an outdated run a suite moved aside (RUN.old-<time>)
            continue
        metrics = json.loads(metrics_path.read_text())
        entry = planned.get(run_dir.name) or _identify_run(run_dir)
        row = {"run": run_dir.name, "variant": entry["variant"], "loss": entry["loss"], "seed": int(entry["seed"]),
               "run_dir": run_dir}
        for key, value in metrics.get(split, {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                row[f"{split}_{key}" if key in row else key] = value  # the objective "loss" -> "test_loss"
        boot = metrics.get(split, {}).get("top1_ci")
        if isinstance(boot, list) and len(boot) == 2:  # bootstrap interval over this run's test images
            row["top1_boot_low"], row["top1_boot_high"] = boot
        for key, value in metrics.get("novel", {}).items():  # open-set pool (novel_classes), when the run has one
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                row[f"novel_{key}"] = value
        row["val_top1"] = metrics.get("val", {}).get("top1")
        row["best_epoch"] = metrics.get("best_epoch")
        row["train_seconds"] = metrics.get("train_seconds")
        rows.append(row)
    order = {name: i for i, name in enumerate(planned)}
    return sorted(rows, key=lambda r: (order.get(r["run"], len(order)), _loss_rank(r["loss"]), r["variant"], r["seed"]))


def _suite_record(suite_dir: Path) -> dict[str, Any]:
    path = suite_dir / "suite.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        return {}


def _identify_run(run_dir: Path) -> dict[str, Any]:
    """Variant, loss and seed of a run folder that suite.json does not list."""
    match = _RUN_NAME.match(run_dir.name)
    variant = match["variant"] if match else run_dir.name
    seed = int(match["seed"]) if match else 0
    loss = variant.split("-")[0]
    config_path = run_dir / "config.yaml"
    if config_path.is_file():  # plain YAML read: no validation, no torch import
        config = yaml.safe_load(config_path.read_text()) or {}
        loss = config.get("loss", {}).get("loss", loss)
        seed = int(config.get("train", {}).get("seed", seed))
        if not match:
            variant = loss
    return {"variant": variant, "loss": loss, "seed": seed}


def _loss_rank(loss: str) -> int:
    return LOSS_ORDER.index(loss) if loss in LOSS_ORDER else len(LOSS_ORDER)


def _variants(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["variant"] for r in rows))


# ----- tables -------------------------------------------------------------------------------------

def summary_table(rows: list[dict[str, Any]], metrics: Sequence[str] = tuple(TABLE_METRICS),
                  level: float = 0.95) -> list[dict[str, Any]]:
    """Mean and t interval over seeds of each metric, one entry per variant.

    Each entry: ``variant``, ``loss``, ``n`` (runs), ``seeds``, and for each metric ``m``:
    ``m`` (mean), ``m_low``, ``m_high`` (NaN with one seed). A metric missing from some runs is
    averaged over the runs that have it.

    >>> rows = [{"variant": "softmax", "loss": "softmax", "seed": s, "top1": v} for s, v in [(0, 0.7), (1, 0.8)]]
    >>> entry = summary_table(rows, metrics=["top1"])[0]
    >>> entry["n"], round(entry["top1"], 3), round(entry["top1_high"] - entry["top1"], 3)
    (2, 0.75, 0.635)
    """
    table = []
    for variant in _variants(rows):
        members = [r for r in rows if r["variant"] == variant]
        entry: dict[str, Any] = {"variant": variant, "loss": members[0]["loss"], "n": len(members),
                                 "seeds": sorted(r["seed"] for r in members)}
        for metric in metrics:
            values = [r[metric] for r in members if _finite(r.get(metric))]
            mean, low, high = M.mean_ci(values, level) if values else (math.nan, math.nan, math.nan)
            entry.update({metric: mean, f"{metric}_low": low, f"{metric}_high": high})
        table.append(entry)
    return table


def paired_vs_baseline(rows: list[dict[str, Any]], baseline: str = "softmax", metric: str = "top1",
                       level: float = 0.95) -> list[dict[str, Any]]:
    """Each variant against the baseline, paired by seed (:func:`foodlib.metrics.paired_comparison`).

    ``baseline`` is a loss or a variant name. With a grid, ``center-lr0.001`` is paired with
    ``softmax-lr0.001`` (same override set). Entries: ``variant``, ``baseline``, ``metric``,
    ``seeds`` (shared seeds) and ``n``, ``mean_a`` (variant), ``mean_b`` (baseline),
    ``mean_diff`` (variant - baseline), ``ci_low``, ``ci_high``, ``p_value``; the interval and
    p-value are NaN with fewer than 2 shared seeds.

    >>> rows = [{"variant": v, "loss": v, "seed": s, "top1": t}
    ...         for v, s, t in [("softmax", 0, .70), ("softmax", 1, .72), ("center", 0, .74), ("center", 1, .75)]]
    >>> round(paired_vs_baseline(rows)[0]["mean_diff"], 3)
    0.035
    """
    variants = _variants(rows)
    out = []
    for variant in variants:
        reference = _baseline_variant(variant, rows, baseline, variants)
        if reference is None or reference == variant:
            continue
        mine = {r["seed"]: r[metric] for r in rows if r["variant"] == variant and _finite(r.get(metric))}
        theirs = {r["seed"]: r[metric] for r in rows if r["variant"] == reference and _finite(r.get(metric))}
        seeds = sorted(set(mine) & set(theirs))
        entry: dict[str, Any] = {"variant": variant, "baseline": reference, "metric": metric, "seeds": seeds}
        a, b = [mine[s] for s in seeds], [theirs[s] for s in seeds]
        if len(seeds) >= 2:
            entry.update(M.paired_comparison(a, b, level))
        else:  # one pair: a difference, but no spread to test it against
            diff = a[0] - b[0] if seeds else math.nan
            entry.update(n=len(seeds), mean_a=a[0] if seeds else math.nan, mean_b=b[0] if seeds else math.nan,
                         mean_diff=diff, ci_low=math.nan, ci_high=math.nan, t=math.nan, p_value=math.nan)
        out.append(entry)
    return out


def _baseline_variant(variant: str, rows: list[dict[str, Any]], baseline: str, variants: list[str]) -> str | None:
    if baseline in variants and baseline not in {r["loss"] for r in rows}:
        return baseline  # an explicit variant name, e.g. "softmax-lr0.001"
    loss = next(r["loss"] for r in rows if r["variant"] == variant)
    candidate = baseline + variant[len(loss):]  # the same grid label: "-lr0.001" or ""
    if candidate in variants:
        return candidate
    return baseline if baseline in variants else None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def markdown_table(table: list[dict[str, Any]], metrics: Sequence[str] = tuple(TABLE_METRICS), digits: int = 3) -> str:
    """The :func:`summary_table` as GitHub markdown: ``mean [low, high]`` per cell.

    >>> print(markdown_table([{"variant": "softmax", "n": 1, "top1": 0.7, "top1_low": float("nan"),
    ...                        "top1_high": float("nan")}], metrics=["top1"]))
    | variant | seeds | top-1 |
    |---|---:|---:|
    | softmax | 1 | 0.700 |
    """
    header = ["variant", "seeds"] + [{**TABLE_METRICS, **OPENSET_METRICS}.get(m, m) for m in metrics]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for entry in table:
        cells = [entry["variant"], str(entry["n"])]
        cells += [_mean_ci_text(entry[m], entry[f"{m}_low"], entry[f"{m}_high"], digits) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_paired(paired: list[dict[str, Any]], digits: int = 3) -> str:
    """The :func:`paired_vs_baseline` entries as GitHub markdown."""
    lines = ["| variant | vs | seeds | mean | baseline | difference [95% CI] | p |", "|---|---|---:|---:|---:|---:|---:|"]
    for e in paired:
        diff = _mean_ci_text(e["mean_diff"], e["ci_low"], e["ci_high"], digits, signed=True)
        p = f"{e['p_value']:.3f}" if _finite(e["p_value"]) else "-"
        lines.append(f"| {e['variant']} | {e['baseline']} | {e['n']} | {_num(e['mean_a'], digits)} | "
                     f"{_num(e['mean_b'], digits)} | {diff} | {p} |")
    return "\n".join(lines)


def _num(value: Any, digits: int, signed: bool = False) -> str:
    if not _finite(value):
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _mean_ci_text(mean, low, high, digits: int, signed: bool = False) -> str:
    text = _num(mean, digits, signed)
    if _finite(low) and _finite(high):
        text += f" [{_num(low, digits, signed)}, {_num(high, digits, signed)}]"
    return text


# ----- figures ------------------------------------------------------------------------------------

def accuracy_figure(table: list[dict[str, Any]], rows: list[dict[str, Any]] | None = None,
                    metric: str = "top1", split: str = "test") -> Figure:
    """One metric per variant: mean and t 95% CI over seeds.

    With a single seed per variant there is no spread over seeds; for top-1 the interval is then
    each run's bootstrap 95% CI over its test images (``top1_ci`` in metrics.json, kept by
    :func:`collect_runs` as ``top1_boot_low`` / ``top1_boot_high``) and the title says so.
    """
    label = TABLE_METRICS.get(metric, metric)
    names, means = [e["variant"] for e in table], [e[metric] for e in table]
    lows, highs = [e[f"{metric}_low"] for e in table], [e[f"{metric}_high"] for e in table]
    seed_counts = sorted({e["n"] for e in table})
    by_variant = {r["variant"]: r for r in rows or []}
    if seed_counts == [1] and metric == "top1" and all(_finite(by_variant.get(v, {}).get("top1_boot_low"))
                                                       for v in names):
        lows = [by_variant[v]["top1_boot_low"] for v in names]
        highs = [by_variant[v]["top1_boot_high"] for v in names]
        title = f"{split} {label}, one seed: bootstrap 95% CI over {split} images"
    elif seed_counts == [1]:
        title = f"{split} {label}, one seed (no interval)"
    else:
        over = f"{seed_counts[0]} seeds" if len(seed_counts) == 1 else "seeds"
        title = f"{split} {label}: mean and 95% CI over {over}"
    return P.accuracy_with_ci(names, means, lows, highs, title=title, ylabel=f"{split} {label}")


def umap_grid_figure(rows: list[dict[str, Any]], split: str = "test") -> Figure | None:
    """UMAP of the ``split`` embeddings, one panel per variant (its lowest seed with features.npz).

    Coordinates are cached in each run's ``umap_<split>.npz`` (the same cache the run's own UMAP
    figure uses, so a figure drawn after training costs nothing here). None when no run has features.
    """
    panels, classes = [], None
    for variant in _variants(rows):
        members = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["seed"])
        run = next((r for r in members if (r["run_dir"] / "features.npz").is_file()), None)
        if run is None:
            continue
        features = load_features(run["run_dir"] / "features.npz")
        if split not in features:
            continue
        classes = features["classes"]
        emb, labels = features[split]["embeddings"], features[split]["labels"]
        coords = emb if emb.shape[1] == 2 else P.umap_embed(emb, cache_path=run["run_dir"] / f"umap_{split}.npz")
        top1 = f", top-1 {run['top1']:.3f}" if _finite(run.get("top1")) else ""
        panels.append((f"{variant} (seed {run['seed']}{top1})", coords, labels))
    if not panels:
        return None
    return P.umap_grid(panels, class_names=classes)


def lookalike_confusion_figure(rows: list[dict[str, Any]], split: str = "test",
                               max_classes: int = LOOKALIKE_MAX_CLASSES) -> Figure | None:
    """Confusion among the most look-alike classes, one panel per variant (counts summed over seeds).

    The look-alike classes are those of the most confused pairs in the confusion summed over
    every run, so they are a property of the data rather than of one model. None without features
    or without any confusion.
    """
    confusions: dict[str, np.ndarray] = {}
    classes: list[str] | None = None
    for row in rows:
        path = row["run_dir"] / "features.npz"
        if not path.is_file():
            continue
        features = load_features(path)
        if split not in features:
            continue
        classes = features["classes"]
        feats = features[split]
        confusion = M.confusion_matrix(feats["labels"], feats["logits"].argmax(1), len(classes))  # (C, C)
        confusions[row["variant"]] = confusions.get(row["variant"], 0) + confusion
    if not confusions:
        return None
    total = sum(confusions.values())
    pairs = M.most_confused_pairs(total, k=len(classes) ** 2)
    chosen: list[int] = []
    for a, b, _ in pairs:
        for c in (a, b):
            if c not in chosen and len(chosen) < max_classes:
                chosen.append(c)
    if len(chosen) < 2:
        return None
    chosen = sorted(chosen)
    names = [classes[c] for c in chosen]
    # Two panels a row: readable at the README's width (~900 px) rather than one long strip.
    n_cols = min(2, len(confusions))
    n_rows = -(-len(confusions) // n_cols)
    side = float(np.clip(0.45 * len(chosen) + 2.0, 3.5, 5.5))
    fig = Figure(figsize=(side * n_cols + 1.2, side * n_rows + 1.0), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    n_boxed = min(3, len(pairs))
    for ax, (variant, confusion) in zip(axes, confusions.items()):
        P.confusion_heatmap(confusion[np.ix_(chosen, chosen)], names, highlight=n_boxed, ax=ax, title=variant,
                            vmax=1.0, colorbar=False, explain_boxes=False)  # one scale for all panels
    for ax in axes[len(confusions):]:
        ax.set_visible(False)
    fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), cmap="viridis"), ax=list(axes[:len(confusions)]),
                 shrink=0.6, label="fraction of the true class's images (rows sum to 1)")
    fig.suptitle(f"{split} confusion among the {len(chosen)} most look-alike classes; rows: true class, "
                 f"normalised within the shown classes;\n{P.box_note(n_boxed)}, per panel")
    return fig


# ----- report.md ----------------------------------------------------------------------------------

def write_report(suite_dir: str | Path, copy_to: str | Path | None = None, baseline: str | None = None,
                 split: str | None = None) -> Path:
    """Write ``suite_dir/report.md`` and ``suite_dir/figures/*.png``; optionally copy the figures.

    Args:
        suite_dir: the suite folder (``runs/<suite>``).
        copy_to: also copy each figure to ``copy_to/<suite>_<figure>.png`` (e.g. ``readme_pictures``).
        baseline: loss or variant to compare against; default the suite's baseline (suite.json),
            else softmax when present, else the first variant.
        split: which split's metrics and features to report; default ``test``, or ``val`` when no
            run evaluated test (a tuning suite with ``eval_test: false``).

    Returns:
        The path of report.md.

    Raises:
        FileNotFoundError: no finished run (no ``*/metrics.json``) in ``suite_dir``.

    >>> write_report("runs/demo")                                       # doctest: +SKIP
    PosixPath('runs/demo/report.md')
    """
    import matplotlib

    suite_dir = Path(suite_dir)
    if split is None:
        split = "test" if any("top1" in r for r in collect_runs(suite_dir, "test")) else "val"
    rows = collect_runs(suite_dir, split)
    if not rows:
        raise FileNotFoundError(f"no finished run (*/metrics.json) in {suite_dir}; run the suite first")
    record = _suite_record(suite_dir)
    name = record.get("name", suite_dir.name)
    losses = [r["loss"] for r in rows]
    baseline = baseline or record.get("baseline") or ("softmax" if "softmax" in losses else rows[0]["variant"])
    table = summary_table(rows)
    paired = paired_vs_baseline(rows, baseline)

    figures: dict[str, Path] = {}
    fig_dir = suite_dir / "figures"
    with matplotlib.rc_context({"figure.max_open_warning": 0}):
        candidates = {"accuracy_ci": accuracy_figure(table, rows, split=split), "umap_grid": umap_grid_figure(rows, split),
                      "lookalike_confusion": lookalike_confusion_figure(rows, split)}
    for key, fig in candidates.items():
        if fig is not None:
            figures[key] = P.save_figure(fig, fig_dir / f"{key}.png")

    lines = [f"# Suite `{name}`: {', '.join(_variants(rows))}", ""]
    lines.append(f"{len(rows)} finished run(s), {len(table)} variant(s); {split} split. " + _setup_line(rows))
    missing = [r for r in record.get("runs", []) if r["name"] not in {row["run"] for row in rows}]
    if missing:
        lines.append("")
        lines.append("Not included (no metrics.json): " + ", ".join(
            f"{r['name']} ({r.get('status') or 'not run'})" for r in missing) + ".")
    lines += ["", f"## {split.capitalize()} metrics: mean [95% CI] over seeds", "", markdown_table(table), ""]
    lines.append("Intervals are Student-t over seeds (none with one seed). Fisher ratio = trace(S_B) / trace(S_W); "
                 f"kNN top-1 classifies each {split} embedding by its nearest training embedding.")
    if paired:
        lines += ["", f"## Against {baseline}: {split} top-1, paired by seed", "", markdown_paired(paired), ""]
        lines.append("Difference = variant - baseline on the same seeds, with a paired t interval and p-value "
                     "(needs at least 2 seeds).")
    lines += openset_section(rows, baseline, suite_dir)
    lines += ["", "## Figures", ""]
    one_seed = all(e["n"] == 1 for e in table)
    captions = {"accuracy_ci": f"{split.capitalize()} top-1 with the bootstrap 95% CI over {split} images (one seed)"
                if one_seed else f"{split.capitalize()} top-1, mean and 95% CI over seeds",
                "umap_grid": f"UMAP of {split} embeddings, one seed per variant (same {split} images)",
                "lookalike_confusion": "Confusion among the most look-alike classes"}
    for key, path in figures.items():
        lines += [f"![{captions[key]}]({path.relative_to(suite_dir).as_posix()})", f"*{captions[key]}*", ""]
    lines += ["## Runs", "", f"| run | loss | seed | {split} top-1 | val top-1 | best epoch | train s |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['loss']} | {r['seed']} | {_num(r.get('top1'), 3)} | "
                     f"{_num(r.get('val_top1'), 3)} | {r.get('best_epoch', '-')} | {_num(r.get('train_seconds'), 0)} |")

    report = atomic_write_text(suite_dir / "report.md", "\n".join(lines) + "\n")
    if copy_to is not None:
        copy_dir = Path(copy_to)
        copy_dir.mkdir(parents=True, exist_ok=True)
        for key, path in figures.items():
            shutil.copyfile(path, copy_dir / f"{name}_{key}.png")
    return report


def novel_umap_grid_figure(rows: list[dict[str, Any]]) -> Figure | None:
    """UMAP of the held-out dishes as each variant embeds them (its lowest seed), known test images grey behind.

    Uses each run's ``novel_features.npz`` and ``features.npz`` (and the run's ``umap_novel.npz``
    cache, which the run's own ``figures/novel_umap.png`` filled). None when no run held classes out.
    """
    chosen = []
    for variant in _variants(rows):
        members = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["seed"])
        run = next((r for r in members if (r["run_dir"] / "novel_features.npz").is_file()
                    and (r["run_dir"] / "features.npz").is_file()), None)
        if run is not None:
            chosen.append(run)
    if not chosen:
        return None
    fig, axes = P.panel_grid(len(chosen), 5.2, 4.6)  # wraps: seven losses in one row are unreadable
    for ax, run in zip(axes, chosen):
        novel, known = load_features(run["run_dir"] / "novel_features.npz"), load_features(run["run_dir"] / "features.npz")
        split = "test" if "test" in known else "val"
        score = f", MAP@R {run['novel_map_at_r']:.3f}" if _finite(run.get("novel_map_at_r")) else ""
        novel_umap(known[split]["embeddings"], novel["novel"]["embeddings"], novel["novel"]["labels"],
                   novel["classes"], ax=ax, cache_path=run["run_dir"] / "umap_novel.npz",
                   title=f"{run['variant']} (seed {run['seed']}{score})")
        ax.get_legend().remove()  # one legend for the figure: the dishes are the same in every panel
    handles, labels = axes[-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 6), fontsize=9, markerscale=2,
               frameon=False)
    fig.suptitle("held-out dishes (colours), never trained on, over the known classes' test images (grey)", fontsize=10)
    return fig


def openset_section(rows: list[dict[str, Any]], baseline: str, suite_dir: str | Path | None = None) -> list[str]:
    """Report lines for runs with held-out classes: open-set table, and MAP@R / 5-shot paired with the baseline.

    Empty when no run held classes out (``novel_classes``). With ``suite_dir``, also draws
    ``figures/novel_umap_grid.png`` (:func:`novel_umap_grid_figure`) and links it.
    """
    if not any("novel_map_at_r" in r for r in rows):
        return []
    metrics = [m for m in OPENSET_METRICS if any(m in r for r in rows)]
    lines = ["", "## Open set: held-out dishes, mean [95% CI] over seeds", "",
             markdown_table(summary_table(rows, metrics), metrics), "",
             "novel: all images of the classes held out of training and val (novel_classes), each retrieving the "
             "others (Musgrave et al. 2020: P@1, R-Precision, MAP@R; R@4: a same-dish image among the 4 nearest); "
             "k-shot: nearest-class-mean accuracy over random episodes; ROC AUC and TAR at FAR 1e-2 over same / "
             "different-dish pairs. known: the same retrieval on the trained classes' test split. "
             "Distances in each loss's geometry (Euclidean)."]
    for metric in OPENSET_PAIRED:
        paired = paired_vs_baseline(rows, baseline, metric=metric)
        if paired:
            lines += ["", f"### Against {baseline}: {OPENSET_METRICS[metric]}, paired by seed", "",
                      markdown_paired(paired)]
    figure = novel_umap_grid_figure(rows) if suite_dir is not None else None
    if figure is not None:
        path = P.save_figure(figure, Path(suite_dir) / "figures" / "novel_umap_grid.png")
        caption = "UMAP of the held-out dishes as each loss embeds them (known classes grey)"
        lines += ["", f"![{caption}]({path.relative_to(Path(suite_dir)).as_posix()})", f"*{caption}*"]
    return lines


def _setup_line(rows: list[dict[str, Any]]) -> str:
    """The settings every run shares, from the runs' config.yaml (e.g. data, backbone, epochs)."""
    shared: dict[str, Any] | None = None
    for r in rows:
        path = r["run_dir"] / "config.yaml"
        if not path.is_file():
            return ""
        flat = {k: v for section in (yaml.safe_load(path.read_text()) or {}).values() for k, v in section.items()}
        shown = {k: flat.get(k) for k in SETUP_FIELDS}
        shared = shown if shared is None else {k: v for k, v in shared.items() if k in shown and shown[k] == v}
    if not shared:
        return ""
    if shared.get("data") != "dishes":
        shared = {k: v for k, v in shared.items() if not k.startswith("dishes_")}
    return "Shared settings: " + ", ".join(f"{k}={v}" for k, v in shared.items() if v is not None) + "."


# ----- dataset overview ---------------------------------------------------------------------------

def sample_grid(paths: Sequence[str], labels, class_names: Sequence[str], per_class: int = 6, side: int = 96,
                max_classes: int | None = None, seed: int = 0) -> Figure:
    """Example images: one row per class, ``per_class`` random images each (fewer if the class has fewer).

    Images go through :func:`foodlib.data.images.load_image_array` (short side to ``side``,
    center crop): what the cache stores, so what the network sees before augmentation.

    Args:
        paths: image files ``(N,)``.
        labels: class index of each file ``(N,)``.
        class_names: names of all C classes (row titles).
        per_class: images per row.
        side: pixels of each thumbnail.
        max_classes: show only the first this many classes (None: all).
        seed: which images are drawn.

    >>> fig = sample_grid(index.splits["train"].paths, index.splits["train"].labels, index.classes)  # doctest: +SKIP
    """
    from foodlib.data.images import load_image_array  # lazy: foodlib.data imports torch; reports need none

    labels = np.asarray(labels)
    if len(paths) != len(labels):
        raise ValueError(f"paths has {len(paths)} entries but labels has {len(labels)}; pass one label per file")
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1; got {per_class}")
    shown = list(range(len(class_names)))[:max_classes]
    rng = np.random.default_rng(seed)
    fig = Figure(figsize=(1.2 * per_class + 1.6, 1.2 * len(shown) + 0.3), layout="constrained")
    axes = fig.subplots(len(shown), per_class, squeeze=False)  # (rows, per_class)
    for row, c in enumerate(shown):
        members = np.flatnonzero(labels == c)
        picked = np.sort(rng.choice(members, size=min(per_class, len(members)), replace=False)) if len(members) else []
        for col in range(per_class):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if col < len(picked):
                ax.imshow(load_image_array(paths[picked[col]], side))
        axes[row, 0].set_ylabel(f"{class_names[c]}\n({len(members)})", rotation=0, ha="right", va="center",
                                fontsize=8)
    return fig


def image_sizes(paths: Sequence[str], workers: int = 8) -> np.ndarray:
    """Stored (width, height) of each image, ``(N, 2)`` int; ``(-1, -1)`` for a file Pillow cannot open.

    Reads headers only (Pillow opens lazily), so thousands of files take a second or two.
    EXIF rotation is not applied: these are the sizes as stored.
    """
    from PIL import Image, UnidentifiedImageError

    def size_of(path):  # nested helper for the thread pool: one header read
        try:
            with Image.open(path) as img:
                return img.size
        except (OSError, UnidentifiedImageError, ValueError):
            return (-1, -1)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        sizes = list(pool.map(size_of, paths))
    return np.asarray(sizes, dtype=np.int64).reshape(-1, 2)


def image_size_histogram(sizes, bins: int = 30, ax=None, title: str | None = "stored image sizes") -> Figure:
    """Histograms of the short and the long side of each image (unreadable files, ``-1``, left out).

    >>> fig = image_size_histogram(np.array([[320, 240], [300, 300]]))
    >>> [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    ['short side (min 240, median 270, max 300)', 'long side (min 300, median 310, max 320)']
    """
    sizes = np.asarray(sizes)
    if sizes.ndim != 2 or sizes.shape[1] != 2:
        raise ValueError(f"sizes must have shape (N, 2) (width, height); got {sizes.shape}")
    readable = sizes[(sizes > 0).all(axis=1)]
    if not len(readable):
        raise ValueError("no readable image sizes to plot (all are -1)")
    short, long = readable.min(axis=1), readable.max(axis=1)  # (N,), (N,)
    if ax is None:
        fig = Figure(figsize=(6.5, 3.5), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    edges = np.histogram_bin_edges(np.concatenate([short, long]), bins=bins)
    for values, label in ((short, "short side"), (long, "long side")):
        ax.hist(values, bins=edges, alpha=0.6,
                label=f"{label} (min {values.min()}, median {np.median(values):g}, max {values.max()})")
    ax.set_xlabel("pixels")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return fig
