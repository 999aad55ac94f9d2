"""The calibration of the built-in miniatures: the conditions a miniature must meet
before any reweighting method is run (teacher, ERM student and its exit,
group-balanced ERM and kd only), and the text miniature's targets scaled from the
image ones by MultiNLI's numbers against Waterbirds'. Read by
``calibrate_synthetic.py``; the README's calibration tables come from it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fairkd_utils import metrics, synthetic_images
from fairkd_utils.profiles import TEXT_DATASETS


#: The calibration targets of the built-in miniature (test split unless stated), each
#: ``(condition, what, target)``; :func:`calibration_conditions` checks them. ``{margin}``
#: and ``{gain}`` are the two targets that depend on the benchmark the miniature copies
#: (``calibration_targets``; the image miniature's are :data:`IMAGE_TARGETS`).
CALIBRATION_TARGETS = (
    ("a_teacher_avg", "teacher average accuracy", ">= 0.90"),
    ("a_teacher_wga", "teacher worst-group accuracy", "in [0.55, 0.90]"),
    ("b_erm_gap", "ERM student worst-group accuracy - teacher's", "<= -0.15"),
    ("c_exit_wrong", "exit wrong on train minority groups (share)", ">= 0.50"),
    ("c_exit_margin", "exit's mean margin where wrong (train minority)", ">= {margin:.2f}"),
    ("d_gb_gain", "group_balanced_erm worst-group acc - ERM student's", ">= {gain:.2f}"),
    ("e_kd_room", "kd worst-group accuracy - teacher's", "<= -0.05"),
)

#: (c)'s margin and (d)'s gain on the image miniature (Waterbirds' counts): the values
#: the text targets are scaled from.
IMAGE_TARGETS = {"margin": 0.50, "gain": 0.20}


def shortcut_margin_ceiling(train_counts, n_attrs: int, groups) -> float:
    """How confident a reader of the spurious attribute alone is where it is wrong: the
    mean, over the training instances of ``groups`` (the minority groups), of the margin
    P(top label | a) - P(second label | a) of the Bayes classifier that sees only the
    attribute ``a``, from the training counts in the order ``g = y * n_attrs + a``.

    Waterbirds' counts give 0.765 (landbird on water: 0.703, waterbird on land: 0.968);
    MultiNLI's 0.625 (with negation: P(contradiction) 0.761 - P(neutral) 0.136). It is
    the reference level of a calibrated shortcut reader, not a bound on every exit: one
    that reads more than the attribute can be more confident on some instances.
    Groups with no training instances are left out."""
    counts = np.asarray(train_counts, dtype=float)
    groups = [int(k) for k in groups if 0 <= int(k) < len(counts) and counts[int(k)] > 0]
    if n_attrs < 2 or len(counts) % n_attrs or len(counts) <= n_attrs or not groups:
        raise ValueError(f"shortcut_margin_ceiling needs label x attribute counts (at least two "
                         f"labels) and non-empty minority groups (got {len(counts)} counts, "
                         f"n_attrs={n_attrs}, groups={groups})")
    table = counts.reshape(-1, n_attrs)               # rows: labels y; columns: attributes a
    p = np.sort(table / np.maximum(table.sum(0, keepdims=True), 1.0), axis=0)
    margin_of_attr = p[-1] - p[-2]
    attrs = np.asarray(groups) % n_attrs
    return float(np.average(margin_of_attr[attrs], weights=counts[np.asarray(groups)]))


def calibration_conditions(per_seed, targets: dict | None = None) -> pd.DataFrame:
    """The miniature's calibration conditions per seed and on the mean over seeds.

    ``per_seed``: a DataFrame with one row per seed and columns ``seed``,
    ``teacher_avg_acc``, ``teacher_wga``, ``erm_wga``, ``exit_minority_wrong``,
    ``exit_minority_margin_wrong``, ``gb_wga`` (group_balanced_erm) and ``kd_wga``.
    ``targets``: ``{"margin": ..., "gain": ...}`` for (c)'s margin and (d)'s gain
    (default :data:`IMAGE_TARGETS`; ``calibration_targets`` derives the text ones).
    Returns tidy rows ``seed`` ("mean" for the mean over seeds), ``condition``,
    ``what``, ``target``, ``value``, ``passed``. The conditions use the teacher, the
    ERM student, its exit, group-balanced ERM and plain kd only — never a
    reweighting method, so they cannot be tuned towards one."""

    t = {**IMAGE_TARGETS, **(targets or {})}
    need = ["seed", "teacher_avg_acc", "teacher_wga", "erm_wga", "exit_minority_wrong",
            "exit_minority_margin_wrong", "gb_wga", "kd_wga"]
    missing = [c for c in need if c not in per_seed.columns]
    if missing:
        raise ValueError(f"calibration_conditions needs columns {missing}")
    frame = per_seed[need].copy()
    mean = frame.drop(columns="seed").mean().to_dict()
    rows = []
    for seed, r in [*((s, d) for s, d in zip(frame.seed, frame.to_dict("records"))), ("mean", mean)]:
        values = {
            "a_teacher_avg": (r["teacher_avg_acc"], r["teacher_avg_acc"] >= 0.90),
            "a_teacher_wga": (r["teacher_wga"], 0.55 <= r["teacher_wga"] <= 0.90),
            "b_erm_gap": (r["erm_wga"] - r["teacher_wga"], r["erm_wga"] <= r["teacher_wga"] - 0.15),
            "c_exit_wrong": (r["exit_minority_wrong"], r["exit_minority_wrong"] >= 0.50),
            "c_exit_margin": (r["exit_minority_margin_wrong"],
                              r["exit_minority_margin_wrong"] >= t["margin"]),
            "d_gb_gain": (r["gb_wga"] - r["erm_wga"], r["gb_wga"] >= r["erm_wga"] + t["gain"]),
            "e_kd_room": (r["kd_wga"] - r["teacher_wga"], r["kd_wga"] <= r["teacher_wga"] - 0.05),
        }
        for cond, what, target in CALIBRATION_TARGETS:
            value, ok = values[cond]
            rows.append({"seed": seed, "condition": cond, "what": what,
                         "target": target.format(**t), "value": float(value), "passed": bool(ok)})
    return pd.DataFrame(rows)


#: Worst-group test accuracy of ERM and of group DRO on the two benchmarks the
#: miniatures copy, from one table (Liu et al. 2021, "Just Train Twice", Table 1):
#: how much balancing the groups is worth on each.
LITERATURE_WGA = {"waterbirds": {"erm": 0.726, "group_dro": 0.914},
                  "multinli": {"erm": 0.679, "group_dro": 0.777}}


def calibration_targets(train_counts, n_attrs: int, dataset: str) -> dict:
    """(c)'s margin and (d)'s gain (:func:`calibration_conditions`) for ``dataset``.

    The image targets (``IMAGE_TARGETS``: margin 0.50, gain 0.20) were set on
    Waterbirds' numbers. A text miniature copies MultiNLI, where the shortcut allows
    less confidence and balancing the groups gains less, so both are scaled by the
    ratio of the two benchmarks' own numbers, fixed from the data and the literature
    before any method is run:

    - margin: 0.50 x the shortcut's ceiling on these training counts (0.625 for
      MultiNLI's, :func:`shortcut_margin_ceiling`) / Waterbirds' (0.765): 0.41;
    - gain: 0.20 x MultiNLI's group DRO - ERM gain (0.098) / Waterbirds' (0.188): 0.10.

    Rounded to two decimals, as printed and checked. Raises where the training counts
    have no minority group (all groups the same size)."""
    image = IMAGE_TARGETS
    if dataset not in TEXT_DATASETS:
        return dict(image)
    wb = synthetic_images.WATERBIRDS_COUNTS["train"]
    ceiling = shortcut_margin_ceiling(
        train_counts, n_attrs, metrics.minority_groups(train_counts, n_attrs))
    wb_ceiling = shortcut_margin_ceiling(wb, 2, metrics.minority_groups(wb, 2))
    gain = {k: v["group_dro"] - v["erm"] for k, v in LITERATURE_WGA.items()}
    return {"margin": round(image["margin"] * ceiling / wb_ceiling, 2),
            "gain": round(image["gain"] * gain["multinli"] / gain["waterbirds"], 2)}
