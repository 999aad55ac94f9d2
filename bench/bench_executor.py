"""Wall time of notebook 05's method x seed grid inline vs as local worker processes
(``--executor local``), and the overhead of a job in a process of its own.

    .venv/bin/python bench/bench_executor.py --profile smoke       # a few minutes on 2 cores
    .venv/bin/python bench/bench_executor.py --profile default     # ~25 min per variant (40 students)

Runs notebooks 01-03 once into a temporary folder (teacher, ERM students), then the
grid (every method of the profile x its seeds, with the warm-up jobs) twice, each from
a fresh copy of that folder: ``inline`` in this process (the process's threads, as
notebook 05 does by default) and ``local`` with ``--workers`` processes of
``cores // workers`` threads each. Prints the load average (``uptime``) before and
after, both wall times and their ratio, and per job: the wall time the waiting process
saw, the job's own work (training, evaluation, records) and their difference — the
overhead of a worker process (start, imports, building the data, reading the teacher's
logits, pickles, polling). On a 2-core machine expect parity at best: two workers of one
thread do the work of one process of two threads, plus the overhead. (The tables
differ in the last bits here, since CPU training depends on the thread count;
``--inline-threads 1`` makes them byte-identical.)
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fairkd_utils import hparams, jobs, pipeline, records, rundir


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: %.2f, %.2f, %.2f" % os.getloadavg()


def grid(prefix: Path, dest: Path, profile: str, opts) -> tuple[float, "object", Path]:
    run_dir = dest / f"synthetic-{profile}"
    shutil.copytree(prefix, run_dir)
    run = rundir.setup(run_dir, dest / "figures", profile, "synthetic", None, None, "cpu")
    configs = {m: hparams.method_config(run, m) for m in run.profile.methods}
    t0 = time.perf_counter()
    table = jobs.run_grid(run, configs, opts, show=False)
    return time.perf_counter() - t0, table, run_dir


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--inline-threads", type=int, default=None,
                    help="threads of the inline variant (default: the process's, all cores)")
    ap.add_argument("--keep", default=None, help="work in this folder instead of a temporary one")
    args = ap.parse_args()
    out = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fairkd-bench-executor-"))
    print(f"before: {uptime()}", flush=True)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    rc = pipeline.main(["--profile", args.profile, "--out", str(out / "prefix"), "--figures",
                        str(out / "prefix" / "figures"), "--only", "01", "02", "03", "--device", "cpu",
                        "--quiet"])
    if rc:
        return rc
    prefix = out / "prefix" / f"synthetic-{args.profile}"
    print(f"notebooks 01-03 (teacher, ERM students): {time.perf_counter() - t0:.1f} s", flush=True)

    inline_s, inline, inline_dir = grid(prefix, out / "inline", args.profile,
                                        jobs.options("inline", threads=args.inline_threads))
    print(f"inline: {inline_s:.1f} s", flush=True)
    local_s, local, local_dir = grid(prefix, out / "local", args.profile,
                                     jobs.options("local", workers=args.workers))
    print(f"local ({args.workers} workers): {local_s:.1f} s", flush=True)
    print(f"after: {uptime()}")

    ran = local[local.status == "done"]
    overhead = ran.seconds - ran.work_seconds
    threads = max(1, jobs.cores() // args.workers)
    print(f"\nprofile {args.profile}, {jobs.cores()} cores, load average before "
          f"{load_before[0]:.2f} / {load_before[1]:.2f} / {load_before[2]:.2f} (1 / 5 / 15 min):")
    print(f"  jobs: {len(ran)} run ({sum(ran.kind == 'warmup')} warm-ups), "
          f"{int((local.status == 'skipped').sum())} skipped")
    print(f"  inline ({inline_threads(args)} threads, one process)   {inline_s:8.1f} s")
    print(f"  local  ({args.workers} workers x {threads} thread(s))     {local_s:8.1f} s"
          f"   local / inline = {local_s / inline_s:.2f}")
    print(f"  per job, local: wall {ran.seconds.mean():.1f} s = work {ran.work_seconds.mean():.1f} s "
          f"+ overhead {overhead.mean():.1f} s (min {overhead.min():.1f}, max {overhead.max():.1f})")
    done = inline[inline.status == "done"]
    print(f"  per job, inline: wall {done.seconds.mean():.1f} s (work {done.work_seconds.mean():.1f} s)")
    same = []
    for kind in ("metrics", "predictions", "weights", "laplace_effect"):
        a, b = records.assemble(inline_dir, kind), records.assemble(local_dir, kind)
        same.append(f"{kind} {'identical' if a.to_csv() == b.to_csv() else 'differ'}")
    print(f"  tables inline vs local: {', '.join(same)}")
    print(f"  files: {out}")
    return 0


def inline_threads(args) -> int:
    if args.inline_threads:
        return args.inline_threads
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    sys.exit(main())
