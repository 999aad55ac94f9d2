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
# In this notebook we will see the data: how many instances each group has per split,
# what they look like, how strongly label and background agree — and, for the built-in
# miniature, which knob controls each property and how the knobs were chosen.

# %% tags=["parameters"]
run_dir = None        # run directory (absolute); None: results/<dataset>-<profile>
figures_dir = None    # figures folder; None: figures/<dataset>-<profile>
profile = "smoke"     # smoke | default | paper
dataset = "synthetic" # synthetic | waterbirds | celeba | folder
data_root = None      # local folder for real datasets
seeds = None          # student seeds; None: the profile's
device = "auto"       # auto | cpu | cuda
profile_overrides = None  # dict of profile fields to change, from --set

# %%
import numpy as np
import pandas as pd

import fairkd_utils as fk

run = fk.rundir.setup(run_dir, figures_dir, profile, dataset, data_root, seeds, device,
                          profile_overrides=profile_overrides)
fk.rundir.print_profile_note(run)   # says so when the numbers mean nothing (smoke)
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
# Each row is one group; each image one training instance. On the built-in data the
# bird is the small cross (landbird) or ring (waterbird), in any colour, anywhere; the
# background is the texture that fills the frame.
#
# ## The built-in miniature and its knobs
#
# `synthetic` is a miniature of Waterbirds with one knob per property of the benchmark
# (`fairkd_utils.data.make_synthetic`):
#
# | knob | default | what it sets |
# |---|---|---|
# | `spurious_strength` | 0.95 | share of each class on its majority background in train (Waterbirds' 95 %) |
# | `reliability` | 1.0 | the drawn shape is the label's: the object is **100 % predictive** of y, as the bird is |
# | `colour_cue` | 0.0 | share of shapes coloured by class; at 0 no pooled early feature reads the class for free |
# | `background_contrast`, `shape_size`, `noise` | 1.0, (0.2, 0.3), 0.06 | how easy the background is, how small the object is |
#
# So reading the background is a *spurious* shortcut here, not the Bayes rule: a model
# that recognises the shape is right on every group. The teacher's advantage comes from
# pretraining (notebook 02): `teacher_pretrain_alignment` of the profile is the knob of
# its bias.
#
# **How the knobs were calibrated, in this order** (`bench/calibrate_synthetic.py`,
# `default` profile, test split unless stated, over the profile's seeds). The data knobs
# were first fixed by the benchmark itself (object 100 % predictive, no colour cue,
# 95 % background alignment, Waterbirds' group counts). The teacher's pretraining corpus
# was then set balanced (alignment 0.5) with no adaptation to the biased split, and the
# targets below were checked with the teacher, the ERM student, its exit, group-balanced
# ERM and plain KD only — never by looking at DeDiER, Laplace-KD or the shuffled
# control, so the comparison in notebook 05 can come out either way:
#
# (a) teacher average accuracy ≥ 0.90 and worst group in [0.55, 0.90];
# (b) ERM student worst group ≤ the teacher's − 0.15;
# (c) the ERM student's early exit, on the *training* minority groups: ≥ 50 % wrong,
#     mean confidence margin ≥ 0.5 where wrong;
# (d) group-balanced ERM worst group ≥ ERM's + 0.20;
# (e) KD's worst group ≤ the teacher's − 0.05, so reweighting has room to help (or not).
#
# The measured values are in the README.

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

# %% [markdown]
# In this notebook we have written the group table every later notebook reads, seen the
# groups, and measured how much a background-only rule gains in training and loses on
# test — the gap the whole study is about.
