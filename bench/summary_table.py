"""Print a run's summary.csv as the README's Markdown table (test split, mean ± sd over
seeds, paired differences against kd and dedier_both with their 95 % intervals).

    .venv/bin/python bench/summary_table.py [results/reference/synthetic-default/summary.csv]
"""

import sys
from pathlib import Path

import pandas as pd

from fairkd_utils.profiles import METHODS

REPO = Path(__file__).resolve().parents[1]


def main(path=None) -> int:
    path = Path(path or REPO / "results" / "reference" / "synthetic-default" / "summary.csv")
    s = pd.read_csv(path)
    n = int(s.n_seeds.max())
    print(f"| method | worst-group acc | avg acc | train-weighted acc | Δ worst-group vs `kd` [95 % CI] "
          f"| Δ worst-group vs `dedier_both` [95 % CI] |  ({n} seeds)")
    print("|---|---|---|---|---|---|")
    wide = s.set_index(["method", "metric"])

    def cell(m, metric):
        r = wide.loc[(m, metric)]
        return f"{r['mean']:.3f} ± {r['std']:.3f}"

    def diff(m, base):
        r = wide.loc[(m, "worst_group_acc")]
        col = f"diff_vs_{base}_mean"
        if col not in r or pd.isna(r[col]):
            return "—"
        return f"{r[col]:+.3f} [{r[f'diff_vs_{base}_ci95_lo']:+.3f}, {r[f'diff_vs_{base}_ci95_hi']:+.3f}]"

    for m in [m for m in METHODS if m in set(s.method)]:
        print(f"| `{m}` | {cell(m, 'worst_group_acc')} | {cell(m, 'avg_acc')} | "
              f"{cell(m, 'train_weighted_acc')} | {diff(m, 'kd')} | {diff(m, 'dedier_both')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
