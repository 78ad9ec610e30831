# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Inspect a trained run: its most-confused classes and their nearest training images
#
# Produces, for one run folder: a table of the most-confused (true, predicted) class pairs on the
# test split, the top-3 predictions for one mistaken image of each pair, and a figure of each
# such image next to its nearest training images in the run's embedding space (class and
# distance above each), saved as `RUN_DIR/figures/confused_neighbours.png`. With `run_dir` empty
# it first trains a tiny run on the embedded dishes, so a plain run of this notebook is a smoke
# test. No README figure comes from it.

# %% tags=["parameters"]
run_dir: str = ""  # a finished run folder (runs/NAME); empty: train a tiny run into `out` first
split: str = "test"  # split whose mistakes are inspected (test | val)
n_pairs: int = 3  # most-confused (true, predicted) class pairs to show
k: int = 5  # nearest training images per query
metric: str = ""  # euclidean | cosine; empty: the metric the loss trains for (euclidean)
device: str = "auto"  # auto (GPU if any) | cpu | cuda
out: str = "runs/inspect-smoke"  # where the tiny run goes when run_dir is empty

# %%
import pandas as pd
from IPython.display import Image, display

import foodlib
from foodlib.inference import InferenceRun, confused_pairs
from foodlib.plots import save_figure

if not run_dir:
    tiny = foodlib.Config.from_flat(
        data="dishes", dishes_classes=4, dishes_per_class=30, image_size=32, backbone="smallcnn", epochs=2,
        batch_size=16, workers=0, quiet=True, figures=False, resume=True, out=out,
    )
    run_dir = str(foodlib.fit(tiny).run_dir)
run = InferenceRun.load(run_dir, device=device)  # read the best checkpoint once for every call below
print(run.run_dir, run.cfg.loss.loss, run.cfg.model.backbone, f"{len(run.classes)} classes")

# %% [markdown]
# ## The most-confused class pairs
# From the run's own predictions in `features.npz`; `count` is how many `split` images of
# `true_class` the run took for `predicted_class`.

# %%
pairs = confused_pairs(run, split=split, n=n_pairs)
pd.DataFrame([{"true_class": p.true_class, "predicted_class": p.predicted_class, "count": p.count}
              for p in pairs])

# %% [markdown]
# ## What the model says about one mistaken image of each pair
# Top-3 classes with probabilities, recomputed from the image file with the run's evaluation
# preprocessing (they match the run's own evaluation).

# %%
queries = [p.paths[0] for p in pairs]
predictions = foodlib.predict(run, queries, top_k=3, progress=False) if queries else None
print(predictions.table() if predictions is not None else "no mistakes on this split")

# %% [markdown]
# ## Figure: nearest training images of each mistaken image
# Green titles: neighbours of the image's true class; red: other classes. A mistaken image whose
# neighbours are mostly of the predicted class sits inside that class in embedding space (a
# feature problem); one with neighbours of its own class is a classifier-boundary problem.

# %%
neighbours = foodlib.nearest_neighbours(run, queries, k=k, metric=metric or None) if queries else None
if neighbours is not None:
    figure_path = save_figure(neighbours.figure(), run.run_dir / "figures" / "confused_neighbours.png")
    display(Image(filename=str(figure_path)))

# %%
pd.DataFrame(neighbours.rows()) if neighbours is not None else None
