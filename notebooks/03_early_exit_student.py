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
# # 03 — The early-exit student
#
# The student is a much smaller network of the same family. Besides its final head it
# carries an **early exit**: the output of an early stage is average-pooled into
# features $\varphi$ and read out by one linear layer on $[\varphi, 1]$. The exit is
# trained with its own cross-entropy on *detached* features, so it reads out what the
# early layers encode without changing them.
#
# Here the student is trained by plain ERM (no teacher), once per seed. The question
# this notebook answers with numbers: **is the early exit confidently wrong on the
# minority groups?** That is the premise of DeDiER and of the study — if the early
# readout is confidently wrong exactly where the final model fails, its confidence is a
# signal for which instances to upweight.

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

# %%
import numpy as np
import pandas as pd

import fairkd_utils as fk

run = fk.rundir.setup(run_dir, figures_dir, profile, dataset, data_root, seeds, device,
                      profile_overrides=profile_overrides, teacher_model=teacher_model,
                      student_model=student_model)
fk.rundir.print_profile_note(run)   # says so when the numbers mean nothing (smoke)
run.require("groups.csv", "01_data_and_groups")
splits = run.splits()
config = fk.study.method_config(run, "erm")
minority = fk.study.minority_groups(splits["train"].group_counts(), splits["train"].n_attrs)
print(f"student: {run.profile.student_arch} {run.profile.student_widths or ''}, exit after stage "
      f"{run.profile.exit_stage}; seeds {run.seeds}; minority groups "
      f"{[splits['train'].group_names[k] for k in minority]}")

# %%
test_preds, train_preds = {}, {}
for seed in run.seeds:
    result = fk.study.train_student(run, config, seed)
    preds = fk.study.evaluate_student(run, result, config, seed)
    test_preds[seed] = preds["test"]
    train_preds[seed] = fk.train.predict(result.model, splits["train"], device=run.device)
    print(f"seed {seed}: {'reused' if result.reused else 'trained'} {result.checkpoint.name}, "
          f"best validation epoch {result.best_epoch}")

# %% [markdown]
# ## Exit vs final head, per group (test, mean ± sd over seeds)

# %%
metrics = fk.records.assemble(run.run_dir, "metrics", write=False)
erm = metrics[(metrics.method == "erm") & metrics.model.isin(["student", "exit"])
              & (metrics.split == "test") & (metrics.config_id == config.config_id)
              & metrics.seed.isin(run.seeds)]
erm.pivot_table(index="group_name", columns="model", values="acc", aggfunc=["mean", "std"]).round(3)

# %%
fig = fk.plots.group_accuracy_bars(erm, hue="model", title="ERM student: early exit vs final head (test)")
fk.plots.savefig(fig, run.figure("03_exit_vs_final_group_acc"), close=False)

# %% [markdown]
# Look at the two minority groups (background against the label): the exit, which reads
# only the early stage, is as good as the final head on the majority groups but far
# below it — often near zero — on the minority ones. That gap is what DeDiER and
# Laplace-KD turn into weights.

# %% [markdown]
# ## How confident is the exit when it is wrong?
#
# Confidence is the exit's top-class probability; the margin is the gap between the
# two largest class probabilities (DeDiER's score). Right and wrong predictions apart,
# test split, all seeds pooled.

# %%
test = splits["test"]
frame = pd.concat([fk.study.exit_frame(p, test).assign(seed=s) for s, p in test_preds.items()])
long = frame.melt(id_vars=["group", "group_name", "correct", "seed"], value_vars=["prob", "margin"],
                  var_name="score", value_name="value")
long["score"] = long["score"].map({"prob": "confidence", "margin": "margin"})
fig = fk.plots.confidence_by_group(long, value="value", hue="correct", col="score",
                                   title="Early exit of the ERM student: confidence on test")
fk.plots.savefig(fig, run.figure("03_exit_confidence_by_group"), close=False)

# %% [markdown]
# The boxes show, per group, the exit's confidence on the instances it gets right and on
# those it gets wrong. Look at the minority groups' "wrong" boxes: high boxes there mean
# the exit is wrong *and sure of itself*.
#
# The same in numbers, on the test split and on the **training** split — the one whose
# instances the reweighting methods weigh (calibration target (c) of notebook 01).

# %%
def exit_premise(frame):
    frame = frame.assign(minority=frame.group.isin(minority))
    return frame.groupby("minority").apply(lambda d: pd.Series({
        "n": len(d), "exit_error": 1 - d.correct.mean(),
        "mean_margin_when_wrong": d.loc[~d.correct, "margin"].mean(),
        "confidently_wrong_share": (~d.correct & (d.margin > 0.5)).mean(),
    }), include_groups=False).rename(index={True: "minority groups", False: "majority groups"})

train_frame = pd.concat([fk.study.exit_frame(p, splits["train"]).assign(seed=s)
                         for s, p in train_preds.items()])
summary = exit_premise(frame)
premise_table = pd.concat({"test": summary, "train": exit_premise(train_frame)}, names=["split"])
premise_table.round(3)

# %%
train_counts = splits["train"].group_counts()
if not {"minority groups", "majority groups"} <= set(summary.index):
    print("Every training group has the same size, so no group is a minority: the premise "
          "check is skipped on this run.")
else:
    if train_counts[minority].max() >= 0.5 * train_counts.double().mean():
        print(f"No training group is below half the mean group size (balanced data); the smallest "
              f"{[splits['train'].group_names[k] for k in minority]} stand in for the minority.")
    mino, majo = summary.loc["minority groups"], summary.loc["majority groups"]
    premise = (mino.exit_error > majo.exit_error) and (mino.mean_margin_when_wrong > 0.5)
    print(f"On the minority groups the exit is wrong on {mino.exit_error:.1%} of test instances "
          f"(majority groups: {majo.exit_error:.1%}); when wrong there, its mean margin is "
          f"{mino.mean_margin_when_wrong:.2f} (confidence ≈ {(1 + mino.mean_margin_when_wrong) / 2:.2f} "
          f"for two classes), and {mino.confidently_wrong_share:.1%} of minority instances are "
          f"wrong with margin > 0.5.")
    print("=> The early exit IS confidently wrong on the minority groups: DeDiER's premise holds here."
          if premise else
          "=> The early exit is NOT confidently wrong on the minority groups here: DeDiER's premise "
          "does not hold on this run (see the figure).")

# %% [markdown]
# In this notebook we have trained the ERM student with its early exit on every seed,
# compared the exit with the final head per group, and measured how often and how
# confidently the exit is wrong on the minority groups — the signal DeDiER and
# Laplace-KD turn into weights.
