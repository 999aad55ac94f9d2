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
# # 06 — Fairness plots
#
# > **Read it executed, without running anything:** the reference run's copy of this
# > notebook, outputs included, is `results/reference/synthetic-default/executed/06_fairness_plots.ipynb`
# > (image miniature) and `results/reference/synthetic_text-default/executed/06_fairness_plots.ipynb`
# > (text miniature). Run as it stands, this notebook uses the `smoke` profile, whose
# > numbers mean nothing; the runner passes the real profile.
#
# The summary figures of the study, drawn from the tables of the run directory alone
# (`groups.csv`, `metrics.csv`, `predictions.csv`, `summary.csv`): no model is loaded
# and nothing is trained, so this notebook reruns in seconds and the figures can be
# restyled without retraining. Each is written as PNG (for reading) and PDF (for
# slides); both are byte-identical across reruns.

# %% tags=["parameters"]
run_dir = None        # run directory (absolute); None: results/<dataset>-<profile>
figures_dir = None    # figures folder; None: figures/<dataset>-<profile>
profile = "smoke"     # smoke | default | paper
dataset = "synthetic" # synthetic | waterbirds | celeba | folder | synthetic_text | multinli
data_root = None      # local folder for real datasets
seeds = None          # student seeds; None: the profile's
device = "auto"       # auto | cpu | cuda
profile_overrides = None  # dict of profile fields to change, from --set
teacher_model = None  # local teacher weights file or Hugging Face folder
student_model = None  # local student weights file or Hugging Face folder

# %% [markdown]
# Set-up reads the tables notebook 05 assembled and keeps only the configurations it
# compared (its `summary.csv` names them) and this run's seeds: records of other
# configurations or seeds may lie in the same run directory, and they never mix in.
# The first table is each method's worst-group and average test accuracy over seeds.

# %%
import pandas as pd

import fairkd_utils as fk

run = fk.rundir.setup(run_dir, figures_dir, profile, dataset, data_root, seeds, device,
                      profile_overrides=profile_overrides, teacher_model=teacher_model,
                      student_model=student_model)
fk.rundir.print_profile_note(run)   # says so when the numbers mean nothing (smoke)
tables = {name: fk.records.read_table(run.require(f"{name}.csv", "05_distillation_comparison"))
          for name in ("metrics", "predictions", "summary")}
groups = fk.records.read_table(run.require("groups.csv", "01_data_and_groups"))
summary = tables["summary"]
chosen = summary[["method", "config_id"]].drop_duplicates()          # the configurations 05 compared
for name in ("metrics", "predictions"):                              # ... and only this run's seeds
    tables[name] = tables[name][tables[name].seed.isin(run.seeds)]
per_seed = fk.metrics.per_seed_metrics(tables["metrics"], groups).merge(chosen)
per_seed.groupby("method")[["worst_group_acc", "avg_acc"]].agg(["mean", "std"]).round(3)

# %% [markdown]
# ## Worst-group vs average accuracy
#
# Each method's mean over seeds with ± 1 sd error bars; small dots are single seeds.
# Up is fairer, right is more accurate on the test distribution.

# %%
fig = fk.plots.wga_vs_avg(per_seed)
fk.plots.savefig(fig, run.figure("06_wga_vs_avg"), close=False)

# %% [markdown]
# Look first at the vertical gap between `kd` and the teacher-free `erm`: that is what
# distillation alone passes on. The reweighting methods should sit above `kd` if their
# weights find the minority instances; `shuffled` (same weights, random instances) tells
# whether they do. Hollow squares are the references that use group labels in
# training: what knowing the groups buys on this run, which need not be the best result
# (balancing by weights can starve a small student of its majority groups).

# %% [markdown]
# ## Accuracy by method and group
#
# The worst-group number hides *which* group is worst. Here every group's test accuracy,
# mean over seeds, for every method: read down a column to compare methods on one group,
# along a row to see where one method fails.

# %%
m = tables["metrics"].merge(chosen)
m = m[(m.model == "student") & (m.split == "test") & (m.predictive == "map") & (m.group_name != "all")]
order = [n for n in groups.sort_values("group").group_name.drop_duplicates()]
heat = (m.groupby(["method", "group_name"]).acc.mean().unstack()
        .reindex(index=[x for x in fk.plots.METHOD_ORDER if x in set(m.method)], columns=order))
fig = fk.plots.group_acc_heatmap(heat)
fk.plots.savefig(fig, run.figure("06_group_acc_heatmap"), close=False)
heat.round(3)

# %% [markdown]
# Each row is a method, each column a group. The minority groups — "landbird on water"
# and "waterbird on land" on the bird data, entailment and neutral *with* a negation on
# the text data — are where the methods are meant to differ; read every column all the
# same, since a method can also move a majority group.

# %% [markdown]
# ## Whom do DeDiER and Laplace-KD upweight?
#
# The weight each method gives every training instance at the end of training (final
# student, before the per-batch normalisation to mean 1), by group. A method that finds the minority
# groups puts their mass to the right.

# %%
p = tables["predictions"].merge(chosen)
w = p[(p.split == "train") & p.weight.notna()].copy()
names = groups.drop_duplicates("group").set_index("group").group_name
w["group_name"] = w.group.map(names)
fig = fk.plots.weight_distributions(w, methods=("dedier_both", "laplace_kd", "shuffled",
                                                "dedier_final", "jtt"))   # those present
fk.plots.savefig(fig, run.figure("06_weight_distributions"), close=False)
w.groupby(["method", "group_name"]).weight.describe()[["mean", "50%", "max"]].round(3)

# %% [markdown]
# The histograms are per group and normalised within each group, so a small group is as
# visible as a large one. `shuffled` has DeDiER's weights, given to random instances: its
# groups should look alike. In an extended run, `jtt`'s weights take two values
# ($\lambda_{up}$ on its identification model's errors, 1 elsewhere), so its panel shows
# which groups the error set holds; `dedier_final`'s read the final head.
#
# ## Paired differences against KD and against DeDiER (both terms)
#
# For each seed, a method's test worst-group accuracy minus the baseline's with the same
# seed and initialisation; the diamond is the mean with its 95 % (Student-t) interval. An
# interval that crosses zero means these seeds cannot tell the method from the baseline.
# The right panel's Laplace-KD row is the study's primary contrast.

# %% [markdown]
# Pairing matters: seeds differ more from each other than methods do on one seed, so an
# unpaired comparison of means would bury the contrast in seed noise. Each seed is its
# own control here.

# %%
diffs = fk.metrics.paired_differences(per_seed, "worst_group_acc")
fig = fk.plots.paired_difference_intervals(diffs, "worst_group_acc")
fk.plots.savefig(fig, run.figure("06_paired_differences"), close=False)
diffs.groupby(["baseline", "method"])[["diff", "lo", "hi"]].agg({"diff": "mean", "lo": "first", "hi": "first"}).round(3)

# %% [markdown]
# In this notebook we have drawn the study's summary figures from the tables of notebooks
# 01 and 05 alone: fairness against accuracy, accuracy by group, whom each method
# upweights, and the paired differences that answer the study's question on this run.
