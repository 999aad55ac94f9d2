"""Wall-clock time of the whole study through the runner, per notebook.

    .venv/bin/python bench/bench_pipeline.py --profile smoke      # target: <= 90 s
    .venv/bin/python bench/bench_pipeline.py --profile default    # target: <= 1200 s (20 min)

Runs into a fresh temporary folder (no checkpoint is reused) and prints the
per-notebook seconds from the run's manifest.json, the training time per stage
(teacher, students; from the run's timings records), this machine's student epoch
time (the ERM students' seconds per epoch, validation included: machines differ, so
compare totals together with it) and the total against the target.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from fairkd_utils import pipeline

TARGETS = {"smoke": 90.0, "default": 1200.0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--keep", default=None, help="run into this folder instead of a temporary one")
    args = ap.parse_args()
    out = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fairkd-bench-"))
    t0 = time.perf_counter()
    rc = pipeline.main(["--profile", args.profile, "--out", str(out), "--figures",
                        str(out / "figures"), "--quiet"])
    wall = time.perf_counter() - t0
    manifest = json.loads((out / f"synthetic-{args.profile}" / "manifest.json").read_text())
    print(f"\nprofile {args.profile} on {os.cpu_count()} CPU cores, device {manifest['device']}:")
    for name, entry in manifest["notebooks"].items():
        print(f"  {name:30s} {entry.get('seconds', float('nan')):8.1f} s  {entry['status']}")
    run_dir = out / f"synthetic-{args.profile}"
    for stage, t in manifest.get("training", {}).items():
        print(f"  training: {stage:20s} {t['seconds_trained']:8.1f} s over {t['models_trained']} models")
    if (run_dir / "timings.csv").is_file():  # written by the runner with the manifest
        import pandas as pd

        from fairkd_utils.profiles import get_profile

        t = pd.read_csv(run_dir / "timings.csv")
        erm = t[~t.reused & t.name.str.contains("student-erm-")]
        if len(erm):
            epoch = erm.seconds.mean() / get_profile(args.profile).student_epochs
            print(f"  student epoch time (ERM, with validation): {epoch:.2f} s")
    target = TARGETS.get(args.profile)
    verdict = "" if target is None else f"  (target <= {target:.0f} s: {'PASS' if wall <= target else 'FAIL'}, ratio {wall / target:.2f})"
    print(f"  {'total (wall, with start-up)':30s} {wall:8.1f} s{verdict}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
