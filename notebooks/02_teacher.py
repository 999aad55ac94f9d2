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
# The teacher is a larger network trained by plain empirical risk minimisation (ERM) on
# the training split. It is the model every student distils from, so its own group
# accuracies bound what distillation can pass on: a teacher that is right on the
# minority groups gives the student something worth imitating there.
#
# The teacher is plain ERM and never sees group labels, so the checkpoint kept is the
# epoch with the best **validation average** accuracy (never test); the students are
# all selected on validation worst-group accuracy. Its logits on train, val and test are saved for distillation. With
# training augmentation (the `paper` profile) the saved logits are not used for
# training: the distillation runs the teacher on each augmented batch instead, so
# teacher and student always see the same crop.

# %% tags=["parameters"]
run_dir = None        # run directory (absolute); None: results/<dataset>-<profile>
figures_dir = None    # figures folder; None: figures/<dataset>-<profile>
profile = "smoke"     # smoke | default | paper
dataset = "synthetic" # synthetic | waterbirds | celeba | folder
data_root = None      # local folder for real datasets
seeds = None          # student seeds; None: the profile's
device = "auto"       # auto | cpu | cuda

# %%
import pandas as pd

import fairkd_utils as fk

run = fk.experiment.setup(run_dir, figures_dir, profile, dataset, data_root, seeds, device)
fk.experiment.require(run, "groups.csv", "01_data_and_groups")
splits = run.splits()
print(f"teacher: {run.profile.teacher_arch} {run.profile.teacher_widths or ''}, "
      f"{run.profile.teacher_epochs} epochs on {len(splits['train'])} training images")

# %%
result = fk.experiment.train_teacher(run)
print(("reused checkpoint " if result.reused else "trained into ") + str(result.checkpoint),
      f"(best validation epoch {result.best_epoch})")
cols = [c for c in ["epoch", "train_loss", "train_acc", "val_avg_acc", "val_worst_group_acc", "seconds"]
        if c in result.history]
result.history[cols].round(3)

# %% [markdown]
# ## Teacher logits for distillation

# %%
logits = fk.experiment.save_teacher_logits(run, result)
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
    rows += fk.experiment.record(run, probs, ds, model="teacher", method="erm",
                                 seed=fk.experiment.TEACHER_SEED, config_id="teacher",
                                 predictions=(split == "test"))
teacher_metrics = pd.DataFrame(rows)
teacher_metrics.pivot(index="group_name", columns="split", values="acc").round(3)

# %%
fig = fk.plots.group_accuracy_bars(teacher_metrics, hue="split", title="Teacher accuracy per group",
                                   palette={"val": "#a6cee3", "test": "#1f78b4"})
fk.plots.savefig(fig, run.figure("02_teacher_group_acc"), close=False)

# %%
test = teacher_metrics[teacher_metrics.split == "test"].set_index("group_name")
per_group = test.drop(index="all")
print(f"Teacher on test: average accuracy {test.loc['all', 'acc']:.3f}, worst group "
      f"'{per_group.acc.idxmin()}' at {per_group.acc.min():.3f}.")
