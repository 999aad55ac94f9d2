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
# # 05 — DeDiER vs Laplace-KD: the distillation comparison
#
# Every student starts, for a given seed, from the same initialisation and distils from
# the same teacher. The loss per instance is
#
# $$L_i = (1-\lambda)\, w^{ce}_i\, \mathrm{CE}(s_i, y_i) + \lambda\, w^{kd}_i\, T^2\,
#   \mathrm{KL}\big(\mathrm{softmax}(t_i/T)\,\|\,\mathrm{softmax}(s_i/T)\big),$$
#
# with weights that carry no gradient, normalised to mean 1 per batch, and unit weights
# during the same warm-up for every reweighting method:
#
# | method | weight | on |
# |---|---|---|
# | `erm` | — ($\lambda = 0$) | CE |
# | `kd` (Hinton) | 1 | both |
# | `dedier` | $\exp(\beta\,\mathrm{cm}\,\alpha)$ of the early exit's MAP softmax, $\alpha = 1$ when the exit is wrong | KD |
# | `dedier_both` | the same | both |
# | `laplace_kd` | from the exit's Laplace predictive (score chosen in notebook 04), refit every epoch from that epoch's batches | both |
# | `group_balanced` | inverse frequency of the **true** group — labels the methods never see: a reference for the headroom, not a method | both |
#
# Hyper-parameters ($\lambda, T, \beta$) come from `fairkd_utils/hparams.json`, chosen on
# **validation** worst-group accuracy with the same grid for every method; set
# `sweep = True` to rerun that choice (its table is shown below when present).

# %% tags=["parameters"]
run_dir = None        # run directory (absolute); None: results/<dataset>-<profile>
figures_dir = None    # figures folder; None: figures/<dataset>-<profile>
profile = "smoke"     # smoke | default | paper
dataset = "synthetic" # synthetic | waterbirds | celeba | folder
data_root = None      # local folder for real datasets
seeds = None          # student seeds; None: the profile's
device = "auto"       # auto | cpu | cuda
sweep = None          # None: the profile's setting; True reruns the hyper-parameter sweep

# %%
import json

import pandas as pd
from tqdm import tqdm

import fairkd_utils as fk

run = fk.experiment.setup(run_dir, figures_dir, profile, dataset, data_root, seeds, device)
teacher = fk.experiment.load_teacher_logits(run)          # stops if notebook 02 has not run
methods = list(run.profile.methods)
do_sweep = run.profile.sweep if sweep is None else bool(sweep)

# %% [markdown]
# ## How the hyper-parameters were chosen

# %%
if do_sweep:
    sweep_table, chosen = fk.experiment.sweep(run, [m for m in methods if m != "erm"], run.seeds[0], teacher)
    print("chosen on validation worst-group accuracy:", json.dumps(chosen, indent=1))
    print("(written to sweep/hparams_chosen.json; copy it into fairkd_utils/hparams.json to adopt it)")
    display(sweep_table.sort_values(["method", "val_worst_group_acc"], ascending=[True, False]).round(3))
reference_sweep = fk.experiment.REPO_ROOT / "results" / "reference" / "synthetic-default" / "sweep.csv"
if reference_sweep.exists():
    print("The committed choice came from this sweep (reference run, seed 0, validation split):")
    display(pd.read_csv(reference_sweep).sort_values(["method", "val_worst_group_acc"],
                                                      ascending=[True, False]).round(3))

# %%
configs = {m: fk.experiment.method_config(run, m) for m in methods}
print("hyper-parameters from", fk.experiment.hparams_source(run)[1])
pd.DataFrame([{**c.to_dict(), "config_id": c.config_id} for c in configs.values()]).set_index("method")

# %% [markdown]
# ## Train (or reuse) every method × seed
#
# `erm` is notebook 03's student, reused from its checkpoint. Each student's metrics,
# test predictions, per-epoch mean weights per group and final training-set weights are
# written as record files of their own.

# %%
jobs = [(seed, m) for seed in run.seeds for m in methods]
for seed, method in tqdm(jobs, desc="students"):
    result = fk.experiment.run_method(run, method, seed, teacher, configs[method])
    tqdm.write(f"seed {seed} {method:15s} {'reused' if result.reused else 'trained'} "
               f"(best val epoch {result.best_epoch})")

# %% [markdown]
# ## The tables

# %%
metrics = fk.records.assemble(run.run_dir, "metrics")
predictions = fk.records.assemble(run.run_dir, "predictions")
weights = fk.records.assemble(run.run_dir, "weights")
groups = pd.read_csv(run.path("groups.csv"))
chosen = pd.DataFrame([{"method": m, "config_id": c.config_id} for m, c in configs.items()])
per_seed = fk.experiment.per_seed_metrics(metrics, groups).merge(chosen)
per_seed = per_seed[per_seed.seed.isin(run.seeds)]   # records of other seeds may be lying around
summary = fk.experiment.summary_table(per_seed)
fk.records.write_csv(run.path("summary.csv"), summary)
print({name: len(t) for name, t in [("metrics", metrics), ("predictions", predictions),
                                     ("weights", weights), ("summary", summary)]})

# %% [markdown]
# ### Test metrics over seeds: mean ± std [95 % interval]

# %%
def fmt(r):
    return f"{r['mean']:.3f} ± {r['std']:.3f} [{r['ci95_lo']:.3f}, {r['ci95_hi']:.3f}]"

summary.assign(value=summary.apply(fmt, axis=1)).pivot(index="method", columns="metric", values="value") \
    .reindex([m for m in fk.plots.METHOD_ORDER if m in methods])[list(fk.experiment.SUMMARY_METRICS)]

# %% [markdown]
# ### Paired per-seed differences against `kd` (same seed, same initialisation)

# %%
diff_cols = [c for c in summary.columns if c.startswith("diff_vs_kd")]
summary[summary.metric.isin(["worst_group_acc", "avg_acc"]) & (summary.method != "kd")] \
    [["method", "metric", *diff_cols]].round(3)

# %%
per_seed.pivot_table(index="method", columns="seed", values="worst_group_acc").round(3)

# %% [markdown]
# ### Who got upweighted during training?

# %%
fig = fk.plots.weights_by_group(weights[weights.method.isin(fk.experiment.REWEIGHTING)], term="kd")
fk.plots.savefig(fig, run.figure("05_weights_by_group"), close=False)

# %% [markdown]
# ## What happened
#
# The numbers below are computed, not written by hand: which method has the best mean
# test worst-group accuracy, and whether Laplace-KD's paired difference to DeDiER is
# distinguishable from zero over these seeds.

# %%
wga = summary[summary.metric == "worst_group_acc"].set_index("method")
ranked = wga.drop(index="group_balanced", errors="ignore")["mean"].sort_values(ascending=False)
print("Mean test worst-group accuracy, best first (group_balanced is the reference, excluded):")
for m, v in ranked.items():
    print(f"  {m:12s} {v:.3f} ± {wga.loc[m, 'std']:.3f}")
if {"dedier", "laplace_kd"} <= set(per_seed.method):
    d = (per_seed[per_seed.method == "laplace_kd"].set_index("seed").worst_group_acc
         - per_seed[per_seed.method == "dedier"].set_index("seed").worst_group_acc).dropna()
    mean, sd, lo, hi = fk.experiment.mean_interval(d)
    verdict = ("better" if lo > 0 else "worse" if hi < 0 else "not distinguishable from DeDiER")
    print(f"Laplace-KD − DeDiER, worst-group accuracy, paired over {len(d)} seeds: {mean:+.3f} "
          f"(95 % interval [{lo:+.3f}, {hi:+.3f}]) -> {verdict}.")
