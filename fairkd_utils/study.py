"""What the notebooks orchestrate: train or reuse the teacher and the students,
choose the hyper-parameters, and record what every model predicts.

Notebooks stay short and narrate; the steps two notebooks share live here. The
formulas are elsewhere: losses and weights in ``losses``, the exit's Laplace in
``exit_laplace``, the loop in ``train``, the statistics in ``metrics``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import (checkpoints, data, last_layer, losses, metrics, models, records, synthetic_text,
               text_models, train)
from .exit_laplace import fit_exit_laplace
from .profiles import (BUILT_IN_DATASETS, METHOD_SPECS, METHODS, REWEIGHTING, SWEPT_HPARAMS,
                       TEXT_DATASETS, check_hparams, missing_hparams, read_hparams_file,
                       synthetic_text_knobs)
from .rundir import Run

# --------------------------------------------------------------------------- teacher
#: One teacher per (dataset, profile), shared by all student seeds.
TEACHER_SEED = 0
TEACHER_LOGITS = "teacher_logits.pt"


def train_config(run: Run, role: str, seed: int, **overrides):
    if role == "student":
        # Never keep a warm-up epoch: there every reweighting method is still kd.
        overrides.setdefault("select_after", run.profile.warmup_epochs)
    return train.TrainConfig.from_profile(run.profile, role, seed=seed, device=run.device,
                                          **overrides)


def uses_pretraining_corpus(run: Run) -> bool:
    """Whether the teacher is pretrained on a built-in corpus (built-in data only)."""
    return run.dataset in BUILT_IN_DATASETS and run.profile.teacher_pretrain_per_pair > 0


def pretraining_corpus(run: Run, seed: int = TEACHER_SEED, n_per_group: int | None = None) -> dict:
    """The teacher's pretraining corpus for ``run`` as ``{"train", "val"}``: images
    (``data.make_pretraining_corpus``) or text pairs (``synthetic_text.make_text_pretraining_corpus``,
    its val part drawn from another seed; ``n_per_group`` defaults to the profile's
    ``teacher_pretrain_per_pair``, the student's corpus passes its own)."""
    p = run.profile
    if run.dataset == "synthetic_text":
        knobs = synthetic_text_knobs(p)
        n = p.teacher_pretrain_per_pair if n_per_group is None else int(n_per_group)
        train_part = synthetic_text.make_text_pretraining_corpus(
            n_per_group=n, seed=seed, exclude=run.splits(), **knobs)
        val_part = synthetic_text.make_text_pretraining_corpus(
            n_per_group=max(1, n // 10), seed=seed + 1000,
            exclude=[*run.splits().values(), train_part], **knobs)
        return {"train": train_part, "val": val_part}
    return data.make_pretraining_corpus(n_per_pair=p.teacher_pretrain_per_pair,
                                        alignment=p.teacher_pretrain_alignment,
                                        image_size=p.image_size, seed=seed)


def build_teacher(run: Run, weights_path=None, seed: int = TEACHER_SEED):
    """The run's teacher, ``teacher(x) -> logits``: a ResNet (``models``) for images; for
    text a tiny BERT built in code, or the encoder of a local Hugging Face folder
    (``--teacher-model``, ``hf`` archs). ``weights_path`` defaults to ``run.teacher_model``."""
    p, ds = run.profile, run.splits()["train"]
    weights_path = weights_path or run.teacher_model
    if run.dataset not in TEXT_DATASETS:
        return models.build_teacher(p, ds.n_classes, weights_path, seed=seed)
    if p.teacher_arch == "hf":
        return text_models.load_text_teacher(_model_folder(weights_path, "teacher"), ds.n_classes, seed=seed)
    return text_models.build_text_teacher(_bert_config(run, ds, "teacher"), ds.n_classes, seed=seed)


def build_student(run: Run, seed: int):
    """The run's student with its early exit at ``profile.exit_stage`` (a ResNet stage,
    or a transformer layer for text), initialised under ``seed``. A text student starts
    from a pretrained encoder where there is one -- a local Hugging Face folder, or the
    run's :func:`pretrained_student_encoder` -- shared by every seed; ``seed`` then draws
    its two heads."""
    p, ds = run.profile, run.splits()["train"]
    if run.dataset not in TEXT_DATASETS:
        return models.build_student(p, ds.n_classes, run.student_model, seed=seed)
    if p.student_arch == "hf":
        return text_models.load_text_student(_model_folder(run.student_model, "student"), ds.n_classes,
                                             p.exit_stage, pool=p.exit_pool, seed=seed)
    model = _tiny_student(run, seed)
    encoder = pretrained_student_encoder(run)
    if encoder is not None:
        model.encoder.load_state_dict(encoder)
    return model


def _tiny_student(run: Run, seed: int):
    p, ds = run.profile, run.splits()["train"]
    return text_models.build_text_student(_bert_config(run, ds, "student"), ds.n_classes, p.exit_stage,
                                          seed=seed, pool=p.exit_pool)


#: The seed of the student's pretrained encoder (its initialisation and its corpus).
STUDENT_PRETRAIN_SEED = 7


def pretrained_student_encoder(run: Run, progress: bool = False) -> dict | None:
    """The encoder weights every text student of ``run`` starts from, or ``None`` (no
    student pretraining: the profile's ``student_pretrain_per_pair`` is 0, or the data
    are not built in). Trained once -- plain cross-entropy on a corpus of its own
    (:func:`pretraining_corpus` at :data:`STUDENT_PRETRAIN_SEED`, negation independent of
    the label), selected on that corpus's val average accuracy -- and then reused from
    the run's checkpoints (name ``student-pretrained``), like the teacher's stages.
    Kept on ``run`` for the process."""
    p = run.profile
    if run.dataset != "synthetic_text" or p.student_pretrain_per_pair <= 0:
        return None
    if run._student_encoder is None:
        if p.student_pretrain_epochs < 1:
            raise ValueError(f"student_pretrain_per_pair={p.student_pretrain_per_pair} but "
                             f"student_pretrain_epochs={p.student_pretrain_epochs}: give the "
                             "student's pretraining at least one epoch (or no corpus: 0 pairs)")
        corpus = pretraining_corpus(run, STUDENT_PRETRAIN_SEED, p.student_pretrain_per_pair)
        config = train_config(run, "student", STUDENT_PRETRAIN_SEED, epochs=p.student_pretrain_epochs,
                              select_on="avg_acc", select_after=0, progress=progress)
        res = timed(run, "student", "student-pretrained", lambda: train.train_model(
            _tiny_student(run, STUDENT_PRETRAIN_SEED), corpus, config, train.CrossEntropyObjective(),
            ckpt_dir=run.path("checkpoints"), name="student-pretrained",
            fingerprint_extra=run.fingerprint_extra()))
        run._student_encoder = {k: v.detach().to("cpu", copy=True)
                                for k, v in res.model.encoder.state_dict().items()}
    return run._student_encoder


def _model_folder(path, role: str) -> str:
    if not path:
        raise ValueError(f"this profile's {role} is a Hugging Face model from a local folder: "
                         f"pass --{role}-model DIR (nothing is downloaded)")
    return path


def _bert_config(run: Run, ds, role: str):
    p = run.profile
    k = 0 if role == "teacher" else 1
    widths, blocks = (p.teacher_widths, p.teacher_blocks) if k == 0 else (p.student_widths, p.student_blocks)
    return text_models.bert_config(ds.vocab_size, hidden_size=widths[0], num_layers=blocks[0],
                                   num_heads=p.attention_heads[k], max_length=p.max_length,
                                   pad_token_id=ds.pad_id)


def train_teacher_stages(run: Run, weights_path=None, seed: int = TEACHER_SEED,
                         progress: bool = True) -> dict:
    """Train the teacher stage by stage, or reuse each stage's checkpoint (same
    fingerprint); ``{stage: TrainResult}`` in order, the last one is the teacher.

    On synthetic data with a pretraining corpus: ``"pretrained"`` (ERM on the corpus,
    selected on the corpus's own val split) and, if ``teacher_adapt_epochs > 0``,
    ``"adapted"`` (ERM fine-tuning on the study's training split at
    ``teacher_adapt_lr``, selected on val average accuracy). Otherwise one stage,
    ``"trained"``: ``teacher_epochs`` on the study's training split, from
    ``weights_path`` if given. The teacher is plain ERM and never sees group labels,
    so it is selected on average accuracy."""
    p = run.profile
    model = build_teacher(run, weights_path, seed=seed)
    base = dict(select_on=p.teacher_select_on, progress=progress)
    stages = {}
    if uses_pretraining_corpus(run):
        corpus = pretraining_corpus(run, seed)
        config = train_config(run, "teacher", seed, epochs=p.teacher_pretrain_epochs, **base)
        stages["pretrained"] = timed(run, "teacher", "teacher-pretrained", lambda: train.train_model(
            model, corpus, config, train.CrossEntropyObjective(), ckpt_dir=run.path("checkpoints"),
            name="teacher-pretrained", fingerprint_extra=run.fingerprint_extra()))
        if p.teacher_adapt_epochs > 0:
            config = train_config(run, "teacher", seed, epochs=p.teacher_adapt_epochs,
                                  lr=p.teacher_adapt_lr, **base)
            stages["adapted"] = timed(run, "teacher", "teacher-adapted", lambda: train.train_model(
                model, run.splits(), config, train.CrossEntropyObjective(),
                ckpt_dir=run.path("checkpoints"), name="teacher",
                fingerprint_extra=run.fingerprint_extra()))
        return stages
    config = train_config(run, "teacher", seed, **base)
    stages["trained"] = timed(run, "teacher", "teacher", lambda: train.train_model(
        model, run.splits(), config, train.CrossEntropyObjective(), ckpt_dir=run.path("checkpoints"),
        name="teacher", fingerprint_extra=run.fingerprint_extra()))
    return stages


def train_teacher(run: Run, weights_path=None, seed: int = TEACHER_SEED, progress: bool = True):
    """The teacher every student distils from (the last stage of
    :func:`train_teacher_stages`), trained or reused."""
    return list(train_teacher_stages(run, weights_path, seed, progress).values())[-1]


def save_teacher_logits(run: Run, result) -> dict:
    """Teacher logits on every split (eval mode, no augmentation), saved atomically
    with the teacher's fingerprint so students can check what they distil from."""
    out = {"fingerprint": result.fingerprint,
           "train_data": str(checkpoints.describe_data(run.splits()["train"]))}
    for split, ds in run.splits().items():
        out[split] = train.predict(result.model, ds, device=run.device).logits
    records.torch_save(run.path(TEACHER_LOGITS), out)
    return out


def load_teacher_logits(run: Run) -> dict:
    path = run.require(TEACHER_LOGITS, "02_teacher")
    logits = torch.load(path, map_location="cpu", weights_only=True)
    if logits.get("train_data") != str(checkpoints.describe_data(run.splits()["train"])):
        raise ValueError(f"{path} holds the logits of a teacher trained on other data "
                         "(another --data-root or data version): rerun notebook 02_teacher")
    return logits


# --------------------------------------------------------------------------- students
HPARAMS_FILE = Path(__file__).with_name("hparams.json")


def read_hparams(path) -> dict:
    """A hyper-parameter file ``{"<dataset>-<profile>": {method: {field: value}}}``,
    checked (``profiles.check_hparams``: known methods, fields each method reads, values
    of their types), or a clear error naming the file."""
    return read_hparams_file(path)


def _hparams_entry(run: Run) -> tuple[dict | None, str, Path | None]:
    """(the file's entry for ``run`` or None for the library defaults, where it came
    from in words, the file)."""
    path = Path(run.hparams_file) if run.hparams_file else HPARAMS_FILE
    if not run.hparams_file and not path.exists():
        return None, "library defaults (no fairkd_utils/hparams.json)", None
    chosen = read_hparams(path)
    table = chosen.get(run.name)
    if table is None:
        if run.hparams_file:
            raise ValueError(f"{str(path)!r} has no entry for {run.name!r} (it has "
                             f"{sorted(chosen)}); run the sweep for this dataset and profile")
        return None, (f"library defaults ({path.name} has no entry for {run.name}; "
                      "choose them with --sweep)"), None
    return ({k: v for k, v in table.items() if k != "_comment"}, f"{path.name}[{run.name!r}]",
            path.resolve())


def hparams_table(run: Run) -> tuple[dict, str]:
    """The chosen hyper-parameters that apply to ``run`` and where they came from:
    the file named by ``run.hparams_file`` (it must have an entry for this run), else
    the committed ``fairkd_utils/hparams.json``'s entry for ``<dataset>-<profile>``,
    else the library defaults ({}). Never another dataset's or profile's entry."""
    table, source, _ = _hparams_entry(run)
    return table or {}, source


def hparams_for(table: dict, method: str, source: str = "hyper-parameter table",
                complete: bool = True) -> dict:
    """The overrides ``method`` takes from a chosen table: lam and T from ``kd``'s entry
    (shared by every distillation method), beta from the method it borrows it from
    (``METHOD_SPECS[method].beta_from``), other fields (e.g. ``score``) from its own.
    ``complete``: the table must hold every field the method takes from it
    (``profiles.required_hparams``), else a ValueError naming what is missing (a file's
    entry is never completed from the library defaults)."""
    check_hparams({"": table}, source)
    missing = missing_hparams(table, [method]) if complete else []
    if missing:
        raise ValueError(f"{source} lacks {', '.join(missing)}; give every value the method reads "
                         "(or rerun the sweep: --sweep)")
    spec = METHOD_SPECS[method]
    out = {}
    if spec.distils:
        out.update({k: v for k, v in table.get("kd", {}).items() if k in ("lam", "T")})
    if spec.beta_from and "beta" in table.get(spec.beta_from, {}):
        out["beta"] = table[spec.beta_from]["beta"]
    out.update({k: v for k, v in table.get(method, {}).items() if k not in ("lam", "T", "beta")
                or (k == "beta" and spec.beta_from == method)})
    return out


def method_config(run: Run, method: str):
    """The method's hyper-parameters: :func:`hparams_table` over the library defaults
    (``losses.DEFAULT_HPARAMS``), with the profile's warm-up (the same for every method).
    A file's entry must hold every value the method reads from it."""
    table, source, _ = _hparams_entry(run)
    overrides = hparams_for(table or {}, method, source, complete=table is not None)
    overrides["warmup_epochs"] = run.profile.warmup_epochs
    try:
        return losses.default_config(method, **overrides)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: bad entry for {method!r} ({err}); valid fields are "
                         f"{sorted(losses.MethodConfig.__dataclass_fields__)}") from None


def hparams_source(run: Run) -> str:
    """Where :func:`method_config` takes ``run``'s hyper-parameters from, in words."""
    return hparams_table(run)[1]


#: Written by :func:`record_hparams` into the run directory: the hyper-parameters that
#: made its tables (the runner says so when a later run's differ).
HPARAMS_USED = "hparams_used.json"   # pipeline.HPARAMS_USED


def record_hparams(run: Run, configs: dict) -> dict:
    """Write ``<run_dir>/hparams_used.json``: every method's configuration of
    ``configs`` (method -> ``losses.MethodConfig``), where they came from and the file."""
    _, source, path = _hparams_entry(run)
    used = {"source": source, "file": str(path) if path else None,
            "configs": {m: c.to_dict() for m, c in configs.items()}}
    records.write_json(run.path(HPARAMS_USED), used)
    return used


def teacher_for_students(run: Run, teacher=None):
    """What a distilling student learns from: the cached train-split logits (``teacher``:
    the dict of :func:`load_teacher_logits`, read if None) or, with training augmentation
    (``paper`` profile), the teacher model itself run on each augmented batch (an
    ``OnlineTeacher`` given as ``teacher`` is used as it is)."""
    if isinstance(teacher, losses.OnlineTeacher):
        return teacher
    if run.profile.augment:
        tres = train_teacher(run)
        return losses.OnlineTeacher(tres.model.eval(), fingerprint=tres.fingerprint)
    return (teacher or load_teacher_logits(run))["train"]


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

    def _warmup_args(self):
        ds = self.run.splits()["train"]
        trunk = build_student(self.run, self.seed)
        warm = losses.warmup_objective(self.config, self.teacher_train, len(ds), ds.n_classes)
        return (trunk, self.run.splits(), self.train_config, warm, self.config.warmup_epochs), dict(
            ckpt_dir=self.ckpt_dir, name=f"warmup-seed{self.seed}",
            fingerprint_extra=self.run.fingerprint_extra())

    def warmup_checkpoint(self) -> Path | None:
        """The file of the warm-up it branches from (None when it branches from none)."""
        if not self.shares_warmup:
            return None
        args, kw = self._warmup_args()
        return train.warmup_checkpoint(*args, **kw)[1]

    def train_warmup(self) -> dict:
        """Train (or reuse) the warm-up it branches from: every method of this seed
        with the same lam and T shares it."""
        args, kw = self._warmup_args()
        return train.train_warmup(*args, **kw)

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
    objective = losses.make_objective(config, teacher_logits=teacher_train,
                                      group_counts=counts, n_train=len(ds),
                                      n_classes=ds.n_classes, model=model, seed=seed,
                                      error_set=error_set, top_k=int(sum(
                                          counts[g] for g in minority_groups(counts, ds.n_attrs))))
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


class _Timed:
    """A warm-up state seen by :func:`timed` (which reads ``reused``)."""

    def __init__(self, state: dict):
        self.value = state
        self.reused = state.get("run") != checkpoints.current_run()


def timed(run: Run, stage: str, name: str, train_fn):
    """Run ``train_fn`` (a training call returning a TrainResult) and record its wall
    time as ``records/timings/<name>.csv`` (stage, name, seconds, reused): the run's
    ``timings.csv``, which the manifest summarises per stage. Reusing a checkpoint
    keeps the record of the training that produced it."""
    t0 = time.perf_counter()
    result = train_fn()
    if result.reused and records.record_path(run.run_dir, "timings", name).exists():
        return result  # keep the time of the training that produced the checkpoint
    records.write_record(run.run_dir, "timings", name, [{
        "stage": stage, "name": name, "seconds": round(time.perf_counter() - t0, 2),
        "reused": bool(result.reused)}])
    return result


def shares_warmup(config, train_config) -> bool:
    """Whether the student of ``config`` branches from its seed's shared warm-up. Until
    its warm-up ends every method trains with unit weights, so all methods with the
    same lam and T share it: every distillation method is kd then, and ``erm`` and
    ``group_balanced_erm`` (lam = 0) are the same cross-entropy."""
    return 0 < config.warmup_epochs < train_config.epochs


# --------------------------------------------------------------------------- records
def _record_name(model: str, method: str, config_id: str, seed: int, predictive: str, split: str) -> str:
    return f"{model}-{method}-{config_id}-seed{seed}-{predictive}-{split}"


def prediction_frame(probs, ds, *, keys: dict, weight=None, variance=None):
    """Per-instance rows of ``predictions.csv`` for one model on one split."""
    probs = probs.double()
    pred = probs.argmax(1)
    n = len(ds)
    df = pd.DataFrame({
        "id": list(ds.ids), "split": ds.split, "group": ds.g.numpy(), "y": ds.y.numpy(),
        "seed": keys["seed"], "model": keys["model"], "method": keys["method"],
        "config_id": keys["config_id"], "predictive": keys["predictive"],
        "prob": probs.max(1).values.numpy(), "margin": losses.confidence_margin(probs).numpy(),
        "correct": (pred == ds.y).numpy(),
        "weight": np.full(n, np.nan) if weight is None else np.asarray(weight, dtype=float),
        "variance": np.full(n, np.nan) if variance is None else np.asarray(variance, dtype=float),
    })
    return df


def record(run: Run, probs, ds, *, model: str, method: str, seed: int, config_id: str,
           predictive: str = "map", weight=None, variance=None, predictions: bool = True) -> list[dict]:
    """Write this model's metrics (per group and overall) and, optionally, its
    per-instance predictions on ``ds`` as record files of their own."""
    keys = dict(seed=seed, config_id=config_id, model=model, method=method,
                predictive=predictive, split=ds.split)
    rows = metrics.metric_rows(probs, ds.y, ds.g, ds.group_names, **run.keys(**keys))
    name = _record_name(model, method, config_id, seed, predictive, ds.split)
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
        p = train.predict(result.model, ds, device=run.device)
        preds[split] = p
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
    tidy.insert(0, "method", config.method)
    tidy.insert(0, "seed", seed)
    tidy.insert(2, "config_id", config.config_id)
    tidy["group_name"] = [names[g] for g in tidy["group"]]
    records.write_record(run.run_dir, "weights", f"{config.method}-{config.config_id}-seed{seed}", tidy)
    return tidy


def minority_groups(train_counts, n_attrs: int) -> list[int]:
    """The shortcut-conflicting groups: ``(y, a)`` whose label the attribute makes at
    least twice less likely than it is overall, P(y | a) < P(y) / 2, read from the
    training counts in the library's order ``g = y * n_attrs + a`` (``n_attrs``: the
    dataset's ``ds.n_attrs``; a folder dataset's attribute may take more than two
    values). Waterbirds: the two background-mismatched groups; CelebA: blond men;
    MultiNLI: entailment and neutral with negation (not contradiction with negation,
    which is small but agrees with the shortcut). When no group conflicts (e.g.
    balanced data), the smallest group(s); none when all groups have the same size."""
    counts = np.asarray(train_counts, dtype=float)
    small = np.array([], dtype=int)
    if n_attrs >= 2 and len(counts) % n_attrs == 0 and len(counts) > n_attrs and counts.sum() > 0:
        table = counts.reshape(-1, n_attrs)  # rows: labels y; columns: attributes a
        p_y = table.sum(1, keepdims=True) / table.sum()
        with np.errstate(invalid="ignore", divide="ignore"):
            p_y_given_a = table / table.sum(0, keepdims=True)
        small = np.flatnonzero((p_y_given_a < 0.5 * p_y).ravel())
    if len(small) == 0 and counts.min() < counts.max():
        small = np.flatnonzero(counts == counts.min())
    return [int(k) for k in small]


#: Worst-group test accuracy of ERM and of group DRO on the two benchmarks the
#: miniatures copy, from one table (Liu et al. 2021, "Just Train Twice", Table 1):
#: how much balancing the groups is worth on each.
LITERATURE_WGA = {"waterbirds": {"erm": 0.726, "group_dro": 0.914},
                  "multinli": {"erm": 0.679, "group_dro": 0.777}}


def calibration_targets(train_counts, n_attrs: int, dataset: str) -> dict:
    """(c)'s margin and (d)'s gain (``metrics.calibration_conditions``) for ``dataset``.

    The image targets (``metrics.IMAGE_TARGETS``: margin 0.50, gain 0.20) were set on
    Waterbirds' numbers. A text miniature copies MultiNLI, where the shortcut allows
    less confidence and balancing the groups gains less, so both are scaled by the
    ratio of the two benchmarks' own numbers, fixed from the data and the literature
    before any method is run:

    - margin: 0.50 x the shortcut's ceiling on these training counts (0.625 for
      MultiNLI's, :func:`metrics.shortcut_margin_ceiling`) / Waterbirds' (0.765): 0.41;
    - gain: 0.20 x MultiNLI's group DRO - ERM gain (0.098) / Waterbirds' (0.188): 0.10.

    Rounded to two decimals, as printed and checked. Raises where the training counts
    have no minority group (all groups the same size)."""
    image = metrics.IMAGE_TARGETS
    if dataset not in TEXT_DATASETS:
        return dict(image)
    wb = data.WATERBIRDS_COUNTS["train"]
    ceiling = metrics.shortcut_margin_ceiling(
        train_counts, n_attrs, minority_groups(train_counts, n_attrs))
    wb_ceiling = metrics.shortcut_margin_ceiling(wb, 2, minority_groups(wb, 2))
    gain = {k: v["group_dro"] - v["erm"] for k, v in LITERATURE_WGA.items()}
    return {"margin": round(image["margin"] * ceiling / wb_ceiling, 2),
            "gain": round(image["gain"] * gain["multinli"] / gain["waterbirds"], 2)}


def exit_frame(pred, ds) -> "pd.DataFrame":
    """Per-instance exit confidence, margin and correctness on ``ds`` (for figures)."""
    probs = pred.exit_probs
    return pd.DataFrame({
        "group": ds.g.numpy(), "group_name": [ds.group_names[k] for k in ds.g.tolist()],
        "prob": probs.max(1).values.numpy(), "margin": losses.confidence_margin(probs).numpy(),
        "correct": (probs.argmax(1) == ds.y).numpy(),
    })


def erm_outputs(run: Run, seed: int, splits=("train", "val", "test")) -> tuple:
    """The ERM student of notebook 03 (reused, never retrained here) and its
    predictions (logits, exit logits, phi) on ``splits``."""
    config = method_config(run, "erm")
    run.require(f"records/metrics/{_record_name('student', 'erm', config.config_id, seed, 'map', 'test')}.csv",
            "03_early_exit_student")
    result = train_student(run, config, seed)
    if not result.reused:
        raise FileNotFoundError(f"the ERM student of seed {seed} was not found (its checkpoint is "
                                "missing or from another configuration): rerun notebook "
                                "03_early_exit_student")
    return result, {s: train.predict(result.model, run.splits()[s], device=run.device) for s in splits}


# --------------------------------------------------------------------------- distillation
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
        inputs.laplace = losses.LaplaceSource(config, result.model, len(ds))
        inputs.laplace.posterior = fit_exit_laplace(result.model.exit, p.phi.double(), p.exit_probs,
                                                    y=ds.y, prior=config.prior, tau=config.tau)
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
                    predictive="map")
        records.write_record(run.run_dir, "predictions",
                             _record_name("exit", config.method, config.config_id, seed, "map", "train"),
                             prediction_frame(p.exit_probs, ds, keys=keys, weight=w.numpy()))
    effect = [c for c in LAPLACE_EFFECT if c in result.history]
    effect += [c for c in result.history if c.startswith("weight_share_g")]
    if effect:
        table = result.history[["epoch", *effect]].dropna(how="all", subset=effect)
        table.insert(0, "config_id", config.config_id)
        table.insert(0, "method", config.method)
        table.insert(0, "seed", seed)
        records.write_record(run.run_dir, "laplace_effect", f"{config.method}-{config.config_id}-seed{seed}",
                             table)
    return result


#: Per-epoch columns of a Laplace-KD history: how far its weights are from DeDiER's
#: (``losses.LaplaceSource.epoch_stats``; one ``weight_share_g<k>`` column per group follows).
LAPLACE_EFFECT = losses.LAPLACE_EFFECT


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
    records.write_record(run.run_dir, "dfr", f"{config.method}-{config.config_id}-seed{seed}", rows)
    return retrained


# --------------------------------------------------------------------------- sweep
#: One grid for every method: lam and T are chosen once, for kd, and shared by every
#: distillation method; beta is chosen per reweighting method (profiles.SWEPT_HPARAMS)
#: on the same grid, at kd's lam and T; jtt's identification epochs and lambda_up
#: likewise (profiles.SWEPT_HPARAMS). laplace_kd's score is the study's form (the
#: Laplace margin), not swept.
SWEEP_GRID = {"lam": (0.5, 0.9, 0.95), "T": (2.0, 4.0, 8.0), "beta": (1.0, 2.0, 4.0),
              "jtt_epochs": (1, 2, 3), "jtt_upweight": (5.0, 20.0, 100.0)}
#: The columns of sweep.csv every sweep has; a method's own swept fields are added.
_SWEEP_FIELDS = ("lam", "T", "beta", "score")


def sweep_configs(run: Run, method: str, lam_T: dict | None = None) -> list:
    """The configurations the sweep tries for ``method``: kd's lam x T grid, or, at
    ``lam_T`` (kd's choice), the grid of the method's own swept hyper-parameters
    (``profiles.SWEPT_HPARAMS``: beta, or jtt's identification epochs x lambda_up)."""
    base = losses.default_config(method, warmup_epochs=run.profile.warmup_epochs)
    if method == "kd":
        return [base.replace(lam=lam, T=T) for lam, T in
                itertools.product(SWEEP_GRID["lam"], SWEEP_GRID["T"])]
    if method not in SWEPT_HPARAMS:
        raise ValueError(f"the sweep chooses kd's lam and T and the hyper-parameters of "
                         f"{list(SWEPT_HPARAMS)}; {method!r} borrows its hyper-parameters")
    names = SWEPT_HPARAMS[method]
    return [base.replace(**dict(zip(names, values)), **(lam_T or {}))
            for values in itertools.product(*(SWEEP_GRID[n] for n in names))]


def sweep_row(run: Run, cfg, seed: int, teacher=None) -> dict:
    """Train (or reuse) one sweep student into ``<run_dir>/sweep/checkpoints/`` and
    return its row of ``sweep.csv``: validation worst-group and average accuracy, and
    every field the sweep chooses (lam, T, beta, score and the method's own)."""
    result = train_student(run, cfg, seed, teacher, ckpt_dir=run.path("sweep", "checkpoints"),
                           progress=False)
    val = run.splits()["val"]
    p = train.predict(result.model, val, device=run.device)
    s = metrics.summarize(p.probs, p.y, p.g, val.n_groups)
    return {"method": cfg.method, "config_id": cfg.config_id, "seed": seed,
            **{f: getattr(cfg, f) for f in _sweep_fields(cfg.method)},
            "val_worst_group_acc": s["worst_group_acc"], "val_avg_acc": s["avg_acc"],
            "reused": result.reused}


def _sweep_fields(method: str) -> list:
    return list(_SWEEP_FIELDS) + [f for f in SWEPT_HPARAMS.get(method, ()) if f not in _SWEEP_FIELDS]


def sweep(run: Run, seeds, teacher=None, methods=None, lam_T: dict | None = None, evaluate=None):
    """Choose the hyper-parameters on **validation** worst-group accuracy averaged
    over ``seeds`` (ties: validation average accuracy); test is never looked at.

    First kd's lam and T over the grid (or, with ``lam_T``, those given: kd's earlier
    choice, so that only the rest is swept); then, at those, the hyper-parameters of
    every method in ``methods`` that has its own (``profiles.SWEPT_HPARAMS``: beta;
    jtt's identification epochs and lambda_up). Students train into
    ``<run_dir>/sweep/``. Writes ``sweep/sweep.csv`` (one row per configuration and
    seed) and, whole, ``sweep/hparams.json`` — every field the methods read (lam, T,
    beta, score, jtt's) — which notebook 05 reads through its ``hparams_file``
    parameter. Returns (table, chosen).

    ``evaluate(method, pairs)``: the rows (:func:`sweep_row`) of the ``(config, seed)``
    pairs, in order; by default trained here one after another (``jobs.run_sweep``
    passes one that runs them as jobs)."""
    if len(seeds) < 2:
        raise ValueError(f"the sweep averages over at least two seeds, got {list(seeds)}")
    sub = dataclasses.replace(run, run_dir=run.path("sweep"))
    sub.run_dir.mkdir(parents=True, exist_ok=True)
    teacher = teacher or load_teacher_logits(run)
    if evaluate is None:
        def evaluate(method, pairs):
            return [sweep_row(run, cfg, seed, teacher) for cfg, seed in pairs]
    rows = []

    def choose(method, configs):
        fields = _sweep_fields(method)
        rows.extend(evaluate(method, [(cfg, seed) for cfg in configs for seed in seeds]))
        table = pd.DataFrame(rows)
        mine = table[table.method == method]
        means = mine.groupby(["config_id", *fields], as_index=False, sort=False)[
            ["val_worst_group_acc", "val_avg_acc"]].mean()
        return means.sort_values(["val_worst_group_acc", "val_avg_acc"],
                                 ascending=False, kind="stable").iloc[0]

    if lam_T is None:
        best = choose("kd", sweep_configs(run, "kd"))
        lam_T = {"lam": float(best["lam"]), "T": float(best["T"])}
        how = (f"kd's lam x T over {list(SWEEP_GRID['lam'])} x {list(SWEEP_GRID['T'])}, shared by "
               "every distillation method")
    else:
        lam_T = {"lam": float(lam_T["lam"]), "T": float(lam_T["T"])}
        how = f"kd's lam and T given ({lam_T}, an earlier sweep's choice), shared by every distillation method"
    chosen = {"kd": lam_T}
    swept = [m for m in SWEPT_HPARAMS if methods is None or m in methods]
    for method in swept:
        best = choose(method, sweep_configs(run, method, lam_T))
        chosen[method] = {n: (int(best[n]) if n == "jtt_epochs" else float(best[n]))
                          for n in SWEPT_HPARAMS[method]}
        if method == "laplace_kd":
            chosen[method]["score"] = str(best["score"])
    table = pd.DataFrame(rows)
    records.write_csv(sub.path("sweep.csv"), table)
    grids = "; ".join(f"{m}: " + " x ".join(f"{n} {list(SWEEP_GRID[n])}" for n in SWEPT_HPARAMS[m])
                      for m in swept if SWEPT_HPARAMS[m] != ("beta",))
    comment = (f"Chosen by the sweep of notebook 05 on validation worst-group accuracy averaged "
               f"over seeds {list(seeds)} (ties: validation average accuracy), never on test: "
               f"{how}; then beta over {list(SWEEP_GRID['beta'])} per method "
               f"at those lam and T" + (f" ({grids})" if grids else "") + ". Table: sweep/sweep.csv.")
    records.write_json(sub.path("hparams.json"), {run.name: {"_comment": comment, **chosen}})
    return table, chosen
