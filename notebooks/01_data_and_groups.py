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
# > **Read it executed, without running anything:** the reference run's copy of this
# > notebook, outputs included, is `results/reference/synthetic-default/executed/01_data_and_groups.ipynb`
# > (image miniature) and `results/reference/synthetic_text-default/executed/01_data_and_groups.ipynb`
# > (text miniature). Run as it stands, this notebook uses the `smoke` profile, whose
# > numbers mean nothing; the runner passes the real profile.
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
# **The text benchmark** (`--dataset synthetic_text` or `multinli`, the paper's own):
# the label is the relation of a hypothesis to a premise — contradiction, entailment or
# neutral (0, 1, 2, group_DRO's order) — and the spurious attribute is a negation word
# (*no, never, nothing, nobody*) in the hypothesis, which in MultiNLI co-occurs with
# "contradiction" (Gururangan et al. 2018): six groups $g = 2y + a$, the rare ones being
# entailment and neutral pairs *with* a negation. Everything below works the same way.
#
# In this notebook we will see the data: how many instances each group has per split,
# what they look like, how strongly label and background agree — and, for the built-in
# miniature, which knob controls each property and how the knobs were chosen.

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
from IPython.display import display

run = fk.rundir.setup(run_dir, figures_dir, profile, dataset, data_root, seeds, device,
                      profile_overrides=profile_overrides, teacher_model=teacher_model,
                      student_model=student_model)
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
# In the training split the majority groups hold the bulk of the data while the
# minority groups are one to two orders of magnitude smaller. How the other splits look
# depends on the benchmark. On the image data, validation and test are balanced in the
# background *within* each class — the test distribution of Waterbirds — so a
# background-reading model is exposed there even by its average accuracy. On the text
# data every split has the training proportions, as in MultiNLI: a shortcut loses no
# average accuracy from train to test, so only the per-group accuracies expose it,
# which is why the study reads worst-group accuracy.

# %% [markdown]
# ## What the groups look like

# %%
rng = np.random.default_rng(0)
train = splits["train"]
if run.dataset in fk.profiles.TEXT_DATASETS:  # text: a table of example pairs per group
    display(fk.synthetic_text.decode_pairs(train, n_per_group=3))
else:
    examples = {}
    for g, name in enumerate(train.group_names):
        idx = np.flatnonzero(train.g.numpy() == g)
        pick = rng.choice(idx, size=min(8, len(idx)), replace=False)
        examples[name] = [fk.data.to_display(train[i][0]) for i in pick]
    fig = fk.plots.group_samples(examples)
    fk.plots.savefig(fig, run.figure("01_group_samples"), close=False)

# %% [markdown]
# Images: each row is one group; each image one training instance. On the built-in data
# the bird is the small cross (landbird) or ring (waterbird), in any colour, anywhere; the
# background is the texture that fills the frame. Text: three pairs per group; on
# `synthetic_text` the words come from antonym pairs (*hot*/*cold*, *open*/*shut*, …), and the negation word
# (`no`, `never`, `nothing`, `nobody`) sits anywhere in the hypothesis without changing
# the label.
#
# ## The built-in miniature and its knobs
#
# `synthetic` is a miniature of Waterbirds with one knob per property of the benchmark
# (`fairkd_utils.synthetic_images.make_synthetic`):
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
# The knobs were set before any reweighting method was run, from the benchmark's own
# facts and from five conditions checked with the teacher, the ERM student and its
# exit, group-balanced ERM and plain KD only — so the comparison of notebook 05 can come
# out either way. The conditions, the values measured and how they were reached are in
# the README ("The built-in miniature and the protocol").
#
# **The text miniature** (`synthetic_text`, `fairkd_utils.synthetic_text.make_synthetic_text`)
# is built the same way. A premise is 3–5 words drawn from antonym pairs; the
# hypothesis restates some of them (entailment), swaps one for its antonym
# (contradiction) or brings a word absent from the premise (neutral); for 10 % of the
# pairs the hypothesis is a vague word that leaves the label undecided. A negation word
# is then added independently of the relation, with MultiNLI's group proportions, so the
# negation is a shortcut to "contradiction" exactly as strong as in MultiNLI. Its
# calibration (the README, "Calibrating the text miniature") scales the image targets to
# MultiNLI's own numbers.

# %% [markdown]
# ## How much does the spurious attribute tell?
#
# The *shortcut rule* predicts, for each value of the attribute $a$ (background,
# negation), the label most common with it in training. Its accuracy per split measures
# how much the attribute alone buys on average, its worst-group accuracy what it costs:
# by construction it gets every minority instance wrong (with three classes and two
# attribute values it also misses whole majority groups: it never predicts a third
# label). Also per split: the share of instances in minority groups and, per class, how
# often the attribute is present.

# %%
shortcut = {a: int(np.bincount(train.y.numpy()[train.a.numpy() == a], minlength=train.n_classes).argmax())
            for a in range(train.n_attrs)}
minority = fk.metrics.minority_groups(train.group_counts(), train.n_attrs)


def agreement(ds):
    y, a = ds.y.numpy(), ds.a.numpy()
    rule = np.vectorize(shortcut.get)(a)                  # the shortcut rule's label per instance
    row = {"n": len(y), "shortcut_rule_acc": fk.metrics.avg_acc(rule, y),
           "shortcut_rule_worst_group_acc": fk.metrics.worst_group_acc(fk.metrics.group_accuracy(rule, y, ds.g)),
           "minority_share": float(np.isin(ds.g.numpy(), minority).mean())}
    row.update({f"P(a=1 | y={k})": float(a[y == k].mean()) for k in range(ds.n_classes)})
    return row

agreement_table = pd.DataFrame({name: agreement(ds) for name, ds in splits.items()}).T
agreement_table.round(3)

# %%
acc = agreement_table["shortcut_rule_acc"]
worst = agreement_table["shortcut_rule_worst_group_acc"]
print(f"A rule that reads only the spurious attribute is {acc['train']:.1%} accurate on train "
      f"and {acc['test']:.1%} on test, with worst-group accuracy {worst['test']:.1%} on test "
      f"(shortcut: attribute value -> label {shortcut}).")

# %% [markdown]
# In this notebook we have written the group table every later notebook reads, seen the
# groups, and measured what a rule that reads only the spurious attribute gets right on
# average and what it gets wrong: every minority instance — the failure the whole study
# is about.
