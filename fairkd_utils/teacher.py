"""The teacher: trained (or reused) stage by stage, its logits saved once for
distillation, and what a distilling student learns from (the cached logits, or the
teacher model itself on augmented batches)."""

from __future__ import annotations

import copy

import torch

from . import checkpoints, losses, records, train
from .rundir import Run
from .build import (TEACHER_SEED, build_teacher, pretraining_corpus, timed, train_config,
                    uses_pretraining_corpus)


TEACHER_LOGITS = "teacher_logits.pt"


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
    so it is selected on average accuracy. Each stage's result holds a model of its own:
    the adapted stage trains a copy of the pretrained one, so ``stages["pretrained"]``
    is still the pretrained teacher (notebook 02 compares the two)."""
    p = run.profile
    model = build_teacher(run, weights_path, seed=seed)
    stages = {}

    def stage(key, timing, name, net, data, **config):
        config = train_config(run, "teacher", seed, **config, select_on=p.teacher_select_on,
                              progress=progress)
        stages[key] = timed(run, "teacher", timing, lambda: train.train_model(
            net, data, config, train.CrossEntropyObjective(), ckpt_dir=run.path("checkpoints"),
            name=name, fingerprint_extra=run.fingerprint_extra()))

    if not uses_pretraining_corpus(run):
        stage("trained", "teacher", "teacher", model, run.splits())
        return stages
    stage("pretrained", "teacher-pretrained", "teacher-pretrained", model, pretraining_corpus(run, seed),
          epochs=p.teacher_pretrain_epochs)
    if p.teacher_adapt_epochs > 0:
        stage("adapted", "teacher-adapted", "teacher", copy.deepcopy(model), run.splits(),
              epochs=p.teacher_adapt_epochs, lr=p.teacher_adapt_lr)
    return stages


def train_teacher(run: Run, weights_path=None, seed: int = TEACHER_SEED, progress: bool = True):
    """The teacher every student distils from (the last stage of
    :func:`train_teacher_stages`), trained or reused."""
    return list(train_teacher_stages(run, weights_path, seed, progress).values())[-1]


def save_teacher_logits(run: Run, result) -> dict:
    """Teacher logits on every split (eval mode, no augmentation), saved atomically
    with the teacher's fingerprint so students can check what they distil from."""
    out = {"fingerprint": result.fingerprint, "train_data": _train_data(run),
           **{split: train.predict(result.model, ds, device=run.device).logits
              for split, ds in run.splits().items()}}
    records.torch_save(run.path(TEACHER_LOGITS), out)
    return out


def _train_data(run: Run) -> str:
    """What the teacher's logits were computed on: the run's training split, described."""
    return str(checkpoints.describe_data(run.splits()["train"]))


def load_teacher_logits(run: Run) -> dict:
    """The logits :func:`save_teacher_logits` wrote, or a clear error when notebook 02
    has not run or they come from a teacher trained on other data."""
    path = run.require(TEACHER_LOGITS, "02_teacher")
    logits = torch.load(path, map_location="cpu", weights_only=True)
    if logits.get("train_data") != _train_data(run):
        raise ValueError(f"{path} holds the logits of a teacher trained on other data "
                         "(another --data-root or data version): rerun notebook 02_teacher")
    return logits


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
