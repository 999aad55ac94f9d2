"""Where the default study's CPU time goes: ``torch.profiler`` over one student epoch and
one teacher-pretraining epoch of the ``default`` profile (a benchmark, not a test).

    .venv/bin/python bench/profile_epoch.py [--threads 2] [--top 20] [--method kd] [--skip-teacher]

The student is built and trained as the study builds and trains it (``models.build_student``
at seed 0 on ``data.load_splits("synthetic", ...)`` at the profile's size and scale,
``losses.make_objective`` of ``--method``, ``train.train_model`` with the profile's
student config) with random teacher logits of the right shape in place of the teacher's;
one unprofiled epoch first (allocator and oneDNN warm-up), then one profiled. The
teacher's epoch is an epoch of its pretraining (``synthetic_images.make_pretraining_corpus`` at the
profile's size, ``CrossEntropyObjective``). For each: the epoch's training and
validation time as the loop records them, the call's wall time (its fingerprint and
set-up included), and the top operators by self CPU time.

Then the levers, each timed on its own (unprofiled): the validation pass at several
evaluation batch sizes; what each training batch costs before the model sees it (the
gather of its rows from the split, and the channels_last copy the loop makes of every
batch); the checkpoint fingerprint (hashing the train and val data); one more
``train.predict`` of the validation split, which ``students.evaluate_student`` repeats
after the loop already predicted it at the kept epoch.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from fairkd_utils import checkpoints, data, losses, models, synthetic_images, train
from fairkd_utils.profiles import get_profile


def _best_of(fn, repeats: int = 3) -> float:
    """Fastest of ``repeats`` calls of ``fn`` in seconds (a shared CPU makes the others noise)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def profiled_epoch(label: str, model, splits, config, objective, top: int, warm_up: bool):
    """Train ``model`` one epoch under the profiler (after an unprofiled one if
    ``warm_up``); print the loop's times and the top operators by self CPU time."""
    if warm_up:
        train.train_model(model, splits, config, objective)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        res = train.train_model(model, splits, config, objective)
        wall = time.perf_counter() - t0
    h = res.history.iloc[-1]
    averages = prof.key_averages()
    op_total = sum(e.self_cpu_time_total for e in averages) / 1e6
    print(f"\n== {label}: {len(splits['train'])} training and {len(splits['val'])} validation "
          f"images, batch {config.batch_size}")
    print(f"epoch: training {h['train_seconds']:.2f} s, validation {h['seconds'] - h['train_seconds']:.2f} s "
          f"(loop's history); train_model call {wall:.2f} s; self CPU time in operators "
          f"{op_total:.2f} s (threads {torch.get_num_threads()}; the rest is Python)")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=40))
    return res


def levers(prof, splits, student, config, objective):
    """Time what the profile points at, each on its own."""
    train_ds, val_ds = splits["train"], splits["val"]
    dev = torch.device("cpu")
    print("\n== levers (fastest of 3)")
    for bs in (128, 512, len(val_ds)):
        sec = _best_of(lambda: train.evaluate(student, val_ds, batch_size=bs, device="cpu"))
        print(f"validation pass, eval batch {bs:5d}: {sec:.3f} s ({len(val_ds) / sec:,.0f} images/s)")
    gen = torch.Generator().manual_seed(0)

    def gather():
        for _ in data.iterate_batches(train_ds, config.batch_size, shuffle=True, generator=gen):
            pass
    batches = [b.x for b in data.iterate_batches(train_ds, config.batch_size, shuffle=True, generator=gen)]

    def to_channels_last():
        for x in batches:
            x.contiguous(memory_format=torch.channels_last)
    cl = train.use_channels_last(student, dev, config.channels_last)
    print(f"per epoch, before the model: row gather (ds.x[idx]) {_best_of(gather):.3f} s; "
          f"channels_last copy of every batch {_best_of(to_channels_last):.3f} s "
          f"(the loop makes it: channels_last={cl})")
    sec = _best_of(lambda: checkpoints.fingerprint_payload(student, splits, config, objective, "student", None))
    print(f"checkpoint fingerprint per train_model call (hashes train + val data): {sec:.3f} s")
    sec = _best_of(lambda: train.predict(student, val_ds, device="cpu"))
    print(f"train.predict on val (students.evaluate_student, after the loop's own pass of the kept "
          f"epoch): {sec:.3f} s")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--top", type=int, default=20, help="operators listed per epoch (default 20)")
    ap.add_argument("--method", default="kd", help="the student's method (default kd)")
    ap.add_argument("--skip-teacher", action="store_true", help="only the student's epoch")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    prof = get_profile("default")
    t0 = time.perf_counter()
    splits = data.load_splits("synthetic", image_size=prof.image_size, scale=prof.data_scale, seed=0,
                              augment=prof.augment)
    print(f"profile {prof.name!r}: synthetic data rendered in {time.perf_counter() - t0:.1f} s")
    ds = splits["train"]
    teacher_logits = torch.randn(len(ds), ds.n_classes, generator=torch.Generator().manual_seed(0))
    student = models.build_student(prof, ds.n_classes, seed=0)
    # warm-up 0: a reweighting --method computes its weights in the profiled epoch
    objective = losses.make_objective(losses.default_config(args.method, warmup_epochs=0),
                                      teacher_logits=teacher_logits, group_counts=ds.group_counts(),
                                      n_train=len(ds), n_classes=ds.n_classes, model=student, seed=0)
    config = train.TrainConfig.from_profile(prof, "student", seed=0, epochs=1, progress=False)
    res = profiled_epoch(f"student epoch ({args.method}, widths {prof.student_widths})", student, splits,
                         config, objective, args.top, warm_up=True)
    if not args.skip_teacher:
        corpus = synthetic_images.make_pretraining_corpus(n_per_pair=prof.teacher_pretrain_per_pair,
                                              alignment=prof.teacher_pretrain_alignment,
                                              image_size=prof.image_size, seed=0)
        teacher = models.build_teacher(prof, ds.n_classes, seed=0)
        tconfig = train.TrainConfig.from_profile(prof, "teacher", seed=0, epochs=1, progress=False,
                                                 select_on=prof.teacher_select_on)
        profiled_epoch(f"teacher pretraining epoch (widths {prof.teacher_widths})", teacher, corpus,
                       tconfig, train.CrossEntropyObjective(), args.top, warm_up=False)
    levers(prof, splits, res.model, config, objective)


if __name__ == "__main__":
    main()
