"""Group metrics of the study, computed in float64 from probabilities.

Names are the exact strings of the tables (README, "Where things land"): ``worst_group_acc``, ``avg_acc`` (the
test distribution's own accuracy), ``train_weighted_acc`` (group accuracies
weighted by the *training* group proportions, the Waterbirds convention),
``group_gap`` (best minus worst group accuracy), ``ece`` and ``nll``.

Every function accepts torch tensors or numpy arrays.  ``probs`` is (N, C)
probabilities (rows summing to 1), ``y`` (N,) labels, ``g`` (N,) group indices.
Empty groups get accuracy NaN and are ignored by worst/gap/weighted summaries.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch
from scipy import stats

from .profiles import BASELINES, METHODS

__all__ = ["group_accuracy", "worst_group_acc", "avg_acc", "train_weighted_acc", "group_gap", "ece", "nll",
           "metric_rows", "summarize", "SUMMARY_METRICS", "auroc", "per_seed_metrics", "mean_interval",
           "summary_table", "paired_differences", "within_wrong_rank_corr", "topk_overlap",
           "group_weight_share", "minority_groups", "format_summary", "format_paired", "verdict", "verdicts"]

#: The scalar metrics of ``summary.csv`` (per method, over seeds).
SUMMARY_METRICS = ("worst_group_acc", "avg_acc", "train_weighted_acc", "group_gap", "ece")


def _t(x, dtype=None) -> torch.Tensor:
    t = torch.as_tensor(x if isinstance(x, torch.Tensor) else np.asarray(x)).detach().cpu()
    return t if dtype is None else t.to(dtype)


def _pred(probs_or_pred) -> torch.Tensor:
    """Predicted labels from (N, C) scores or (N,) labels."""
    t = _t(probs_or_pred)
    return t.argmax(dim=1) if t.ndim == 2 else t.long()


def _probs(probs) -> torch.Tensor:
    """``probs`` as a float64 tensor, checked to be (N, C) rows of probabilities."""
    probs = _t(probs, torch.float64)
    if probs.ndim != 2:
        raise ValueError(f"expected probabilities of shape (N, C), got {tuple(probs.shape)}")
    if probs.numel() and ((probs < -1e-6).any() or (probs.sum(1) - 1).abs().max() > 1e-3):
        raise ValueError("rows of probs must be probabilities summing to 1 "
                         "(pass softmax(logits), not logits)")
    return probs


def group_accuracy(probs_or_pred, y, g, n_groups: int | None = None) -> np.ndarray:
    """Accuracy per group, float64 array of length ``n_groups`` (NaN for an empty group)."""
    pred, y, g = _pred(probs_or_pred), _t(y).long(), _t(g).long()
    n_groups = int(g.max()) + 1 if n_groups is None else int(n_groups)
    correct = (pred == y).double()
    n = torch.bincount(g, minlength=n_groups).double()
    hits = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, g, correct)
    acc = torch.where(n > 0, hits / n.clamp_min(1), torch.full_like(n, float("nan")))
    return acc.numpy()


def worst_group_acc(group_acc) -> float:
    """Lowest accuracy over the (non-empty) groups."""
    return float(np.nanmin(np.asarray(group_acc, dtype=np.float64)))


def group_gap(group_acc) -> float:
    """Best minus worst group accuracy."""
    acc = np.asarray(group_acc, dtype=np.float64)
    return float(np.nanmax(acc) - np.nanmin(acc))


def avg_acc(probs_or_pred, y) -> float:
    """Plain accuracy over the evaluated split (its own group mix)."""
    pred, y = _pred(probs_or_pred), _t(y).long()
    return float((pred == y).double().mean())


def train_weighted_acc(group_acc, train_group_counts) -> float:
    """Group accuracies weighted by the training split's group proportions (the
    Waterbirds convention: the test set is group-balanced within classes, unlike
    the training distribution the average should describe)."""
    acc = np.asarray(group_acc, dtype=np.float64)
    w = np.asarray(_t(train_group_counts).double().numpy(), dtype=np.float64)
    if w.shape != acc.shape:
        raise ValueError(f"{len(w)} train group counts for {len(acc)} group accuracies")
    keep = ~np.isnan(acc)
    return float((acc[keep] * w[keep]).sum() / w[keep].sum())


def ece(probs, y, n_bins: int = 15) -> float:
    """Expected calibration error of the top label, ``n_bins`` equal-width bins
    (L1).  Binning as torchmetrics' ``MulticlassCalibrationError(norm="l1")``:
    bin k holds confidences in [k/n, (k+1)/n); a confidence of exactly 1 gets a
    bin of its own."""
    probs = _probs(probs)
    y = _t(y).long()
    if len(y) == 0:
        return float("nan")
    conf, pred = probs.max(dim=1)
    correct = (pred == y).double()
    bounds = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    idx = torch.bucketize(conf, bounds, right=True) - 1
    conf_sum = torch.zeros(n_bins + 1, dtype=torch.float64).index_add_(0, idx, conf)
    acc_sum = torch.zeros(n_bins + 1, dtype=torch.float64).index_add_(0, idx, correct)
    # sum_b |acc_b - conf_b| * n_b / N  ==  sum_b |acc_sum_b - conf_sum_b| / N
    return float((acc_sum - conf_sum).abs().sum() / len(y))


def nll(probs, y, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood of the true label (probabilities clamped at ``eps``)."""
    probs = _probs(probs)
    y = _t(y).long()
    if len(y) == 0:
        return float("nan")
    p = probs.gather(1, y[:, None]).squeeze(1).clamp_min(eps)
    return float(-p.log().mean())


def metric_rows(probs, y, g, group_names: Sequence[str], **keys) -> list[dict]:
    """Rows for ``metrics.csv``: one per group plus ``group="all"``, each
    ``{**keys, group, group_name, n, acc, ece, nll}``.

    ``keys`` are the table's key columns (dataset, profile, seed, config_id,
    model, method, predictive, split), passed through unchanged.  ``group`` is
    the group index (``"all"`` for the overall row; after a CSV round trip the
    column reads as strings)."""
    probs = _probs(probs)
    y, g = _t(y).long(), _t(g).long()
    pred = probs.argmax(1)
    # an empty group's acc, ece and nll are NaN (the mean of nothing; ece and nll say so)
    masks = [(k, name, g == k) for k, name in enumerate(group_names)]
    masks.append(("all", "all", torch.ones_like(y, dtype=torch.bool)))
    return [{**keys, "group": k, "group_name": name, "n": int(m.sum()),
             "acc": float((pred[m] == y[m]).double().mean()), "ece": ece(probs[m], y[m]),
             "nll": nll(probs[m], y[m])} for k, name, m in masks]


def summarize(probs, y, g, n_groups: int, train_group_counts=None) -> dict:
    """The study's scalar metrics for one model on one split:
    worst_group_acc, avg_acc, train_weighted_acc (NaN without train counts),
    group_gap, ece, nll, and the per-group accuracies as ``acc_g{k}``."""
    acc = group_accuracy(probs, y, g, n_groups)
    return {"worst_group_acc": worst_group_acc(acc), "avg_acc": avg_acc(probs, y),
            "train_weighted_acc": (train_weighted_acc(acc, train_group_counts)
                                   if train_group_counts is not None else float("nan")),
            "group_gap": group_gap(acc), "ece": ece(probs, y), "nll": nll(probs, y),
            **{f"acc_g{k}": float(a) for k, a in enumerate(acc)}}


# --------------------------------------------------------------------------- statistics over seeds
def minority_groups(train_counts, n_attrs: int) -> list[int]:
    """The shortcut-conflicting groups: ``(y, a)`` whose label the attribute makes at
    least twice less likely than it is overall, P(y | a) < P(y) / 2, read from the
    training counts in the library's order ``g = y * n_attrs + a`` (``n_attrs``: the
    dataset's ``ds.n_attrs``; a folder dataset's attribute may take more than two
    values). Waterbirds: the two background-mismatched groups; CelebA: blond men;
    MultiNLI: entailment and neutral with negation (not contradiction with negation,
    which is small but agrees with the shortcut). When no group conflicts (e.g.
    balanced data), the smallest group(s); none when all groups have the same size."""
    counts = np.asarray(train_counts, dtype=float)
    small = np.array([], dtype=int)
    if n_attrs >= 2 and len(counts) % n_attrs == 0 and len(counts) > n_attrs and counts.sum() > 0:
        table = counts.reshape(-1, n_attrs)  # rows: labels y; columns: attributes a
        p_y = table.sum(1, keepdims=True) / table.sum()
        with np.errstate(invalid="ignore", divide="ignore"):
            p_y_given_a = table / table.sum(0, keepdims=True)
        small = np.flatnonzero((p_y_given_a < 0.5 * p_y).ravel())
    if len(small) == 0 and counts.min() < counts.max():
        small = np.flatnonzero(counts == counts.min())
    return [int(k) for k in small]


def auroc(scores, labels) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (Mann-Whitney U,
    ties counted one half); NaN when a class is absent. Direction as given: no
    ``max(AUC, 1 - AUC)``."""
    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def per_seed_metrics(metrics, groups, model: str = "student", split: str = "test"):
    """One row per (method, config_id, seed): the study's scalar metrics of
    ``model`` on ``split``, from ``metrics.csv`` and ``groups.csv`` alone."""
    m = metrics[(metrics.model == model) & (metrics.split == split) & (metrics.predictive == "map")]
    train_n = groups[groups.split == "train"].set_index("group_name")["n"]
    rows = []
    for (method, cid, seed), d in m.groupby(["method", "config_id", "seed"], sort=True):
        overall = d[d.group_name == "all"]
        acc = d[d.group_name != "all"].set_index("group_name")["acc"]
        counts = train_n.reindex(acc.index).to_numpy(dtype=float)
        rows.append({"method": method, "config_id": cid, "seed": int(seed),
                     "worst_group_acc": worst_group_acc(acc), "avg_acc": float(overall["acc"].iloc[0]),
                     "train_weighted_acc": train_weighted_acc(acc.to_numpy(), counts),
                     "group_gap": group_gap(acc), "ece": float(overall["ece"].iloc[0])})
    return pd.DataFrame(rows)


def mean_interval(values, level: float = 0.95) -> tuple[float, float, float, float]:
    """Mean, sample std and the Student-t interval of the mean."""
    v = np.asarray(values, dtype=float)
    n, mean = len(v), float(np.mean(v))
    if n < 2:
        return mean, float("nan"), float("nan"), float("nan")
    sd = float(np.std(v, ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / np.sqrt(n)
    return mean, sd, mean - half, mean + half


#: The columns of an interval over seeds in ``summary.csv`` (see :func:`mean_interval`).
_STATS = ("mean", "std", "ci95_lo", "ci95_hi")


def summary_table(per_seed, baselines=BASELINES):
    """``summary.csv``: per (method, config_id, metric) the mean, std and 95 %
    interval over seeds, and the paired per-seed difference against each of
    ``baselines`` (same seed), with its own interval: columns
    ``diff_vs_<baseline>_{mean,std,ci95_lo,ci95_hi}`` and ``paired_seeds_vs_<baseline>``."""
    if isinstance(baselines, str):
        baselines = (baselines,)
    bases = {}
    for baseline in baselines:
        base = per_seed[per_seed.method == baseline]
        if base.config_id.nunique() > 1:
            raise ValueError(f"{baseline} has several configurations {sorted(base.config_id.unique())}: "
                             "filter per_seed to the chosen configurations first")
        if len(base):
            bases[baseline] = base.set_index("seed")
    rows = []
    for (method, cid), d in per_seed.groupby(["method", "config_id"], sort=False):
        d = d.set_index("seed")
        for metric in SUMMARY_METRICS:
            row = {"method": method, "config_id": cid, "metric": metric, "n_seeds": len(d),
                   **dict(zip(_STATS, mean_interval(d[metric])))}
            for baseline, base in bases.items():
                if method == baseline:
                    continue
                common = d.index.intersection(base.index)
                diff = d.loc[common, metric] - base.loc[common, metric]
                row.update({f"diff_vs_{baseline}_{k}": v for k, v in
                            zip(_STATS, mean_interval(diff) if len(diff) else (float("nan"),) * 4)})
                row[f"paired_seeds_vs_{baseline}"] = len(common)
            rows.append(row)
    order = {m: i for i, m in enumerate(METHODS)}
    out = pd.DataFrame(rows)
    return out.sort_values(["metric", "method"], key=lambda s: s.map(order) if s.name == "method" else s,
                           kind="stable").reset_index(drop=True)


def paired_differences(per_seed, metric: str = "worst_group_acc", baselines=BASELINES):
    """Per-seed differences against each of ``baselines`` with the interval of their
    mean: rows baseline, method, seed, diff, lo, hi."""
    rows = []
    for baseline in [b for b in baselines if b in set(per_seed.method)]:
        base = per_seed[per_seed.method == baseline].set_index("seed")[metric]
        for method, d in per_seed[per_seed.method != baseline].groupby("method"):
            diff = (d.set_index("seed")[metric] - base).dropna()
            _, _, lo, hi = mean_interval(diff)
            rows += [{"baseline": baseline, "method": method, "seed": s, "diff": v, "lo": lo, "hi": hi}
                     for s, v in diff.items()]
    return pd.DataFrame(rows, columns=["baseline", "method", "seed", "diff", "lo", "hi"])


# --------------------------------------------------------------------------- the tables, in words
def _paired(row, baseline: str) -> str:
    """``row``'s paired difference against ``baseline`` as "mean [95 % interval]"."""
    mean, lo, hi = (row[f"diff_vs_{baseline}_{k}"] for k in ("mean", "ci95_lo", "ci95_hi"))
    return f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def format_summary(summary, methods) -> pd.DataFrame:
    """``summary.csv`` as a reader's table: one row per method of ``methods`` (in that
    order), one column per :data:`SUMMARY_METRICS`, each "mean ± sd [95 % interval]"."""
    cells = summary.assign(value=[f"{r['mean']:.3f} ± {r['std']:.3f} [{r['ci95_lo']:.3f}, {r['ci95_hi']:.3f}]"
                                  for _, r in summary.iterrows()])
    return cells.pivot(index="method", columns="metric", values="value").reindex(methods)[list(SUMMARY_METRICS)]


def format_paired(summary, methods, baselines=BASELINES, metric: str = "worst_group_acc") -> pd.DataFrame:
    """Each method's paired difference in ``metric`` against each baseline, "mean
    [95 % interval]" (empty for a baseline against itself)."""
    rows = summary[summary.metric == metric].set_index("method")
    return pd.DataFrame({f"vs {b}": ["" if pd.isna(rows.loc[m].get(f"diff_vs_{b}_mean"))
                                     else _paired(rows.loc[m], b) for m in methods]
                         for b in baselines}, index=list(methods))


def verdict(row, baseline: str = "dedier_both") -> str:
    """"better than", "worse than" or "not distinguishable from" ``baseline``: whether the
    paired difference's whole 95 % interval lies above zero, below it, or neither."""
    lo, hi = row[f"diff_vs_{baseline}_ci95_lo"], row[f"diff_vs_{baseline}_ci95_hi"]
    return "better than" if lo > 0 else "worse than" if hi < 0 else "not distinguishable from"


def verdicts(summary, references=(), metric: str = "worst_group_acc", matched=None) -> str:
    """In words: the methods ranked by mean test ``metric`` (``references``, which use
    group labels, left out), then the primary contrast (Laplace-KD - DeDiER, both terms),
    Laplace-KD trained at DeDiER's beta - DeDiER when ``matched`` (notebook 05's
    ``matched_beta.csv``, a :func:`summary_table` against ``dedier_both``) is given, and,
    when present, the readout ablation (DeDiER from the final head - from the exit)."""
    rows = summary[summary.metric == metric].set_index("method")
    ranked = rows.drop(index=[m for m in references if m in rows.index])["mean"].sort_values(ascending=False)
    lines = [f"Mean test {metric}, best first (references {[m for m in references if m in rows.index]} "
             "use group labels, excluded):"]
    width = max(map(len, ranked.index), default=0)
    lines += [f"  {m:{width}s} {v:.3f} ± {rows.loc[m, 'std']:.3f}" for m, v in ranked.items()]
    at_beta = None if matched is None else matched[matched.metric == metric].set_index("method")
    for method, what, table in (
            ("laplace_kd", "Laplace-KD - DeDiER (both terms)", rows),
            ("laplace_kd", "Laplace-KD at DeDiER's beta - DeDiER (both terms)", at_beta),
            ("dedier_final", "DeDiER read from the final head - from the early exit", rows)):
        if table is not None and {method, "dedier_both"} <= set(table.index):
            r = table.loc[method]
            lines.append(f"{what}, {metric}, paired over {int(r['paired_seeds_vs_dedier_both'])} seeds: "
                         f"{_paired(r, 'dedier_both')} -> {method} is {verdict(r)} dedier_both here.")
    return "\n".join(lines)


# --------------------------------------------------------------------------- agreement of two weightings
def _weights(w, name: str) -> np.ndarray:
    a = np.asarray(_t(w).double().numpy() if isinstance(w, torch.Tensor) else w, dtype=np.float64)
    if a.ndim != 1 or not np.isfinite(a).all():
        raise ValueError(f"{name} must be a 1-d array of finite weights, got shape {a.shape}")
    return a


def within_wrong_rank_corr(w_ref, w_other, wrong) -> dict:
    """Spearman and Kendall (tau-b) rank correlation of two per-instance weightings,
    restricted to the instances where ``wrong`` is True (the only ones a
    wrong-instance reweighting moves; over all instances the ties at weight 1
    dominate and hide any disagreement). Spearman is Pearson's correlation of the
    average ranks. Both NaN when fewer than two wrong instances remain or either
    weighting is constant on them."""
    a, b = _weights(w_ref, "w_ref"), _weights(w_other, "w_other")
    m = np.asarray(_t(wrong).numpy() if isinstance(wrong, torch.Tensor) else wrong, dtype=bool)
    if not (len(a) == len(b) == len(m)):
        raise ValueError(f"w_ref, w_other and wrong must have one entry per instance "
                         f"(got {len(a)}, {len(b)}, {len(m)})")
    a, b = a[m], b[m]
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return {"spearman": float("nan"), "kendall": float("nan")}
    rho = float(np.corrcoef(stats.rankdata(a), stats.rankdata(b))[0, 1])
    return {"spearman": rho, "kendall": float(stats.kendalltau(a, b, variant="b").statistic)}


def _top_k(w: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest weights; ties go to the lower index (stable sort)."""
    return np.argsort(-w, kind="stable")[:k]


def topk_overlap(w_ref, w_other, k: int) -> float:
    """Share of the ``k`` most upweighted instances of ``w_ref`` that are also among
    the ``k`` most upweighted of ``w_other``. Ties are broken deterministically by
    instance index (the lower index ranks higher), in both weightings."""
    a, b = _weights(w_ref, "w_ref"), _weights(w_other, "w_other")
    if len(a) != len(b):
        raise ValueError(f"w_ref and w_other have {len(a)} and {len(b)} entries")
    if not 1 <= int(k) <= len(a):
        raise ValueError(f"topk_overlap needs 1 <= k <= {len(a)} (the number of instances), got k={k}")
    k = int(k)
    return len(np.intersect1d(_top_k(a, k), _top_k(b, k))) / k


def group_weight_share(w, g, n_groups: int) -> np.ndarray:
    """Each group's share of the total weight, float64 array of length ``n_groups``
    summing to 1 (0 for an empty group)."""
    a = _weights(w, "w")
    g = np.asarray(_t(g).long().numpy() if isinstance(g, torch.Tensor) else g).astype(np.int64)
    if g.shape != a.shape or (len(g) and (g.min() < 0 or g.max() >= n_groups)):
        raise ValueError(f"g must give a group in [0, {n_groups}) for each of the {len(a)} weights")
    if (a < 0).any() or a.sum() <= 0:
        raise ValueError("group_weight_share needs non-negative weights with a positive total")
    return np.bincount(g, weights=a, minlength=n_groups) / a.sum()
