"""Training throughput (images/s) of the study's teacher and student.

CPU: the ``default`` profile's narrow ResNets at 32 px (channels_last on and off),
with the epoch times and the whole study's training budget they imply
(1 teacher + seeds x methods students; notebooks 02+03 = teacher + 3 ERM students).
CUDA (when present): the ``paper`` configuration at 224 px, bf16 autocast +
channels_last against plain fp32, as a ratio.

    python bench/bench_train_throughput.py [--threads 2] [--steps 12] [--profile default]

A benchmark that prints numbers, not a test.  The steps are the training loop's
(same optimiser, autocast and memory format as ``fairkd_utils.train``); data are
random tensors held in memory, so only the model's cost is measured.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from fairkd_utils import models, train
from fairkd_utils.profiles import get_profile

N_TRAIN, N_VAL = 4795, 1199          # Waterbirds-sized splits (the default profile's data)


def throughput(model, *, batch_size, image_size, steps, warmup, device, amp, channels_last):
    """Training images/s of ``model`` (forward, CE (+ exit CE), backward, SGD step)."""
    dev = torch.device(device)
    model = model.to(dev).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    cfg = train.TrainConfig(epochs=1, batch_size=batch_size)
    opt = train._make_optimizer(model, cfg)
    x = torch.randn(batch_size, 3, image_size, image_size, device=dev)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch_size,), device=dev)

    def step():
        with train._autocast(dev, amp):
            out = model(x)
            loss = F.cross_entropy(train.final_logits(out).float(), y)
            if isinstance(out, models.StudentOutput):
                loss = loss + F.cross_entropy(out.exit_logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    times.sort()
    return batch_size / times[len(times) // 2]      # median step: robust to a shared CPU


@torch.no_grad()
def eval_throughput(model, *, image_size, batch_size=512, steps=3, channels_last=False):
    model = model.eval()
    x = torch.randn(batch_size, 3, image_size, image_size)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    model(x)
    t = time.perf_counter()
    for _ in range(steps):
        model(x)
    return steps * batch_size / (time.perf_counter() - t)


def cpu_bench(profile_name: str, steps: int, warmup: int) -> None:
    prof = get_profile(profile_name)
    print(f"CPU, {torch.get_num_threads()} threads, profile {prof.name!r}, "
          f"{prof.image_size} px, batch {prof.batch_size}")
    ips = {}
    for role in ("teacher", "student"):
        build = models.build_teacher if role == "teacher" else models.build_student
        widths = prof.teacher_widths if role == "teacher" else prof.student_widths
        blocks = prof.teacher_blocks if role == "teacher" else prof.student_blocks
        n_par = models.count_parameters(build(prof, 2, seed=0))
        auto_cl = train.use_channels_last(build(prof, 2, seed=0), torch.device("cpu"))
        for cl in (False, True):
            r = throughput(build(prof, 2, seed=0), batch_size=prof.batch_size,
                           image_size=prof.image_size, steps=steps, warmup=warmup,
                           device="cpu", amp=False, channels_last=cl)
            tag = " (used by the loop)" if cl == auto_cl else ""
            print(f"  {role:7s} widths={widths} blocks={blocks} params={n_par:,} "
                  f"channels_last={cl!s:5s}: {r:7.0f} img/s, "
                  f"{N_TRAIN / r:5.2f} s per train epoch{tag}")
            if cl == auto_cl:
                ips[role] = r
        ev = eval_throughput(build(prof, 2, seed=0), image_size=prof.image_size,
                             channels_last=auto_cl)
        print(f"  {role:7s} eval: {ev:7.0f} img/s, {N_VAL / ev:5.2f} s per val pass")
    t_epoch = {r: N_TRAIN / v for r, v in ips.items()}
    print(f"  student is {ips['student'] / ips['teacher']:.1f}x cheaper than the teacher")
    n_students = len(prof.seeds) * len(prof.methods)
    teacher_s = prof.teacher_epochs * t_epoch["teacher"]
    student_s = prof.student_epochs * t_epoch["student"]
    print(f"  training budget (train steps only, no eval/IO): teacher {prof.teacher_epochs} ep "
          f"= {teacher_s:.0f} s; one student {prof.student_epochs} ep = {student_s:.0f} s")
    print(f"    notebooks 02+03 (teacher + {len(prof.seeds)} ERM students): "
          f"{teacher_s + len(prof.seeds) * student_s:.0f} s")
    print(f"    whole study (teacher + {n_students} students): "
          f"{teacher_s + n_students * student_s:.0f} s")


def cuda_bench(steps: int, warmup: int, image_size: int = 224) -> None:
    if not torch.cuda.is_available():
        print("CUDA: no GPU visible to torch -- skipping the paper-configuration "
              "(224 px, bf16 + channels_last vs fp32) comparison")
        return
    prof = get_profile("paper")
    torch.backends.cudnn.benchmark = True
    print(f"CUDA ({torch.cuda.get_device_name()}), profile 'paper', {image_size} px, "
          f"batch {prof.batch_size}")
    for role in ("teacher", "student"):
        build = models.build_teacher if role == "teacher" else models.build_student
        res = {}
        for label, amp, cl in (("fp32", False, False), ("bf16+channels_last", True, True)):
            res[label] = throughput(build(prof, 2, seed=0), batch_size=prof.batch_size,
                                    image_size=image_size, steps=steps, warmup=warmup,
                                    device="cuda", amp=amp, channels_last=cl)
            print(f"  {role:7s} ({prof.teacher_arch if role == 'teacher' else prof.student_arch})"
                  f" {label:18s}: {res[label]:7.0f} img/s")
        print(f"  {role:7s} speed-up bf16+channels_last / fp32: "
              f"{res['bf16+channels_last'] / res['fp32']:.2f}x")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--steps", type=int, default=12, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile", default="default", help="profile for the CPU part")
    ap.add_argument("--skip-cpu", action="store_true", help="only the CUDA comparison")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.skip_cpu:
        cpu_bench(args.profile, args.steps, args.warmup)
    cuda_bench(args.steps, args.warmup)


if __name__ == "__main__":
    main()
