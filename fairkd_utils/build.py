"""The run's models and corpora, built from its profile: the teacher and the
student (image ResNets or text encoders, from scratch or a local pretrained file or
folder), the teacher's built-in pretraining corpus and the text student's shared
pretrained encoder. One teacher per (dataset, profile), shared by every student seed.
"""

from __future__ import annotations
import time
from . import checkpoints, models, records, synthetic_images, synthetic_text, text_models, train
from .profiles import BUILT_IN_DATASETS, TEXT_DATASETS, synthetic_text_knobs
from .rundir import Run


#: One teacher per (dataset, profile), shared by all student seeds.
TEACHER_SEED = 0


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
    (``synthetic_images.make_pretraining_corpus``) or text pairs
    (``synthetic_text.make_text_pretraining_corpus``, its val part drawn from another
    seed; ``n_per_group`` defaults to the profile's ``teacher_pretrain_per_pair``, the
    student's corpus passes its own)."""
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
    return synthetic_images.make_pretraining_corpus(
        n_per_pair=p.teacher_pretrain_per_pair, alignment=p.teacher_pretrain_alignment,
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
    """The tiny BERT of ``role`` ("teacher" or "student"): the profile's first
    ``<role>_widths`` and ``<role>_blocks``, its ``attention_heads`` (teacher, student)."""
    p = run.profile
    return text_models.bert_config(ds.vocab_size, hidden_size=getattr(p, f"{role}_widths")[0],
                                   num_layers=getattr(p, f"{role}_blocks")[0],
                                   num_heads=p.attention_heads[("teacher", "student").index(role)],
                                   max_length=p.max_length, pad_token_id=ds.pad_id)


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
