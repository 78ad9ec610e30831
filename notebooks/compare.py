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
# # Compare the runs of a suite
#
# Reads the run folders of one suite (`runs/<suite>/<run>/`, written by `foodlib suite`) and
# produces the README's comparison: a table of test metrics (mean and 95% CI over seeds of
# top-1, top-5, Fisher ratio, silhouette, kNN top-1), the paired difference to the baseline,
# and three figures written to `runs/<suite>/figures/`:
#
# * `accuracy_ci.png`: test top-1 per loss, mean and 95% CI over seeds;
# * `umap_grid.png`: UMAP of the same test images, one seed per loss;
# * `lookalike_confusion.png`: confusion among the most look-alike classes, per loss.
#
# Everything is also written to `runs/<suite>/report.md`. The logic lives in `foodlib.report`
# (`foodlib report runs/<suite>` does the same without Jupyter).

# %% tags=["parameters"]
from typing import Optional  # papermill reads Optional[str], not str | None

suite_dir: str = "runs/demo"  # a suite folder written by `foodlib suite suites/NAME.yaml`
baseline: str = "softmax"  # the loss (or variant) every other one is compared against
copy_to: Optional[str] = None  # also copy the figures here, e.g. "readme_pictures" (None: do not)

# %% [markdown]
# ## Setup

# %%
from pathlib import Path

import pandas as pd
from IPython.display import Image, Markdown, display

from foodlib.report import (collect_runs, markdown_paired, markdown_table, openset_section, paired_vs_baseline,
                            summary_table, write_report)

rows = collect_runs(suite_dir)
if not rows:
    raise FileNotFoundError(f"no finished run (*/metrics.json) in {suite_dir}; run `foodlib suite` first")
print(f"{len(rows)} finished runs in {Path(suite_dir).resolve()}")
display(pd.DataFrame(rows).drop(columns=["run_dir"]).set_index("run").round(4))

# %% [markdown]
# ## Test metrics: mean [95% CI] over seeds

# %%
display(Markdown(markdown_table(summary_table(rows))))

# %% [markdown]
# ## Against the baseline, paired by seed
# Difference in test top-1 on the same seeds, with a paired t interval and p-value (needs 2+ seeds).

# %%
display(Markdown(markdown_paired(paired_vs_baseline(rows, baseline))))

# %% [markdown]
# ## Open set: held-out dishes
# Only for suites whose runs hold classes out (`novel_classes`): retrieval (MAP@R, R-Precision,
# P@1, Recall@K), k-shot and verification numbers of the dishes never trained on, and MAP@R /
# 5-shot accuracy paired with the baseline by seed. Empty otherwise.

# %%
display(Markdown("\n".join(openset_section(rows, baseline)) or "(no run held classes out)"))

# %% [markdown]
# ## Report and figures
# `report.md` and `figures/` in the suite folder (and copies in `copy_to` when set).

# %%
report_path = write_report(suite_dir, copy_to=copy_to, baseline=baseline)
print(f"wrote {report_path}")
for figure_path in sorted((Path(suite_dir) / "figures").glob("*.png")):
    display(Markdown(f"**{figure_path.name}**"))
    display(Image(filename=str(figure_path)))
