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
# > **Read it executed, without running anything:** the reference run's copy of this
# > notebook, outputs included, is `results/reference/synthetic-default/executed/05_distillation_comparison.ipynb`
# > (image miniature) and `results/reference/synthetic_text-default/executed/05_distillation_comparison.ipynb`
# > (text miniature). Run as it stands, this notebook uses the `smoke` profile, whose
# > numbers mean nothing; the runner passes the real profile.
#
# In this notebook we will train every method's students over seeds and compare them on
# test worst-group accuracy, paired per seed. For a given seed every student starts from
# the same initialisation, sees the data in the same order and distils from the same
# teacher (one teacher, shared by all seeds). The loss per instance is
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
# | `laplace_kd` | the same form, $\mathrm{cm}$ and $\alpha$ from the exit's **Laplace predictive**, refit every epoch from that epoch's batches | both |
# | `shuffled` (control) | `dedier_both`'s weights permuted within the batch | both |
# | `group_balanced` (reference) | inverse frequency of the **true** group — labels the methods never see | both |
# | `group_balanced_erm` (reference) | the same at $\lambda = 0$ | CE |
#
# With `methods = "extended"` (the runner's `--methods extended`) three baselines join:
#
# | method | weight | on |
# |---|---|---|
# | `dedier_final` (ablation) | DeDiER's $\exp(\beta\,\mathrm{cm}\,\alpha)$ read from the student's own **final** head instead of the early exit | both |
# | `jtt` (Liu et al., 2021) | $\lambda_{up}$ on the training instances the ERM student gets wrong after $T_{id}$ of its epochs, 1 elsewhere (= upsampling them, in expectation) | both |
# | `dfr` (reference; Kirichenko et al., 2023) | none: `kd`'s student with its last layer retrained on group-balanced halves of the **validation** split | — |
#
# The primary contrast is `laplace_kd` against `dedier_both`: both weight both terms, so
# they differ only in where $\mathrm{cm}$ and $\alpha$ come from. $\lambda$ and $T$ are chosen
# once, for `kd`, and shared by every distillation method; $\beta$ per reweighting method
# on the same grid (`shuffled` takes `dedier_both`'s); all on **validation** worst-group
# accuracy averaged over two seeds. Every distillation method is `kd` until its warm-up
# ends, so each seed's warm-up is computed once and every method branches from it (a
# test checks that a branch ends exactly where a run from scratch ends).

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
hparams_file = None   # chosen hyper-parameters; None: fairkd_utils/hparams.json's entry for this run
sweep = None          # None: the profile's setting; True reruns the sweep and uses its choice
sweep_seeds = None    # seeds the sweep averages over; None: the first two of `seeds`
executor = "inline"   # inline | local | slurm: where the students and the sweep train
workers = None        # local: processes at once, default one per GPU or core; slurm: tasks at once
threads = None        # torch threads per job; None: all cores inline, cores / workers locally
slurm = None          # for executor slurm: a dict with partition, time, gpus, cpus
methods = None        # None: the profile's methods; "extended" adds jtt, dfr and dedier_final

# %%
import pandas as pd
import torch

import fairkd_utils as fk

run = fk.rundir.setup(run_dir, figures_dir, profile, dataset, data_root, seeds, device,
                      hparams_file=hparams_file, profile_overrides=profile_overrides,
                      teacher_model=teacher_model, student_model=student_model, methods=methods)
fk.rundir.print_profile_note(run)   # says so when the numbers mean nothing (smoke)
teacher = fk.study.load_teacher_logits(run)          # stops if notebook 02 has not run
methods = list(fk.profiles.resolve_methods(run.profile, methods))
print("methods:", ", ".join(methods))
do_sweep = run.profile.sweep if sweep is None else bool(sweep)
jobs_options = fk.jobs.options(executor, workers, threads, slurm)   # checked before any training

# %% [markdown]
# ## The hyper-parameters

# %%
if do_sweep:
    sweep_table, chosen = fk.jobs.run_sweep(run, sweep_seeds or run.seeds[:2], teacher, methods,
                                            jobs_options)
    run.hparams_file = str(run.path("sweep", "hparams.json"))
    display(sweep_table.groupby(["method", "lam", "T", "beta"])[["val_worst_group_acc", "val_avg_acc"]]
            .mean().round(3))
configs = {m: fk.study.method_config(run, m) for m in methods}
print("hyper-parameters from", fk.study.hparams_source(run))
pd.DataFrame([{**c.to_dict(), "config_id": c.config_id} for c in configs.values()]).set_index("method")

# %% [markdown]
# Every distillation method has kd's $\lambda$ and $T$; only the weights differ. (With
# `sweep = True` the table above shows the validation means behind the choice.)
#
# ## One batch, weighted by DeDiER and by Laplace-KD
#
# The weights come from the same library functions the training loop calls. Here: the
# first seed's ERM student of notebook 03, its exit Laplace fitted on the training split,
# and the first 8 minority-group instances of the training split, with $\beta$ as chosen.

# %%
erm_result, erm_out = fk.study.erm_outputs(run, run.seeds[0], splits=("train",))
train = run.splits()["train"]
exit_la = fk.exit_laplace.fit_exit_laplace(erm_result.model.exit, erm_out["train"].phi.double(),
                                           erm_out["train"].exit_probs, y=train.y)
minority = fk.study.minority_groups(train.group_counts(), train.n_attrs)
batch = torch.nonzero(torch.isin(train.g, torch.tensor(minority))).flatten()[:8]
exit_logits, phi, y = erm_out["train"].exit_logits[batch].double(), erm_out["train"].phi[batch].double(), train.y[batch]
lap = exit_la.predict(phi)
pd.DataFrame({
    "group": [train.group_names[g] for g in train.g[batch].tolist()],
    "exit p(y) MAP": exit_logits.softmax(1).gather(1, y[:, None]).squeeze(1).numpy(),
    "exit p(y) Laplace": lap.probs.gather(1, y[:, None]).squeeze(1).numpy(),
    "w DeDiER": fk.losses.dedier_weight(exit_logits, y, configs["dedier_both"].beta).numpy(),
    "w Laplace-KD": fk.losses.laplace_weight(lap, y, configs["laplace_kd"].beta).numpy(),
}).round(3)

# %% [markdown]
# Where the exit is confidently wrong ($p(y)$ near 0), both weights approach
# $e^{\beta}$; the Laplace predictive pulls the probability towards 1/2, so Laplace-KD's
# weight is a little smaller exactly where the exit's features are atypical.
#
# ## Train (or reuse) every method × seed
#
# `erm` is notebook 03's student, reused from its checkpoint. Each student is a job that
# writes its own records — metrics, test predictions, per-epoch mean weights per group,
# final training-set weights — and a stamp with its fingerprint: a job already done
# with the same fingerprint is skipped. The jobs run here one after another
# (`executor = "inline"`), as worker processes (`local`) or as a SLURM job array
# (`slurm`); a failed job is named with its log once the others have finished.

# %%
job_table = fk.jobs.run_grid(run, configs, jobs_options, teacher)
job_table[["job", "status", "reused", "seconds"]]

# %% [markdown]
# ## The tables

# %%
metrics = fk.records.assemble(run.run_dir, "metrics")
predictions = fk.records.assemble(run.run_dir, "predictions")
weights = fk.records.assemble(run.run_dir, "weights")
groups = pd.read_csv(run.path("groups.csv"))
chosen = pd.DataFrame([{"method": m, "config_id": c.config_id} for m, c in configs.items()])
per_seed = fk.metrics.per_seed_metrics(metrics, groups).merge(chosen)
per_seed = per_seed[per_seed.seed.isin(run.seeds)]   # records of other seeds may be lying around
summary = fk.metrics.summary_table(per_seed)
fk.records.write_csv(run.path("summary.csv"), summary)
print({name: len(t) for name, t in [("metrics", metrics), ("predictions", predictions),
                                     ("weights", weights), ("summary", summary)]})

# %% [markdown]
# ### Test metrics over seeds: mean ± std [95 % interval]

# %%
def fmt(r):
    return f"{r['mean']:.3f} ± {r['std']:.3f} [{r['ci95_lo']:.3f}, {r['ci95_hi']:.3f}]"

summary.assign(value=summary.apply(fmt, axis=1)).pivot(index="method", columns="metric", values="value") \
    .reindex([m for m in fk.plots.METHOD_ORDER if m in methods])[list(fk.metrics.SUMMARY_METRICS)]

# %% [markdown]
# ### Paired per-seed differences (same seed, same initialisation)
#
# Against `kd` (does reweighting help at all?) and against `dedier_both` (does the
# Laplace predictive help over the MAP readout?): mean difference with its 95 % interval.

# %%
wga_rows = summary[summary.metric == "worst_group_acc"].set_index("method")
pd.DataFrame({f"vs {b}": wga_rows.apply(lambda r, b=b: "" if pd.isna(r.get(f"diff_vs_{b}_mean")) else
                                          f"{r[f'diff_vs_{b}_mean']:+.3f} [{r[f'diff_vs_{b}_ci95_lo']:+.3f}, "
                                          f"{r[f'diff_vs_{b}_ci95_hi']:+.3f}]", axis=1)
              for b in fk.profiles.BASELINES}).reindex([m for m in fk.plots.METHOD_ORDER if m in methods])

# %%
per_seed.pivot_table(index="method", columns="seed", values="worst_group_acc").round(3)

# %% [markdown]
# ### Who got upweighted during training?
#
# The mean weight per group at each epoch (1 during the warm-up). A method that finds
# the minority groups lifts their lines above 1; `shuffled` should stay flat by design.

# %%
fig = fk.plots.weights_by_group(weights[weights.method.isin(fk.profiles.REWEIGHTING)])
fk.plots.savefig(fig, run.figure("05_weights_by_group"), close=False)

# %% [markdown]
# ### DFR: which strength did the other half of validation choose?
#
# Per seed, the worst-group and average accuracy on the *second* half of the validation
# split of the last layer fitted (on balanced subsamples of the first half) at each
# inverse strength $C$; the chosen one is marked. Test is never looked at.

# %%
if "dfr" in methods:
    dfr_table = fk.records.assemble(run.run_dir, "dfr")
    dfr_table = dfr_table[dfr_table.seed.isin(run.seeds) & (dfr_table.config_id == configs["dfr"].config_id)]
    display(dfr_table.pivot_table(index="C", columns="seed", values="val_half2_worst_group_acc")
            .sort_index(ascending=False).round(3))
    print("chosen C per seed:", dict(zip(dfr_table[dfr_table.chosen].seed, dfr_table[dfr_table.chosen].C)))

# %% [markdown]
# ### How far is Laplace-KD from DeDiER?
#
# Per epoch of Laplace-KD training: the Spearman correlation between its weights and the
# DeDiER weights the same exit gives the same instances, and the largest and mean change
# $|p_{\text{Laplace}} - p_{\text{MAP}}|$ of the exit's probabilities (mean over seeds).

# %%
if "laplace_kd" in methods:
    effect = fk.records.assemble(run.run_dir, "laplace_effect")
    effect = effect[effect.seed.isin(run.seeds) & (effect.config_id == configs["laplace_kd"].config_id)]
    display(effect.groupby("epoch")[list(fk.study.LAPLACE_EFFECT)].mean().round(4))

# %% [markdown]
# ## What happened
#
# Computed, not written by hand: the ranking by mean test worst-group accuracy, and the
# primary contrast — Laplace-KD minus DeDiER (both terms), paired over seeds.

# %%
wga = summary[summary.metric == "worst_group_acc"].set_index("method")
references = [m for m in fk.profiles.REFERENCES if m in wga.index]
ranked = wga.drop(index=references)["mean"].sort_values(ascending=False)
print(f"Mean test worst-group accuracy, best first (references {references} use group labels, excluded):")
for m, v in ranked.items():
    print(f"  {m:12s} {v:.3f} ± {wga.loc[m, 'std']:.3f}")


def against_dedier_both(method):
    """``method`` − dedier_both, paired: the row, its 95 % interval and a verdict."""
    r = wga.loc[method]
    lo, hi = r["diff_vs_dedier_both_ci95_lo"], r["diff_vs_dedier_both_ci95_hi"]
    verdict = ("better than" if lo > 0 else "worse than" if hi < 0 else "not distinguishable from")
    return r, lo, hi, verdict


if {"dedier_both", "laplace_kd"} <= set(wga.index):
    r, lo, hi, verdict = against_dedier_both("laplace_kd")
    print(f"Laplace-KD − DeDiER (both terms), worst-group accuracy, paired over "
          f"{int(r['paired_seeds_vs_dedier_both'])} seeds: {r['diff_vs_dedier_both_mean']:+.3f} "
          f"(95 % interval [{lo:+.3f}, {hi:+.3f}]) -> Laplace-KD is {verdict} DeDiER here.")
if {"dedier_both", "dedier_final"} <= set(wga.index):
    r, lo, hi, verdict = against_dedier_both("dedier_final")
    print(f"Does the readout have to be early? DeDiER read from the final head − from the early "
          f"exit, worst-group accuracy, paired over {int(r['paired_seeds_vs_dedier_both'])} seeds: "
          f"{r['diff_vs_dedier_both_mean']:+.3f} (95 % interval [{lo:+.3f}, {hi:+.3f}]) -> the "
          f"final-head readout is {verdict} the early one here.")

# %% [markdown]
# In this notebook we have chosen (or read) the hyper-parameters on validation, shown one
# batch's weights under both methods, trained every method over the seeds from shared
# warm-ups (with `methods = "extended"`: also JTT, DFR and the final-head readout), and
# written `summary.csv` with paired differences against `kd` and `dedier_both`.
# Notebook 06 draws the summary figures from these tables alone.
