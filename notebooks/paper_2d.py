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
# # The papers' 2-D feature plot: softmax vs Center Loss vs L-GM
#
# The classic figure of Wen et al. (ECCV 2016, Fig. 2-3) and Wan et al. (CVPR 2018): train the
# same network with a 2-D embedding (`embedding_dim=2`) under each loss and scatter the test
# embeddings directly, no UMAP. Softmax spreads classes into long radial wedges; Center Loss pulls
# each class towards its center, tighter as lambda grows; L-GM packs each class into a Gaussian
# blob. Each panel marks the class centers (x = mean of the class's training embeddings).
#
# Produces `out/paper_2d.png`: the README's "2-D embeddings" figure (copied to `copy_to` when
# set). Default: scikit-learn's digits with a small CNN at 32 px. The defaults are a smoke test
# (3 epochs); the README figure uses 15 (`papermill ... -p epochs 15`: about 5 minutes for the
# five panels on a 2-core CPU). Each panel is its own run folder `out/<panel>/`, replaced when the
# notebook runs again.

# %% tags=["parameters"]
from typing import Optional  # papermill reads Optional[int], not int | None

data: str = "digits"  # digits | dishes | an ImageFolder root
image_size: int = 32  # crop side, px
backbone: str = "smallcnn"  # a small CNN is enough for 2-D embeddings of digits
limit_per_class: Optional[int] = None  # at most this many train images per class (None: all)
epochs: int = 3  # training epochs per panel (README figure: 15)
batch_size: int = 64  # images per step
lr: float = 3e-3  # peak learning rate
seed: int = 0  # weights, shuffling and augmentation
augment: str = "none"  # none keeps digits upright and the clusters crisp | flip | standard
device: str = "auto"  # auto | cpu | cuda
workers: int = 0  # loader processes (0: batches are gathered in this process)
channels_last: bool = False  # NHWC memory layout: helps GPUs; NCHW trained 2-4x faster on a 2-core CPU
quiet: bool = True  # no progress bars
cache_dir: Optional[str] = None  # decoded-image cache (None: $FOODLIB_CACHE or ~/.cache/foodlib)
center_lams: list = [0.01, 0.1, 1.0]  # Center Loss weights lambda, one panel each
out: str = "runs/paper_2d"  # one run folder per panel, and paper_2d.png
copy_to: Optional[str] = None  # also copy the figure here, e.g. "readme_pictures" (None: do not)

# %% [markdown]
# ## Setup
# One base config from the Config fields above, with a 2-D embedding; the panels override the loss.

# %%
import shutil
from pathlib import Path

import numpy as np
from IPython.display import Image, display
from matplotlib.figure import Figure

import foodlib
from foodlib import plots as P
from foodlib.config import Config
from foodlib.features import load_features

base_cfg = Config.from_namespace(globals()).with_overrides(
    embedding_dim=2, figures=False)
panels = [("softmax", "softmax", {"loss": "softmax"})]
panels += [(f"center-lam{lam:g}", f"Center Loss, λ = {lam:g}", {"loss": "center", "lam": lam}) for lam in center_lams]
panels += [("lgm", "L-GM", {"loss": "lgm"})]
print("panels:", ", ".join(title for _, title, _ in panels))

# %% [markdown]
# ## Data
# Loaded once and shared by every panel (same split, same images).

# %%
dataset = foodlib.load_data(base_cfg, progress=not quiet)
print(dataset.index.summary())

# %% [markdown]
# ## Train one 2-D model per panel and draw it

# %%
figure = Figure(figsize=(4.2 * len(panels), 4.9), layout="constrained")
axes = figure.subplots(1, len(panels), squeeze=False)[0]
shared_handles = []
for ax, (folder, title, overrides) in zip(axes, panels):
    panel_dir = Path(out) / folder
    shutil.rmtree(panel_dir, ignore_errors=True)  # this notebook owns out/: a rerun retrains each panel
    result = foodlib.fit(base_cfg.with_overrides(out=str(panel_dir), **overrides), data=dataset)
    panel_features = load_features(panel_dir / "features.npz")
    train, test = panel_features["train"], panel_features["test"]
    class_means = np.stack([train["embeddings"][train["labels"] == c].mean(axis=0)
                            for c in range(len(dataset.classes))])  # (C, 2)
    P.features_2d(test["embeddings"], test["labels"], centers=class_means, class_names=dataset.classes, ax=ax,
                  title=f"{title}\ntest top-1 {result.metrics['test']['top1']:.3f}")
    if ax.get_legend() is not None:  # one shared legend under the row instead of one per panel
        shared_handles = ax.get_legend().legend_handles
        ax.get_legend().remove()
if shared_handles:
    figure.legend(handles=shared_handles, loc="outside lower center", ncol=min(len(shared_handles), 10),
                  fontsize=8, frameon=False)

# %% [markdown]
# ## Figure

# %%
figure_path = P.save_figure(figure, Path(out) / "paper_2d.png")
if copy_to:
    Path(copy_to).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(figure_path, Path(copy_to) / "paper_2d.png")
print(f"wrote {figure_path}")
display(Image(filename=str(figure_path)))
