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
# > **Read it executed, without running anything:** the reference run's copy of this
# > notebook, outputs included, is `results/reference/synthetic-default/executed/03_early_exit_student.ipynb`
# > (image miniature) and `results/reference/synthetic_text-default/executed/03_early_exit_student.ipynb`
# > (text miniature). Run as it stands, this notebook uses the `smoke` profile, whose
# > numbers mean nothing; the runner passes the real profile.
#
# In this notebook we will train the student that every method of the study starts
# from, and look at the one part of it the study is about: its **early exit**.
#
# The student is a much smaller network of the same family as the teacher. Besides its
# final head it carries an early exit: the output of an early stage is average-pooled
# into features $\varphi$ and read out by one linear layer on $\tilde\varphi = [\varphi, 1]$
# (the appended 1 is the bias). The exit is trained with its own cross-entropy on
# *detached* features, so it reads out what the early layers encode without changing
# them: the student's final head is exactly what it would be without the exit.
#
# Here the student is trained by plain ERM (no teacher), once per seed. The question
# this notebook answers with numbers: **is the early exit confidently wrong on the
# minority groups?** That is the premise of DeDiER and of the study. If the early
# readout is confidently wrong exactly where the final model fails, its confidence is a
# signal for which instances to upweight, and it can be read without any group label.
#
# We will (1) train or reuse the ERM students, (2) compare the exit with the final head
# per group, (3) compute DeDiER's score, the confidence margin $\mathrm{cm}(p)$ and the
# indicator $\alpha$, by hand on the exit's own predictions, and (4) measure how often
# and how confidently the exit is wrong on the minority groups.

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
# The cell above holds the notebook's parameters: the runner (`python -m
# fairkd_utils.pipeline`) replaces them, so the same notebook runs every profile and
# dataset. Set-up below resolves them into a run — its directory, profile, seeds and
# data — and stops at once, naming notebook 01, if the run has no group table yet.

# %%
import pandas as pd
import torch

import fairkd_utils as fk

run = fk.rundir.setup(run_dir, figures_dir, profile, dataset, data_root, seeds, device,
                      profile_overrides=profile_overrides, teacher_model=teacher_model,
                      student_model=student_model)
fk.rundir.print_profile_note(run)   # says so when the numbers mean nothing (smoke)
run.require("groups.csv", "01_data_and_groups")
splits = run.splits()
config = fk.hparams.method_config(run, "erm")
minority = fk.metrics.minority_groups(splits["train"].group_counts(), splits["train"].n_attrs)
print(f"student: {run.profile.student_arch} {run.profile.student_widths or ''}, exit after stage "
      f"{run.profile.exit_stage}; seeds {run.seeds}; minority groups "
      f"{[splits['train'].group_names[k] for k in minority]}")

# %% [markdown]
# `minority` are the shortcut-conflicting groups, read off the training counts alone:
# the groups whose label is rare given their spurious attribute. No method uses them;
# they are for the analysis below.
#
# ## Train (or reuse) the ERM students
#
# One student per seed. A seed sets the student's initialisation and the order in which
# it sees the data; every method of notebook 05 starts from the same initialisation for
# the same seed. A student whose checkpoint already exists with the same fingerprint
# (configuration, data and library code) is reused, not retrained.

# %%
test_preds, train_preds = {}, {}
for seed in run.seeds:
    result = fk.students.train_student(run, config, seed)
    preds = fk.students.evaluate_student(run, result, config, seed)
    test_preds[seed] = preds["test"]
    train_preds[seed] = fk.train.predict(result.model, splits["train"], device=run.device)
    print(f"seed {seed}: {'reused' if result.reused else 'trained'} {result.checkpoint.name}, "
          f"best validation epoch {result.best_epoch}")

# %% [markdown]
# `test_preds` and `train_preds` hold, per seed, everything the student outputs on the
# test and training splits: the final head's and the exit's logits and probabilities, and
# the exit's features $\varphi$. The rest of the notebook only reads these tensors.
#
# ## Exit vs final head, per group (test, mean ± sd over seeds)
#
# The final head sees the whole network; the exit sees only the early stage. Where the
# two agree, the early features already hold the answer; where the exit is far below,
# the early features hold something else — on this data, the spurious attribute.

# %% [markdown]
# Each student wrote its per-group metrics as records of its own (`records/metrics/`);
# we read them back, keep the ERM rows of the current seeds on test, and pivot to
# one row per group with the exit and the final head side by side.

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
# Look at the minority groups (the label against its usual attribute). An ERM student
# fails there with both heads: its final head has learnt the shortcut too, so both are
# near zero on those groups and the exit is at most slightly below the final head; it
# may trail it more on the majority ones, where the early features hold less of the
# answer. What DeDiER and Laplace-KD
# turn into weights is not that gap but how the exit fails: wrong on the minority
# instances *and sure of itself*, which the rest of this notebook measures.

# %% [markdown]
# ## DeDiER's score, computed here: $\mathrm{cm}(p)$ and $\alpha$
#
# DeDiER turns the exit's softmax $p$ into a weight in two steps. The **confidence
# margin** is the gap between the exit's two most probable classes,
#
# $$\mathrm{cm}(p) = p_{\max} - \max_{k \ne \arg\max} p_k ,$$
#
# near 1 when the exit is sure, near 0 when it hesitates. The **indicator** $\alpha$ says
# whether the exit is wrong: $\alpha_i = 1$ when $\arg\max_k p_{ik} \ne y_i$, else 0. A
# training instance gets weight $w_i = \exp(\beta\,\mathrm{cm}_i\,\alpha_i)$: 1 where the exit is
# right, up to $e^\beta$ where it is wrong and sure of itself. Below, both on the first
# seed's exit over the training split — the instances the methods weigh — in three lines,
# then checked against the library function the training loop calls.

# %%
seed = run.seeds[0]
y_train = splits["train"].y
p = train_preds[seed].exit_probs                      # the exit's softmax, (N, C)
top2 = p.topk(2, dim=1).values
cm = top2[:, 0] - top2[:, 1]                          # cm(p) = p_max - max_{k != argmax} p_k
alpha = (p.argmax(1) != y_train).to(cm.dtype)         # alpha = 1 where the exit is wrong
assert torch.allclose(cm, fk.losses.confidence_margin(p))
w = torch.exp(1.0 * cm * alpha)                       # DeDiER's weight at beta = 1
assert torch.allclose(w.double(), fk.losses.dedier_weight(train_preds[seed].exit_logits.double(), y_train, 1.0),
                      atol=1e-6)
score = pd.DataFrame({"group": [splits["train"].group_names[k] for k in splits["train"].g.tolist()],
                      "cm": cm.numpy(), "alpha": alpha.numpy(), "cm * alpha": (cm * alpha).numpy()})
score.groupby("group", sort=False).mean().round(3)

# %% [markdown]
# Per training group: the mean margin, the share of instances the exit gets wrong
# ($\alpha$'s mean) and the mean of $\mathrm{cm}\cdot\alpha$, the exponent DeDiER multiplies
# by $\beta$. The premise of the study is that $\mathrm{cm}\cdot\alpha$ is large on the
# minority groups and near 0 on the majority ones: the weight then finds the minority
# instances without being told which they are. (The `assert`s above passed: these
# three lines are what training computes, `fk.losses.confidence_margin` and
# `fk.losses.dedier_weight`.)
#
# ## How confident is the exit when it is wrong?
#
# Confidence is the exit's top-class probability; the margin is the $\mathrm{cm}(p)$ just
# computed. Right and wrong predictions apart, test split, all seeds pooled.

# %% [markdown]
# One figure, two panels: the exit's confidence (left) and its margin (right), one box
# per group and per correctness. For two classes the confidence is $(1 + \mathrm{cm})/2$,
# so the two panels carry the same information on a different scale; for three classes
# (the text benchmark) they differ.

# %%
test = splits["test"]
frame = pd.concat([fk.students.exit_frame(p, test).assign(seed=s) for s, p in test_preds.items()])
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
# instances the reweighting methods weigh (condition (c) of the README's calibration).

# %% [markdown]
# Three numbers per side, minority groups against majority groups:
#
# * `exit_error` — the share of instances the exit gets wrong (the mean of $\alpha$);
# * `mean_margin_when_wrong` — the mean $\mathrm{cm}(p)$ over those wrong instances;
# * `confidently_wrong_share` — the share that is wrong *and* has a margin over 0.5.
#
# DeDiER's premise reads: the first and the last are larger on the minority side, on
# the training split — the instances the weights see.

# %%
def exit_premise(frame):
    frame = frame.assign(minority=frame.group.isin(minority))
    return frame.groupby("minority").apply(lambda d: pd.Series({
        "n": len(d), "exit_error": 1 - d.correct.mean(),
        "mean_margin_when_wrong": d.loc[~d.correct, "margin"].mean(),
        "confidently_wrong_share": (~d.correct & (d.margin > 0.5)).mean(),
    }), include_groups=False).rename(index={True: "minority groups", False: "majority groups"})

train_frame = pd.concat([fk.students.exit_frame(p, splits["train"]).assign(seed=s)
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
    train_side = premise_table.loc["train"]
    premise = all(train_side.loc["minority groups", c] > train_side.loc["majority groups", c]
                  for c in ("exit_error", "confidently_wrong_share"))
    mino, majo = summary.loc["minority groups"], summary.loc["majority groups"]
    print(f"On the minority groups the exit is wrong on {mino.exit_error:.1%} of test instances "
          f"(majority groups: {majo.exit_error:.1%}); when wrong there, its mean margin is "
          f"{mino.mean_margin_when_wrong:.2f}, and {mino.confidently_wrong_share:.1%} of minority "
          f"instances are wrong with margin > 0.5 (majority groups: {majo.confidently_wrong_share:.1%}).")
    print("=> The early exit IS confidently wrong on the minority groups: DeDiER's premise holds here."
          if premise else
          "=> The early exit is NOT confidently wrong on the minority groups here: DeDiER's premise "
          "does not hold on this run (see the figure).")

# %% [markdown]
# The first table reads row by row: the exit's error rate on each kind of group, its mean
# margin where it is wrong, and the share of instances that are wrong with a margin over
# 0.5 ("confidently wrong"). The printed lines read the test rows in words, then give
# the verdict on the premise, computed from the training rows: they are what the
# weights see.
#
# In this notebook we have trained the ERM student with its early exit on every seed,
# compared the exit with the final head per group, and measured how often and how
# confidently the exit is wrong on the minority groups — the signal DeDiER and
# Laplace-KD turn into weights.
