"""Compare a fresh run's summary.csv with the committed reference.

    .venv/bin/python bench/compare_reference.py                       # results/synthetic-default
    .venv/bin/python bench/compare_reference.py --run results/synthetic-default

Tolerances (per method, on the mean over seeds): accuracies (worst_group_acc,
avg_acc, train_weighted_acc, group_gap) within max(0.03, 2 x the reference's
seed std / sqrt(n_seeds) x sqrt(2)) — the spread of a difference of two
independent means; ece within 0.02. On the same machine and seeds the CPU run is
deterministic and the differences should be 0.
"""

import argparse
import math
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
ACC_METRICS = ("worst_group_acc", "avg_acc", "train_weighted_acc", "group_gap")


def tolerance(metric: str, ref_std: float, n: int) -> float:
    if metric == "ece":
        return 0.02
    se = (ref_std / math.sqrt(n)) * math.sqrt(2) if n > 1 and math.isfinite(ref_std) else 0.0
    return max(0.03, 2 * se)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=str(REPO / "results" / "synthetic-default"))
    ap.add_argument("--reference", default=str(REPO / "results" / "reference" / "synthetic-default"))
    args = ap.parse_args()
    run, ref = Path(args.run) / "summary.csv", Path(args.reference) / "summary.csv"
    for p in (run, ref):
        if not p.is_file():
            print(f"missing {p}: run `make reproduce` first", file=sys.stderr)
            return 2
    new, old = pd.read_csv(run), pd.read_csv(ref)
    m = old.merge(new, on=["method", "metric"], suffixes=("_ref", "_new"), how="left")
    rows, ok = [], True
    for r in m.itertuples():
        tol = tolerance(r.metric, r.std_ref, int(r.n_seeds_ref))
        diff = r.mean_new - r.mean_ref
        passed = bool(abs(diff) <= tol) if math.isfinite(diff) else False
        ok &= passed
        rows.append({"method": r.method, "metric": r.metric, "reference": r.mean_ref,
                     "fresh": r.mean_new, "diff": diff, "tolerance": tol,
                     "ok": "PASS" if passed else "FAIL"})
    out = pd.DataFrame(rows)
    with pd.option_context("display.width", 140, "display.max_rows", 200):
        print(out.round(4).to_string(index=False))
    print(f"\n{(out.ok == 'PASS').sum()}/{len(out)} within tolerance -> {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
