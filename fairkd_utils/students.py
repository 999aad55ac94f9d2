"""One student's training as a plan (model, objective, loop config, checkpoint),
its warm-up branch, and the records it writes: metrics, predictions, per-epoch weights,
final training weights and Laplace-KD's per-epoch effect; JTT's error set and DFR's
last-layer refit, the two baselines that need a student of their own first."""

from __future__ import annotations
import dataclasses
import functools
from pathlib import Path
import numpy as np
import pandas as pd
import torch
from . import checkpoints, data, laplace_source, last_layer, losses, metrics, models, records, train
from .exit_laplace import fit_exit_laplace, fit_on_subset
from .profiles import METHOD_SPECS, REWEIGHTING
from .rundir import Run
from .build import _Timed, build_student, timed, train_config
from .hparams import method_config
from .teacher import teacher_for_students


@dataclasses.dataclass
class StudentPlan:
    """One student's training, set up but not run: the model at its initialisation,
    the objective, the loop's config and the checkpoint it trains into. Its
    :attr:`fingerprint` is the one :func:`train.train_model` gives the checkpoint, so
    what a training would produce is known before it runs (``jobs`` skips on it)."""
    run: Run
    config: object
    seed: int
    model: torch.nn.Module
    objective: object
    train_config: train.TrainConfig
    ckpt_dir: Path
    teacher_train: object = None

    @property
    def name(self) -> str:
        return f"student-{self.config.method}-seed{self.seed}"

    @property
    def stage(self) -> str:
        return "sweep" if Path(self.ckpt_dir) != self.run.path("checkpoints") else "student"

    @functools.cached_property
    def fingerprint(self) -> str:
        return checkpoints.fingerprint_payload(self.model, self.run.splits(), self.train_config,
                                               self.objective, self.name,
                                               self.run.fingerprint_extra())[0]

    @property
    def checkpoint(self) -> Path:
        return checkpoints.checkpoint_path(self.ckpt_dir, self.name, self.fingerprint)

    @property
    def shares_warmup(self) -> bool:
        """Whether it branches from its seed's shared warm-up (:func:`shares_warmup`;
        never with an online teacher, whose batches are augmented)."""
        return (shares_warmup(self.config, self.train_config)
                and not isinstance(self.teacher_train, losses.OnlineTeacher))

    def _warmup(self, fn):
        """``fn`` (``train.warmup_checkpoint`` or ``train.train_warmup``) called on the
        warm-up it branches from."""
        ds = self.run.splits()["train"]
        trunk = build_student(self.run, self.seed)
        warm = losses.warmup_objective(self.config, self.teacher_train, len(ds), ds.n_classes)
        return fn(trunk, self.run.splits(), self.train_config, warm, self.config.warmup_epochs,
                  ckpt_dir=self.ckpt_dir, name=f"warmup-seed{self.seed}",
                  fingerprint_extra=self.run.fingerprint_extra())

    def warmup_checkpoint(self) -> Path | None:
        """The file of the warm-up it branches from (None when it branches from none)."""
        return self._warmup(train.warmup_checkpoint)[1] if self.shares_warmup else None

    def train_warmup(self) -> dict:
        """Train (or reuse) the warm-up it branches from: every method of this seed
        with the same lam and T shares it."""
        return self._warmup(train.train_warmup)

    def train(self):
        """Train (or reuse) the student, branching from the shared warm-up (computed
        only if the student is trained), its wall time recorded by :func:`timed`."""
        branch = self.train_warmup if self.shares_warmup else None
        return timed(self.run, self.stage, f"{self.stage}-{self.name}-{self.config.config_id}",
                     lambda: train.train_model(self.model, self.run.splits(), self.train_config,
                                               self.objective, ckpt_dir=self.ckpt_dir, name=self.name,
                                               fingerprint_extra=self.run.fingerprint_extra(),
                                               branch_from=branch))


def plan_student(run: Run, config, seed: int, teacher=None, ckpt_dir=None,
                 progress: bool = True) -> StudentPlan:
    """Set up (not run) the student of ``config`` and ``seed``: see :func:`train_student`.
    ``teacher``: the dict of :func:`load_teacher_logits` (read when needed and None)."""
    ds = run.splits()["train"]
    model = build_student(run, seed)
    teacher_train = teacher_for_students(run, teacher) if config.lam > 0 else None
    stage = "sweep" if ckpt_dir is not None and Path(ckpt_dir) != run.path("checkpoints") else "student"
    error_set = (jtt_error_set(run, config, seed, progress=progress, stage=stage)
                 if METHOD_SPECS[config.method].weight == "error_set" else None)
    counts = ds.group_counts()
    top_k = int(sum(counts[g] for g in metrics.minority_groups(counts, ds.n_attrs)))
    objective = losses.make_objective(config, teacher_logits=teacher_train, group_counts=counts,
                                      n_train=len(ds), n_classes=ds.n_classes, model=model, seed=seed,
                                      error_set=error_set, top_k=top_k, val=run.splits()["val"])
    return StudentPlan(run, config, seed, model, objective,
                       train_config(run, "student", seed, progress=progress),
                       Path(ckpt_dir or run.path("checkpoints")), teacher_train)


def train_student(run: Run, config, seed: int, teacher=None, ckpt_dir=None, progress: bool = True):
    """Train (or reuse) one student with its early exit under ``config``.

    Every method starts from the same initialisation for a given seed. ``teacher``:
    the dict of :func:`load_teacher_logits` (needed when ``config.lam > 0``).
    With training augmentation (``paper`` profile) the teacher model itself is run
    on each augmented batch instead of the cached logits."""
    return plan_student(run, config, seed, teacher, ckpt_dir, progress).train()


def jtt_error_set(run: Run, config, seed: int, progress: bool = False,
                  stage: str = "student") -> torch.Tensor:
    """JTT's error set for ``config`` (a ``jtt`` configuration) and ``seed``: the training
    instances that the identification model — the ERM student of this seed (lam = 0,
    the profile's schedule) after ``config.jtt_epochs`` epochs of its trajectory —
    predicts wrongly (final head, eval mode). A (N_train,) bool tensor in dataset order.

    The trajectory is trained with the same loop as every student, as a warm-up state
    (``train.train_warmup``) named ``warmup-seed<S>`` in the run's checkpoints: cached by
    fingerprint, shared by every jtt configuration and the sweep, and, at
    ``jtt_epochs == warmup_epochs``, the very warm-up the ERM students of notebook 03
    branch from. ``stage``: the timing record's stage (``"sweep"`` in the sweep); the
    record is named after ``config`` (one per job: two jtt configurations of one seed
    share the identification model, not the record)."""
    splits = run.splits()
    ds = splits["train"]
    epochs = int(config.jtt_epochs)
    erm = losses.default_config("erm", warmup_epochs=run.profile.warmup_epochs)
    tconfig = train_config(run, "student", seed, progress=progress)
    if not 0 < epochs < tconfig.epochs:
        raise ValueError(f"jtt_epochs={epochs}: the identification model is the ERM student after "
                         f"that many of its {tconfig.epochs} epochs, so it must lie in "
                         f"[1, {tconfig.epochs - 1}]")
    trunk = build_student(run, seed)
    warm = losses.warmup_objective(erm, None, len(ds), ds.n_classes)
    state = timed(run, stage, f"jtt-identification-{config.config_id}-seed{seed}", lambda: _Timed(
        train.train_warmup(trunk, splits, tconfig, warm, epochs, ckpt_dir=run.path("checkpoints"),
                           name=f"warmup-seed{seed}", fingerprint_extra=run.fingerprint_extra())))
    model = build_student(run, seed)
    model.load_state_dict(state.value["model"])
    pred = train.predict(model, ds, device=run.device)
    return pred.logits.argmax(1) != ds.y


def shares_warmup(config, train_config) -> bool:
    """Whether the student of ``config`` branches from its seed's shared warm-up. Until
    its warm-up ends every method trains with unit weights, so all methods with the
    same lam and T share it: every distillation method is kd then, and ``erm`` and
    ``group_balanced_erm`` (lam = 0) are the same cross-entropy. Not laplace_kd_subset:
    its first posterior is fit on a subset of the warm-up's last epoch, which the shared
    warm-up's factors (all instances) do not hold, so it trains its warm-up itself."""
    return 0 < config.warmup_epochs < train_config.epochs and config.laplace_subset is None


def _record_name(model: str, method: str, config_id: str, seed: int, predictive: str, split: str) -> str:
    return f"{model}-{method}-{config_id}-seed{seed}-{predictive}-{split}"


def _config_name(config, seed: int) -> str:
    """The name of the records of ``config`` and ``seed`` that are not per model and split."""
    return f"{config.method}-{config.config_id}-seed{seed}"


def _keyed(frame: pd.DataFrame, config, seed: int) -> pd.DataFrame:
    """``frame`` with the columns seed, method and config_id put in front (in place)."""
    for column, value in (("config_id", config.config_id), ("method", config.method), ("seed", seed)):
        frame.insert(0, column, value)
    return frame


def _confidence(probs, y) -> dict:
    """Per-instance top probability, confidence margin and correctness of ``probs``."""
    return {"prob": probs.max(1).values.numpy(), "margin": losses.confidence_margin(probs).numpy(),
            "correct": (probs.argmax(1) == y).numpy()}


def prediction_frame(probs, ds, *, keys: dict, weight=None, variance=None):
    """Per-instance rows of ``predictions.csv`` for one model on one split."""
    def column(values):
        return np.full(len(ds), np.nan) if values is None else np.asarray(values, dtype=float)

    return pd.DataFrame({
        "id": list(ds.ids), "split": ds.split, "group": ds.g.numpy(), "y": ds.y.numpy(),
        **{k: keys[k] for k in ("seed", "model", "method", "config_id", "predictive")},
        **_confidence(probs.double(), ds.y), "weight": column(weight), "variance": column(variance),
    })


def record(run: Run, probs, ds, *, model: str, method: str, seed: int, config_id: str,
           predictive: str = "map", weight=None, variance=None, predictions: bool = True) -> list[dict]:
    """Write this model's metrics (per group and overall) and, optionally, its
    per-instance predictions on ``ds`` as record files of their own."""
    keys = dict(seed=seed, config_id=config_id, model=model, method=method,
                predictive=predictive, split=ds.split)
    rows = metrics.metric_rows(probs, ds.y, ds.g, ds.group_names, **run.keys(**keys))
    name = _record_name(**keys)
    records.write_record(run.run_dir, "metrics", name, rows)
    if predictions:
        records.write_record(run.run_dir, "predictions", name,
                             prediction_frame(probs, ds, keys=keys, weight=weight, variance=variance))
    return rows


def evaluate_student(run: Run, result, config, seed: int, splits=("val", "test")) -> dict:
    """Record the student's final head and its exit on ``splits`` (predictions on
    test only, to keep ``predictions.csv`` small); return the raw predictions."""
    preds = {}
    for split in splits:
        ds = run.splits()[split]
        p = preds[split] = train.predict(result.model, ds, device=run.device)
        for model_name, probs in (("student", p.probs), ("exit", p.exit_probs)):
            record(run, probs, ds, model=model_name, method=config.method, seed=seed,
                   config_id=config.config_id, predictions=(split == "test"))
    return preds


def record_weights(run: Run, result, config, seed: int):
    """The per-epoch mean instance weight per group, tidy, as its own record."""
    w = result.weights
    if w is None or not len(w):
        return pd.DataFrame()
    names = run.splits()["train"].group_names
    tidy = w.melt(id_vars=["epoch", "group", "n"], value_vars=["mean_weight_ce", "mean_weight_kd"],
                  var_name="term", value_name="weight")
    tidy["term"] = tidy["term"].str.replace("mean_weight_", "", regex=False)
    _keyed(tidy, config, seed)
    tidy["group_name"] = [names[g] for g in tidy["group"]]
    records.write_record(run.run_dir, "weights", _config_name(config, seed), tidy)
    return tidy


def erm_outputs(run: Run, seed: int, splits=("train", "val", "test")) -> tuple:
    """The ERM student of notebook 03 (reused, never retrained here) and its
    predictions (logits, exit logits, phi) on ``splits``."""
    config = method_config(run, "erm")
    name = _record_name("student", "erm", config.config_id, seed, "map", "test")
    run.require(f"records/metrics/{name}.csv", "03_early_exit_student")
    result = train_student(run, config, seed)
    if not result.reused:
        raise FileNotFoundError(f"the ERM student of seed {seed} was not found (its checkpoint is "
                                "missing or from another configuration): rerun notebook "
                                "03_early_exit_student")
    return result, {s: train.predict(result.model, run.splits()[s], device=run.device) for s in splits}


def final_train_weights(run: Run, result, config, pred=None, seed: int | None = None):
    """The instance weights the method assigns on the training split with the final
    student (before batch normalisation): what the weight-distribution figures show.
    ``None`` for methods that do not reweight. ``shuffled``'s are DeDiER's weights
    permuted over the split (its batches permute them within each batch); ``jtt``'s
    do not depend on the student (its error set, of ``seed``'s identification model)."""
    ds = run.splits()["train"]
    source = METHOD_SPECS[config.method].weight
    if source == "none":
        return None
    inputs = losses.WeightInputs(generator=torch.Generator().manual_seed(0), n_attrs=ds.n_attrs,
                                 group_weights=losses.group_balanced_weight(
                                     torch.arange(ds.n_groups), ds.group_counts()))
    out = None
    if source == "error_set":
        if seed is None:
            raise ValueError("jtt's training weights need the seed of its identification model")
        inputs.error_set = jtt_error_set(run, config, seed)
    elif source != "true_group":  # the sources that read the student
        p = pred if pred is not None else train.predict(result.model, ds, device=run.device)
        out = models.StudentOutput(p.logits.double(), p.exit_logits.double(), p.phi.double())
    if source == "exit_laplace":  # fit on the whole split, predictive drawn with seed 0
        val_ds = run.splits()["val"]
        inputs.laplace = laplace_source.LaplaceSource(config, result.model, len(ds), val=val_ds)
        fit = dict(y=ds.y, prior=config.prior, tau=config.tau)
        if config.prior == "meronen":  # var0 and temperature on the final exit's validation NLL
            v = train.predict(result.model, val_ds, device=run.device)
            fit.update(phi_val=v.phi.double(), y_val=v.y)
        args = (result.model.exit, p.phi.double(), p.exit_probs)
        if config.laplace_subset is None:
            inputs.laplace.posterior = fit_exit_laplace(*args, **fit)
        else:  # laplace_kd_subset: on its subset of epoch 0 of the seed (0 if not given)
            idx = laplace_source.laplace_subset_indices(len(ds), config.laplace_subset, seed or 0, 0)
            inputs.laplace.posterior = fit_on_subset(*args, idx, **fit)
        inputs.laplace.generator = torch.Generator().manual_seed(0)
    return losses.instance_weight(config, out, data.Batch(torch.arange(len(ds)), None, ds.y, ds.a),
                                  inputs)


def run_method(run: Run, method: str, seed: int, teacher=None, config=None, progress: bool = False):
    """Train or reuse one student and write all its records (metrics, test
    predictions, per-epoch weights, final training weights). ``progress``: the
    per-epoch bars (off by default: the caller shows one bar over students)."""
    config = config or method_config(run, method)
    if METHOD_SPECS[config.method].last_layer_of:
        return run_dfr(run, config, seed, teacher, progress=progress)
    result = train_student(run, config, seed, teacher, progress=progress)
    evaluate_student(run, result, config, seed)
    record_weights(run, result, config, seed)
    if config.method in REWEIGHTING:
        ds = run.splits()["train"]
        p = train.predict(result.model, ds, device=run.device)
        w = final_train_weights(run, result, config, pred=p, seed=seed)
        keys = dict(seed=seed, config_id=config.config_id, model="exit", method=config.method,
                    predictive="map", split=ds.split)
        records.write_record(run.run_dir, "predictions", _record_name(**keys),
                             prediction_frame(p.exit_probs, ds, keys=keys, weight=w.numpy()))
    # Laplace-KD's per-epoch effect: how far its weights are from DeDiER's
    effect = [c for c in losses.LAPLACE_EFFECT if c in result.history]
    effect += [c for c in result.history if c.startswith("weight_share_g")]
    if effect:
        table = result.history[["epoch", *effect]].dropna(how="all", subset=effect)
        records.write_record(run.run_dir, "laplace_effect", _config_name(config, seed),
                             _keyed(table, config, seed))
    return result


def base_config(run: Run, config):
    """The configuration of the student whose last layer ``config``'s method retrains
    (``METHOD_SPECS[method].last_layer_of``: DFR retrains kd's): that method's library
    defaults with ``config``'s lam, T and warm-up — so with the chosen hyper-parameters
    it is exactly the configuration notebook 05 trains that method with."""
    base = METHOD_SPECS[config.method].last_layer_of
    return losses.default_config(base, lam=config.lam, T=config.T,
                                 warmup_epochs=config.warmup_epochs)


def run_dfr(run: Run, config, seed: int, teacher=None, progress: bool = False):
    """DFR (a reference: it reads validation group labels): the ``kd`` student of
    ``seed`` (trained or reused) with its last layer retrained on group-balanced
    subsamples of one half of the validation split, its strength chosen on the other
    half's worst-group accuracy (``last_layer.dfr``; test never read). Records it like
    every student — model ``student`` (the new last layer) and ``exit`` (the kd
    student's exit, untouched) on val and test — and the strengths tried as a ``dfr``
    record. Returns the kd student's TrainResult with the retrained model."""
    base = base_config(run, config)
    result = train_student(run, base, seed, teacher, progress=progress)
    val = run.splits()["val"]
    feats = last_layer.penultimate_features(result.model, val, device=run.device)
    fit = last_layer.dfr(feats, val.y, val.g, val.n_classes, seed=seed,
                         penalty=config.dfr_penalty)
    retrained = result._replace(model=last_layer.with_head(result.model, fit.head))
    evaluate_student(run, retrained, config, seed)
    g_fit = val.g[fit.subsets[0]]
    rows = [{"seed": seed, "method": config.method, "config_id": config.config_id,
             "base_config_id": base.config_id, "penalty": config.dfr_penalty, **r,
             "n_fit_per_group": int((g_fit == g_fit[0]).sum()), "n_subsets": len(fit.subsets),
             "n_val_half1": len(fit.fit_idx), "n_val_half2": len(fit.select_idx)}
            for r in fit.table]
    records.write_record(run.run_dir, "dfr", _config_name(config, seed), rows)
    return retrained


def exit_frame(pred, ds) -> "pd.DataFrame":
    """Per-instance exit confidence, margin and correctness on ``ds`` (for figures)."""
    return pd.DataFrame({"group": ds.g.numpy(), "group_name": [ds.group_names[k] for k in ds.g.tolist()],
                         **_confidence(pred.exit_probs, ds.y)})
