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
# # 02 — The teacher
#
# > **Read it executed, without running anything:** the reference run's copy of this
# > notebook, outputs included, is `results/reference/synthetic-default/executed/02_teacher.ipynb`
# > (image miniature) and `results/reference/synthetic_text-default/executed/02_teacher.ipynb`
# > (text miniature). Run as it stands, this notebook uses the `smoke` profile, whose
# > numbers mean nothing; the runner passes the real profile.
#
# In this notebook we build the model every student distils from and measure what it
# knows about each group. As in the paper, the teacher is a larger, **pretrained**
# network: its advantage over the student must come from what it learned before it saw
# the study's biased training split, not from a cue an early layer could read too.
#
# On the built-in data that happens in up to two stages, each cached by fingerprint:
#
# 1. **pretrained** — plain ERM on a built-in corpus (the miniature's ImageNet) with the
#    same kind of images, whose background–label alignment is the profile's
#    `teacher_pretrain_alignment` (0.5: balanced over class and background, so the
#    background tells nothing). This is the documented knob of the teacher's bias.
# 2. **adapted** (only if `teacher_adapt_epochs > 0`) — a short, bounded ERM
#    fine-tuning on the study's training split. Measured on the image miniature:
#    unbounded ERM fine-tuning on the 95 %-aligned split collapses the teacher's worst
#    group within an epoch.
#
# The text miniature (`synthetic_text`) does the same with a tiny BERT: pretrained on
# pairs whose negation word is independent of the label. On real data the teacher
# starts from a local pretrained model (`--teacher-model`: a torchvision weights file,
# or a Hugging Face folder such as bert-base-uncased for MultiNLI) and is trained on the
# training split. The teacher never sees group labels, so each stage is
# selected on **validation average** accuracy (never test). Its logits on train, val and
# test are saved for distillation.

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
# The parameters cell above is what the runner replaces; set-up resolves it into a run
# and stops at once, naming notebook 01, if the run has no group table yet. The teacher
# is one per dataset and profile: every student seed of notebooks 03 and 05 learns from
# the same teacher, so differences between students are never the teacher's.

# %%
import pandas as pd

import fairkd_utils as fk

run = fk.rundir.setup(run_dir, figures_dir, profile, dataset, data_root, seeds, device,
                      profile_overrides=profile_overrides, teacher_model=teacher_model,
                      student_model=student_model)
fk.rundir.print_profile_note(run)   # says so when the numbers mean nothing (smoke)
run.require("groups.csv", "01_data_and_groups")
splits = run.splits()
print(f"teacher: {run.profile.teacher_arch} {run.profile.teacher_widths or ''}, "
      f"{len(splits['train'])} training instances")

# %% [markdown]
# ## Train (or reuse) the teacher, stage by stage
#
# Each stage is a checkpoint of its own, named by a fingerprint of what produced it
# (configuration, data, initial weights and library code): a rerun with the same inputs
# reuses it, any change trains a new file beside it.

# %%
stages = fk.teacher.train_teacher_stages(run)
for stage, res in stages.items():
    print(f"{stage}: " + ("reused " if res.reused else "trained into ") + res.checkpoint.name
          + f" (best validation epoch {res.best_epoch})")
result = list(stages.values())[-1]
cols = [c for c in ["epoch", "train_loss", "train_acc", "val_avg_acc", "val_worst_group_acc", "seconds"]
        if c in result.history]
result.history[cols].round(3)

# %% [markdown]
# The table is the last stage's training history. Validation here is that stage's own
# validation split (the corpus's, for the pretraining stage).
#
# ## Accuracy per group after each stage
#
# What each stage's teacher gets right on the study's test split, group by group. A
# worst group far above the student's (notebook 03) is what distillation can pass on.

# %%
stage_rows = []
for stage, res in stages.items():
    p = fk.train.predict(res.model, splits["test"], device=run.device)
    stage_rows += fk.metrics.metric_rows(p.probs, p.y, p.g, splits["test"].group_names, stage=stage)
stage_table = pd.DataFrame(stage_rows).pivot(index="group_name", columns="stage", values="acc")
stage_table[list(stages)].round(3)

# %% [markdown]
# ## Teacher logits for distillation
#
# Distillation needs the teacher's logits $t_i$ on every training instance (the KD term
# compares $\mathrm{softmax}(t_i/T)$ with the student's). They are computed once here and
# saved with the identity of the data they belong to; notebook 05 refuses logits of
# other data. (With training augmentation, the `paper` profile, the teacher is instead
# run on each augmented batch.)

# %%
logits = fk.teacher.save_teacher_logits(run, result)
{split: tuple(logits[split].shape) for split in splits}

# %% [markdown]
# ## Accuracy per group
#
# Rows with `model = teacher` go to `metrics.csv` (through `records/`).

# %%
rows = []
for split in ("val", "test"):
    ds = splits[split]
    probs = logits[split].double().softmax(1)
    rows += fk.students.record(run, probs, ds, model="teacher", method="erm",
                                 seed=fk.build.TEACHER_SEED, config_id="teacher",
                                 predictions=(split == "test"))
teacher_metrics = pd.DataFrame(rows)
teacher_metrics.pivot(index="group_name", columns="split", values="acc").round(3)

# %% [markdown]
# The same per group as bars, validation beside test. The teacher is what the students
# can at best inherit: a group it gets wrong is a group no distilled student will be
# taught to get right.

# %%
fig = fk.plots.group_accuracy_bars(teacher_metrics, hue="split", title="Teacher accuracy per group")
fk.plots.savefig(fig, run.figure("02_teacher_group_acc"), close=False)

# %%
test = teacher_metrics[teacher_metrics.split == "test"].set_index("group_name")
per_group = test.drop(index="all")
print(f"Teacher on test: average accuracy {test.loc['all', 'acc']:.3f}, worst group "
      f"'{per_group.acc.idxmin()}' at {per_group.acc.min():.3f}.")

# %% [markdown]
# The bars compare validation and test per group; the printed line is the number the
# calibration conditions refer to (condition (a) of the README's "The built-in
# miniature and the protocol").
#
# In this notebook we have trained (or reused) the teacher stage by stage, measured its
# accuracy per group after each stage, and saved its logits for the students.
