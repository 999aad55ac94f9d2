# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 — Data and groups
#
# **The set-up.** A classifier should recognise a *label* $y$ (here: which kind of bird),
# but in the training data the label is strongly correlated with a *spurious attribute*
# $a$ (the background: land or water). Most landbirds are photographed on land and most
# waterbirds on water, so a network can reach high average accuracy by looking at the
# background alone. It then fails on the rare **minority groups** — landbirds on water,
# waterbirds on land.
#
# Every instance therefore belongs to a *group* $g = y \cdot n_a + a$ (with two
# backgrounds, $g = 2y + a$). Fairness here means **worst-group accuracy**: the accuracy
# on the group where the model does worst.
#
# The study distils a large *teacher* into a small *student*. Small students lean even
# more on the spurious feature, and their early layers — which mostly see colour and
# texture — are *confidently wrong* on minority instances. DeDiER uses that early
# confidence to find hard instances and upweight them during distillation; the study
# replaces the raw confidence by the calibrated uncertainty of a Laplace approximation at
# the early exit (notebooks 03–06).
#
# This notebook shows the data: how many instances each group has per split, what they
# look like, and how strongly label and background agree.

# %% tags=["parameters"]
run_dir = None        # run directory (absolute); None: results/<dataset>-<profile>
figures_dir = None    # figures folder; None: figures/<dataset>-<profile>
profile = "smoke"     # smoke | default | paper
dataset = "synthetic" # synthetic | waterbirds | celeba | folder
data_root = None      # local folder for real datasets
seeds = None          # student seeds; None: the profile's
device = "auto"       # auto | cpu | cuda

# %%
import numpy as np
import pandas as pd

import fairkd_utils as fk

run = fk.experiment.setup(run_dir, figures_dir, profile, dataset, data_root, seeds, device)
splits = run.splits()
run

# %% [markdown]
# ## Samples per group
#
# The table below is `groups.csv` in the run directory; later notebooks read group
# names and the train group sizes from it (the train-weighted average accuracy of the
# Waterbirds convention weights group accuracies by these sizes).

# %%
groups = fk.data.group_table(splits)
fk.records.write_csv(run.path("groups.csv"), groups)
groups.pivot(index=["group", "group_name"], columns="split", values="n")[["train", "val", "test"]]

# %%
fig = fk.plots.group_counts(groups)
fk.plots.savefig(fig, run.figure("01_group_counts"), close=False)

# %% [markdown]
# In the training split the two majority groups hold the bulk of the data while the two
# minority groups are one to two orders of magnitude smaller. Validation and test are
# balanced in the background *within* each class — the test distribution of the
# Waterbirds benchmark — so a background-reading model is exposed there.

# %% [markdown]
# ## What the groups look like

# %%
rng = np.random.default_rng(0)
train = splits["train"]
examples = {}
for g, name in enumerate(train.group_names):
    idx = np.flatnonzero(train.g.numpy() == g)
    pick = rng.choice(idx, size=min(8, len(idx)), replace=False)
    examples[name] = [fk.data.to_display(train[i][0]) for i in pick]
fig = fk.plots.group_samples(examples)
fk.plots.savefig(fig, run.figure("01_group_samples"), close=False)

# %% [markdown]
# ## How strongly do label and background agree?
#
# For each split: the share of instances whose background "matches" their label
# (group on the diagonal, i.e. $a = y$), the share in the minority groups, and the
# correlation between $y$ and $a$. In training the background alone predicts the label
# for the large majority of instances; on test it predicts nothing within a class.

# %%
def agreement(ds):
    y, a = ds.y.numpy(), ds.a.numpy()
    agree = (y == a) if ds.n_attrs == ds.n_classes else np.full(len(y), np.nan)
    return {"n": len(y), "label_background_agree": agree.mean(),
            "minority_share": 1 - agree.mean(), "corr(y, a)": np.corrcoef(y, a)[0, 1]}

agreement_table = pd.DataFrame({name: agreement(ds) for name, ds in splits.items()}).T
agreement_table.round(3)

# %%
train_agree = agreement_table.loc["train", "label_background_agree"]
print(f"In training, the background agrees with the label for {train_agree:.1%} of instances: "
      f"a background-only rule is {train_agree:.1%} accurate on train "
      f"but only {agreement_table.loc['test', 'label_background_agree']:.1%} on test.")
