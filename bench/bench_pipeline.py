"""Wall-clock time of the whole study through the runner, per notebook.

    .venv/bin/python bench/bench_pipeline.py --profile smoke      # target: <= 90 s
    .venv/bin/python bench/bench_pipeline.py --profile default    # target: <= 1200 s (20 min)
    .venv/bin/python bench/bench_pipeline.py --profile default --compile both   # eager, then compiled

Runs into a fresh temporary folder (no checkpoint is reused) and prints the
per-notebook seconds from the run's manifest.json, the training time per stage
(teacher, students; from the run's timings records), this machine's student epoch
time (the ERM students' seconds per epoch, validation included: machines differ, so
compare totals together with it) and the total against the target.

``--compile both`` runs the study twice in one process tree, one after the other on
the same machine: eager (the profile as it is) and with ``--set compile=true``
(``torch.compile`` of the training and evaluation forward passes, see
``fairkd_utils.train.Forward``); it prints both and the ratio eager / compiled, with
the compile time that the compiled run's log reports (``compiled ... in X s`` lines of
``run.log``: the first call of each model shape and mode, which holds the compile).
"""

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from fairkd_utils import pipeline

TARGETS = {"smoke": 90.0, "default": 1200.0}


def bench(profile: str, out: Path, compile_: bool) -> tuple[int, float]:
    """One run of the study into ``out``; prints its table and returns (exit code, wall s)."""
    argv = ["--profile", profile, "--out", str(out), "--figures", str(out / "figures"),
            "--quiet", *(["--set", "compile=true"] if compile_ else [])]
    t0 = time.perf_counter()
    rc = pipeline.main(argv)
    wall = time.perf_counter() - t0
    # the runner's own naming (--set gives the run <dataset>-<profile>-set-<hash>)
    run_dir, _ = pipeline.run_folders(pipeline.build_parser().parse_args(argv))
    manifest = json.loads((run_dir / "manifest.json").read_text())
    mode = "compiled" if compile_ else "eager"
    print(f"\nprofile {profile}, {mode}, on {os.cpu_count()} CPU cores, device {manifest['device']}:")
    for name, entry in manifest["notebooks"].items():
        print(f"  {name:30s} {entry.get('seconds', float('nan')):8.1f} s  {entry['status']}")
    for stage, t in manifest.get("training", {}).items():
        print(f"  training: {stage:20s} {t['seconds_trained']:8.1f} s over {t['models_trained']} models")
    if (run_dir / "timings.csv").is_file():  # written by the runner with the manifest
        import pandas as pd

        from fairkd_utils.profiles import get_profile

        t = pd.read_csv(run_dir / "timings.csv")
        erm = t[~t.reused & t.name.str.contains("student-erm-")]
        if len(erm):
            epoch = erm.seconds.mean() / get_profile(profile).student_epochs
            print(f"  student epoch time (ERM, with validation): {epoch:.2f} s")
    if compile_ and (run_dir / "run.log").is_file():
        spent = [float(s) for s in re.findall(r"compiled .* in ([0-9.]+) s", (run_dir / "run.log").read_text())]
        print(f"  compile time: {sum(spent):.1f} s over {len(spent)} first calls (model shape x mode x process)")
    target = TARGETS.get(profile)
    verdict = "" if target is None else f"  (target <= {target:.0f} s: {'PASS' if wall <= target else 'FAIL'}, ratio {wall / target:.2f})"
    print(f"  {'total (wall, with start-up)':30s} {wall:8.1f} s{verdict}")
    return rc, wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--keep", default=None, help="run into this folder instead of a temporary one")
    ap.add_argument("--compile", choices=("off", "on", "both"), default="off",
                    help="eager (off), compiled (on), or eager then compiled, with their ratio (both)")
    args = ap.parse_args()
    out = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fairkd-bench-"))
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    results = {c: bench(args.profile, out / ("compiled" if c else "eager") if len(modes) > 1 else out, c)
               for c in modes}
    if len(modes) > 1:
        (_, eager), (_, compiled) = results[False], results[True]
        print(f"\neager {eager:.1f} s, compiled {compiled:.1f} s: eager / compiled = {eager / compiled:.2f}x "
              f"(turned on by default only at >= 1.15x)")
    return max(rc for rc, _ in results.values())


if __name__ == "__main__":
    sys.exit(main())
