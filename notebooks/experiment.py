# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     notebook_metadata_filter: kernelspec,jupytext
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Experiment: one loss, one seed, one run folder
#
# Trains the network with one loss (softmax, center, lgm, island, contrastive_center, cosface, arcface
# or a `pml:` loss) on one dataset and
# writes the run folder `out/`: `metrics.json`, `features.npz`, `trace.csv`, checkpoints and
# `figures/` (training curves, UMAP of the test embeddings, confusion, per-class accuracy).
# `foodlib suite` runs this notebook once per loss and seed; `compare.ipynb` then turns the run
# folders into the README's comparison figures (accuracy with CI, the UMAP grid across losses,
# the look-alike confusion).
#
# The defaults are a smoke test (4 generated dishes, 30 images each, a small CNN at 32 px,
# 2 epochs: seconds on a CPU). Every parameter is a `foodlib.Config` field of the same name;
# any other Config field can be injected too (`papermill ... -p weight_decay 1e-4`).

# %% tags=["parameters"]
from typing import Optional, Union  # papermill reads Optional[int], not int | None

data: str = "dishes"  # ImageFolder root | food101:ROOT | dishes | digits (embedded, offline)
dishes_classes: int = 4  # embedded dishes: number of classes
dishes_per_class: int = 30  # embedded dishes: train images per class (test gets a third)
limit_per_class: Optional[int] = None  # at most this many train images per class (None: all)
image_size: int = 32  # side of the crop the network sees, px (ResNets: 64-224)
backbone: str = "smallcnn"  # resnet18 | resnet34 | resnet50 | smallcnn | efficientnet_lite0/1/2 | timm/<name>
embedding_dim: Optional[int] = None  # D; None: the backbone's width; 2 for the papers' 2-D plots
pretrained: Union[bool, str] = False  # False | True (installed / downloaded ImageNet weights) | a weights file
trainable: str = "all"  # all | head (frozen trunk, cached features) | last:N (the trunk's last N stages too)
loss: str = "softmax"  # softmax | center | lgm | island | contrastive_center | cosface | arcface | pml:<Name>
lam: Optional[float] = None  # weight of the center / likelihood term (None: the loss's default)
alpha: Optional[float] = None  # center update rate (center, island) or L-GM margin (None: default)
lam_island: Optional[float] = None  # island loss: weight of the center-separation term
optimizer: str = "adamw"  # sgd | adamw | adagrad
lr: float = 2e-3  # peak learning rate of the network
epochs: int = 2  # passes over the training split
batch_size: int = 16  # images per optimizer step
seed: int = 0  # weights, shuffling and augmentation; same seed, same run
device: str = "auto"  # auto (cuda when present) | cpu | cuda | cuda:N
workers: int = 0  # loader processes (0: batches are gathered in this process; fine for small sets)
out: str = "runs/experiment"  # the run folder; running into it again needs resume or a new out
resume: bool = False  # continue the run in `out` from its last.pt
quiet: bool = False  # no progress bars (batch runs)
cache_dir: Optional[str] = None  # decoded-image cache; None: $FOODLIB_CACHE or ~/.cache/foodlib

# %% [markdown]
# ## Setup
# The config is built from every Config field defined above (or injected by papermill), so the
# notebook, `foodlib train` and the suite files all speak the same names.

# %%
import sys
from pathlib import Path

import pandas as pd
from IPython.display import Image, Markdown, display

import foodlib
from foodlib import metrics as M
from foodlib.config import Config
from foodlib.features import load_features
from foodlib.runtime import resolve_device
from foodlib.train import build_model_and_loss

cfg = Config.from_namespace(globals())
print(f"foodlib {foodlib.__version__} | python {sys.executable} | device {resolve_device(cfg.train.device)}")
print(f"run folder: {Path(cfg.train.out).resolve()}")

# %% [markdown]
# ## Data
# Indexed, val carved from train (stratified), decoded once into the uint8 cache.

# %%
dataset = foodlib.load_data(cfg, run_dir=cfg.train.out, progress=not cfg.train.quiet)
print(dataset.index.summary())
print("classes:", ", ".join(dataset.classes))

# %% [markdown]
# ## Model and loss
# The network maps an image to an embedding `(N, D)`; the loss module owns everything
# class-specific (classifier, centers, Gaussian means). `fit()` builds the same pair from the seed.

# %%
preview_model, preview_loss = build_model_and_loss(cfg, dataset.num_classes)
print(f"{cfg.model.backbone}: D = {preview_model.embedding_dim}, "
      f"{sum(p.numel() for p in preview_model.parameters()):,} parameters")
print(f"loss {cfg.loss.loss}: {type(preview_loss).__name__}, terms {preview_loss.term_names}")

# %% [markdown]
# ## Fit
# Train / val each epoch, best-val checkpoint, then test from the best checkpoint, features of every
# split and the run's figures.

# %%
result = foodlib.fit(cfg, data=dataset)
run_dir = result.run_dir

# %% [markdown]
# ## Features and metrics
# Accuracy from `loss.predict`; feature-space metrics on the embeddings (Fisher ratio, silhouette,
# kNN top-1 with the training embeddings as gallery, NMI of k-means clusters).

# %%
run_features = load_features(run_dir / "features.npz")
print({split: run_features[split]["embeddings"].shape for split in ("train", "val", "test") if split in run_features})
metrics_table = pd.DataFrame({split: result.metrics[split] for split in ("train", "val", "test")
                              if split in result.metrics}).T.drop(columns=["top1_ci", "n"], errors="ignore")
# train's loss and top-1 are measured while training (augmented; trace.csv), not re-evaluated: "-" here
display(metrics_table.astype(float).round(4).astype(object).where(metrics_table.notna(), "-"))
shown = "test" if "test" in result.metrics else "val"  # eval_test=False (tuning) keeps test out
shown_ci = result.metrics[shown].get("top1_ci")
print(f"{shown} top-1 {result.metrics[shown]['top1']:.3f}"
      + (f", bootstrap 95% CI [{shown_ci[0]:.3f}, {shown_ci[1]:.3f}]" if shown_ci else ""))

# %%
shown_features = run_features[shown]
confusion = M.confusion_matrix(shown_features["labels"], shown_features["logits"].argmax(1), len(dataset.classes))
display(Markdown(f"Most confused {shown} pairs (both directions): " + ", ".join(
    f"{a} / {b}: {n}" for a, b, n in M.most_confused_pairs(confusion, dataset.classes, k=5))))

# %% [markdown]
# ## Figures
# Written by `fit()` into `out/figures/` (README-ready PNGs).

# %%
for figure_path in sorted((run_dir / "figures").glob("*.png")):
    display(Markdown(f"**{figure_path.name}**"))
    display(Image(filename=str(figure_path)))
