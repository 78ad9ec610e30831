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
# # Data overview: classes, counts, samples, image sizes, file problems
#
# A first look at a dataset before training on it: the classes and how many images each split
# holds (val as training will carve it), a grid of random examples per class (as the network
# sees them before augmentation: short side resized, center crop), the stored image sizes, and
# the problems the file scan finds (corrupt or truncated files, odd colour modes, duplicates
# across splits, empty classes; the same scan as `foodlib data-check`).
#
# Produces `out/samples.png` and `out/image_sizes.png` when `out` is set: the README's
# "the data" figure. The defaults are a smoke test on 4 generated dishes; for the real photos use
# `data="../shared/data/food101-10"`.

# %% tags=["parameters"]
from typing import Optional  # papermill reads Optional[int], not int | None

data: str = "dishes"  # ImageFolder root | food101:ROOT | dishes | digits
dishes_classes: int = 4  # embedded dishes: number of classes
dishes_per_class: int = 30  # embedded dishes: train images per class
val_fraction: float = 0.1  # stratified val split carved from train when there is no val/
split_seed: int = 0  # seed of that split
cache_dir: Optional[str] = None  # caches and scan reports (None: $FOODLIB_CACHE or ~/.cache/foodlib)
sample_split: str = "train"  # split the sample grid draws from
samples_per_class: int = 6  # images per class in the grid
max_classes: Optional[int] = None  # show at most this many classes in the grid (None: all)
thumbnail_size: int = 96  # px of each thumbnail
scan: bool = True  # run the file scan (decodes every file once; the report is cached)
out: Optional[str] = None  # save the figures here, e.g. "runs/data_overview" (None: do not)

# %% [markdown]
# ## Setup

# %%
# %matplotlib inline
from pathlib import Path

import numpy as np
import pandas as pd
from IPython.display import Image, Markdown, display

from foodlib import plots as P
from foodlib.config import Config
from foodlib.data import index_dataset, resolve_data_root
from foodlib.data.scan import scan_cached
from foodlib.report import image_size_histogram, image_sizes, sample_grid

cfg = Config.from_namespace(globals())
index = index_dataset(cfg)
print(f"{index.root}: {index.summary()}")

# %% [markdown]
# ## Classes and counts per split

# %%
counts = pd.DataFrame({name: np.bincount(split.labels, minlength=index.num_classes)
                       for name, split in index.splits.items()}, index=index.classes)
counts.loc["total"] = counts.sum()
display(counts)
train_counts = counts.drop(index="total")["train"]
print(f"train images per class: min {train_counts.min()} ({train_counts.idxmin()}), "
      f"max {train_counts.max()} ({train_counts.idxmax()}), imbalance {train_counts.max() / max(train_counts.min(), 1):.1f}x")

# %% [markdown]
# ## Samples per class
# Random `samples_per_class` images of each class from `sample_split` (the count in brackets).

# %%
sample_figure = sample_grid(index.splits[sample_split].paths, index.splits[sample_split].labels, index.classes,
                            per_class=samples_per_class, side=thumbnail_size, max_classes=max_classes,
                            seed=split_seed)
if out:
    P.save_figure(sample_figure, Path(out) / "samples.png")
sample_figure

# %% [markdown]
# ## Stored image sizes
# Before any resizing: the cache stores each image at `round(image_size / 0.875)` px on the short side.

# %%
all_paths = [p for split in index.splits.values() for p in split.paths]
sizes = image_sizes(all_paths)  # (N, 2) width, height
size_figure = image_size_histogram(sizes)
if out:
    P.save_figure(size_figure, Path(out) / "image_sizes.png")
size_figure

# %% [markdown]
# ## Problems in the files
# Errors are files training must skip (it does, and lists them in the run's `bad_files.txt`);
# warnings are usable but worth knowing (converted colour modes, duplicates that leak across splits).

# %%
if scan:
    kind, root = resolve_data_root(cfg.data.data, cfg)
    report = scan_cached(root, cache_dir=Path(cache_dir) / "scans" if cache_dir else None, progress=False)
    display(Markdown(f"**{len(report.errors)} errors, {len(report.warnings)} warnings** in {report.files_scanned} files"))
    print(report.to_text())
