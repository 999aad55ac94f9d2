"""Every figure of the study, drawn from tidy tables, with one palette and one
set of names so that notebooks and slides agree.

``savefig(fig, figures_dir / "04_reliability")`` writes ``.png`` (for reading)
and ``.pdf`` (for slides), both byte-stable across reruns.
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from . import records
from .losses import METHOD_SPECS

METHOD_ORDER = list(METHOD_SPECS)
METHOD_LABELS = {m: spec.label for m, spec in METHOD_SPECS.items()}
METHOD_COLORS = {
    "erm": "#7f7f7f", "kd": "#1f77b4", "dedier": "#ff7f0e", "dedier_both": "#d62728",
    "laplace_kd": "#2ca02c", "shuffled": "#e377c2", "group_balanced": "#222222",
    "group_balanced_erm": "#8c564b", "dedier_final": "#bcbd22", "jtt": "#17becf",
    "dfr": "#7b4173",
}
#: Methods that use group labels in training: drawn hollow, marked as references.
REFERENCES = [m for m, spec in METHOD_SPECS.items() if spec.group_labels]
MODEL_COLORS = {"teacher": "#9467bd", "student": "#1f77b4", "exit": "#ff7f0e",
                "exit_laplace": "#2ca02c"}
PREDICTIVE_COLORS = {"map": "#ff7f0e", "probit": "#2ca02c", "mc": "#17becf"}
SPLIT_ORDER = ["train", "val", "test"]


def use_style() -> None:
    """The study's plotting style (called on import; idempotent)."""
    sns.set_theme(context="notebook", style="whitegrid", font_scale=1.05)
    plt.rcParams.update({
        "figure.dpi": 110, "savefig.dpi": 200, "savefig.bbox": "tight",
        "axes.titleweight": "bold", "axes.spines.top": False, "axes.spines.right": False,
        "legend.frameon": False, "pdf.fonttype": 42, "svg.hashsalt": "fairkd",
    })


use_style()


def group_palette(group_names) -> dict:
    """A colour per group: blues for label 0, oranges for label 1 (majority darker)."""
    names = list(group_names)
    cols = sns.color_palette("Paired", n_colors=max(len(names), 4))
    order = [1, 0, 6, 7, 3, 2, 5, 4, 9, 8, 11, 10]
    return {n: cols[order[i % len(order)] % len(cols)] for i, n in enumerate(names)}


def savefig(fig, stem, close: bool = True) -> None:
    """Write ``stem.png`` and ``stem.pdf`` atomically; the PDF carries no
    creation date so reruns are byte-identical."""
    stem = Path(stem)
    for fmt, meta in (("png", {"Software": None}), ("pdf", {"CreationDate": None, "Producer": None})):
        path = stem.with_suffix(f".{fmt}")
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, metadata=meta)
        records.write_bytes(path, buf.getvalue())
    if close:
        plt.close(fig)


def _method_label(m):
    return METHOD_LABELS.get(m, m)


def _present(order, values):
    values = list(dict.fromkeys(values))
    return [v for v in order if v in values] + [v for v in values if v not in order]


# --------------------------------------------------------------------- notebook 01
def group_counts(groups: pd.DataFrame):
    """Bar chart of samples per group and split (log scale: groups differ ~60x)."""
    names = list(dict.fromkeys(groups.sort_values("group")["group_name"]))
    splits = _present(SPLIT_ORDER, groups["split"])
    fig, ax = plt.subplots(figsize=(8, 4.2))
    sns.barplot(data=groups, x="split", y="n", hue="group_name", order=splits, hue_order=names,
                palette=group_palette(names), ax=ax)
    for cont in ax.containers:
        ax.bar_label(cont, fmt="%d", fontsize=8, padding=1)
    ax.set_yscale("log")
    ax.set_ylabel("instances (log scale)")
    ax.set_xlabel("")
    ax.set_title("Instances per group and split")
    ax.legend(title=None, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def group_samples(images: dict, n_cols: int | None = None):
    """A row of example images per group; ``images`` maps group name -> list of HWC arrays."""
    n_rows = len(images)
    n_cols = n_cols or max(len(v) for v in images.values())
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.25 * n_cols + 1.6, 1.3 * n_rows),
                             squeeze=False)
    for r, (name, imgs) in enumerate(images.items()):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.set_xticks([]), ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if c < len(imgs):
                ax.imshow(np.clip(imgs[c], 0, 1), interpolation="nearest")
        axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=10)
    fig.suptitle("Examples per group (label on background)", fontweight="bold")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------- notebooks 02-03
def group_accuracy_bars(df: pd.DataFrame, hue: str = "model", title: str = "", palette=None):
    """Per-group accuracy bars (``df``: group_name, acc, and the ``hue`` column),
    error bars over seeds where there are several."""
    names = [n for n in dict.fromkeys(df["group_name"]) if n != "all"]
    names = names + (["all"] if (df["group_name"] == "all").any() else [])
    fig, ax = plt.subplots(figsize=(8.5, 4))
    hue_order = list(dict.fromkeys(df[hue]))
    pal = palette or {h: MODEL_COLORS.get(h, METHOD_COLORS.get(h, None)) for h in hue_order}
    if any(v is None for v in pal.values()):
        pal = None
    sns.barplot(data=df, x="group_name", y="acc", hue=hue, order=names, hue_order=hue_order,
                palette=pal, errorbar="sd", capsize=0.1, ax=ax)
    for cont in ax.containers:
        if hasattr(cont, "datavalues"):
            ax.bar_label(cont, fmt="%.2f", fontsize=8, padding=2)
    ax.set_ylim(0, 1.08)
    ax.set_xlabel("")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.tick_params(axis="x", labelrotation=12)
    ax.legend(title=None, loc="lower left")
    return fig


def confidence_by_group(df: pd.DataFrame, value: str = "prob", hue: str = "correct",
                        col: str | None = None, title: str = ""):
    """Distribution of a confidence score per group, right vs wrong predictions apart.
    ``df``: group_name, ``value``, ``hue`` (and optionally ``col`` for facets)."""
    df = df.copy()
    if hue == "correct":
        df["prediction"] = np.where(df["correct"].astype(bool), "right", "wrong")
        hue, hue_order, pal = "prediction", ["right", "wrong"], {"right": "#4c72b0", "wrong": "#c44e52"}
    else:
        hue_order = list(dict.fromkeys(df[hue]))
        pal = PREDICTIVE_COLORS if set(hue_order) <= set(PREDICTIVE_COLORS) else None
    order = list(dict.fromkeys(df.sort_values("group")["group_name"])) if "group" in df else None
    cols = list(dict.fromkeys(df[col])) if col else [None]
    fig, axes = plt.subplots(1, len(cols), figsize=(5.2 * len(cols) + 1, 4.2), squeeze=False, sharey=True)
    for ax, c in zip(axes[0], cols):
        sub = df if c is None else df[df[col] == c]
        sns.boxplot(data=sub, x="group_name", y=value, hue=hue, order=order, hue_order=hue_order,
                    palette=pal, showfliers=False, width=0.7, ax=ax)
        shown = sub.sample(frac=1.0, random_state=0).groupby([hue, "group_name"]).head(60)
        state = np.random.get_state()  # seaborn jitters with numpy's global generator:
        np.random.seed(0)              # seed it here so reruns draw byte-identical figures
        try:
            sns.stripplot(data=shown,
                          x="group_name", y=value, hue=hue, order=order, hue_order=hue_order,
                          dodge=True, palette=pal, size=2, alpha=0.45, legend=False, ax=ax)
        finally:
            np.random.set_state(state)
        ax.set_xlabel("")
        ax.set_title(f"{col} = {c}" if c is not None else "")
        ax.tick_params(axis="x", labelrotation=15)
        if ax is axes[0][-1]:
            ax.legend(title=None, loc="best")
        elif ax.get_legend():
            ax.get_legend().remove()
    axes[0][0].set_ylabel(value)
    fig.suptitle(title, fontweight="bold")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------- notebook 04
def laplace_samples(samples: list[dict], title: str = "Samples of the exit's predictive"):
    """Clouds of sampled exit logits for example instances (two classes).

    ``samples``: dicts with keys group_name, form ('exact'|'kron'), z (S, 2) array,
    mean (2,), y. Each panel shows the MAP logit, the sample cloud of both
    forms and the decision line z0 = z1."""
    groups = list(dict.fromkeys(s["group_name"] for s in samples))
    fig, axes = plt.subplots(1, len(groups), figsize=(3.6 * len(groups), 3.8), squeeze=False)
    colors = {"exact": "#2ca02c", "kron": "#9467bd"}
    for ax, gname in zip(axes[0], groups):
        cur = [s for s in samples if s["group_name"] == gname]
        allz = np.concatenate([np.asarray(s["z"]) for s in cur])
        lo, hi = np.percentile(allz, [1, 99])
        pad = 0.15 * (hi - lo + 1e-6)
        for s in cur:
            z = np.asarray(s["z"])
            ax.scatter(z[:, 0], z[:, 1], s=5, alpha=0.3, color=colors.get(s["form"], None),
                       label=f"{s['form']} prior", rasterized=True)
        m = np.asarray(cur[0]["mean"])
        ax.scatter([m[0]], [m[1]], marker="*", s=160, color="black", zorder=5, label="MAP")
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="#c44e52", lw=1.2, ls="--",
                label="decision line")
        ax.set_xlim(lo - pad, hi + pad), ax.set_ylim(lo - pad, hi + pad)
        ax.set_aspect("equal")
        ax.set_title(f"{gname}\n(true y = {cur[0]['y']})", fontsize=10)
        ax.set_xlabel("logit 0")
    axes[0][0].set_ylabel("logit 1")
    handles, labels = axes[0][0].get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    fig.suptitle(title, fontweight="bold")
    fig.tight_layout()
    fig.legend(uniq.values(), uniq.keys(), loc="upper center", ncol=len(uniq), markerscale=1.5,
               bbox_to_anchor=(0.5, 0.0))
    return fig


def reliability_curve(prob_max: np.ndarray, correct: np.ndarray, n_bins: int = 15):
    """Mean confidence, accuracy and count per equal-width bin (top label)."""
    edges = np.linspace(0, 1, n_bins + 1)
    idx = np.clip(np.digitize(prob_max, edges[1:-1], right=True), 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        m = idx == b
        if m.any():
            rows.append({"bin": b, "confidence": prob_max[m].mean(), "accuracy": correct[m].mean(),
                         "n": int(m.sum())})
    return pd.DataFrame(rows)


def reliability(df: pd.DataFrame, hue: str = "predictive", ece: dict | None = None,
                title: str = "Reliability of the early exit"):
    """Reliability diagram: ``df`` has prob (top-label confidence), correct and ``hue``."""
    fig, ax = plt.subplots(figsize=(5.2, 5))
    ax.plot([0, 1], [0, 1], color="#888888", ls="--", lw=1, label="perfect calibration")
    for h in dict.fromkeys(df[hue]):
        sub = df[df[hue] == h]
        curve = reliability_curve(sub["prob"].to_numpy(), sub["correct"].to_numpy().astype(float))
        lab = f"{h}" + (f" (ECE {ece[h]:.3f})" if ece and h in ece else "")
        ax.plot(curve["confidence"], curve["accuracy"], marker="o", ms=4,
                color=PREDICTIVE_COLORS.get(h), label=lab)
    ax.set_xlim(0.45 if df["prob"].min() >= 0.45 else 0, 1.0)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("confidence (top label)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=9)
    return fig


def score_auroc(df: pd.DataFrame, title: str = "Which score singles out hard instances?"):
    """AUROC per score and target (``df``: score, target, auroc[, auroc_std])."""
    fig, ax = plt.subplots(figsize=(8, 4))
    sns.barplot(data=df, x="score", y="auroc", hue="target", errorbar="sd" if "seed" in df else None,
                capsize=0.1, palette="Set2", ax=ax)
    for cont in ax.containers:
        if hasattr(cont, "datavalues"):
            ax.bar_label(cont, fmt="%.2f", fontsize=9, label_type="center")
    ax.axhline(0.5, color="#444444", ls="--", lw=1, label="chance")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("")
    ax.set_ylabel("AUROC (expected direction)")
    ax.set_title(title)
    ax.tick_params(axis="x", labelrotation=10)
    ax.legend(title=None, loc="lower right")
    return fig


# --------------------------------------------------------------------- notebooks 05-06
def weights_by_group(weights: pd.DataFrame, term: str | None = None):
    """Mean instance weight per group over epochs, one panel per method: of ``term``, or
    (None) of the term each method weights (KD where it weights both)."""
    if "term" in weights:
        own = weights["method"].map(lambda m: METHOD_SPECS[m].terms[-1] if METHOD_SPECS[m].terms else "kd")
        df = weights[weights["term"] == (term or own)]
    else:
        df = weights
    methods = _present(METHOD_ORDER, df["method"])
    names = list(dict.fromkeys(df.sort_values("group")["group_name"]))
    ncols = min(3, len(methods))
    nrows = -(-len(methods) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols + 1.8, 3.2 * nrows), sharey=True,
                             sharex=True, squeeze=False)
    flat = axes.ravel()
    for ax, m in zip(flat, methods):
        sns.lineplot(data=df[df["method"] == m], x="epoch", y="weight", hue="group_name",
                     hue_order=names, palette=group_palette(names), errorbar="sd", marker="o",
                     ms=3, ax=ax, legend=(m == methods[ncols - 1]))
        ax.axhline(1.0, color="#888888", lw=0.8, ls=":")
        ax.set_title(_method_label(m), fontsize=10)
        ax.set_ylabel(f"mean {term.upper()} weight" if term else "mean instance weight")
    for ax in flat[len(methods):]:
        ax.set_visible(False)
    legend_ax = flat[ncols - 1]
    if legend_ax.get_legend():
        sns.move_legend(legend_ax, "upper left", bbox_to_anchor=(1.0, 1.0), title=None)
    fig.suptitle("Instance weights per group during distillation", fontweight="bold")
    fig.tight_layout()
    return fig


def wga_vs_avg(per_seed: pd.DataFrame, x: str = "avg_acc", y: str = "worst_group_acc"):
    """Worst-group vs average accuracy per method, mean +- std over seeds."""
    fig, ax = plt.subplots(figsize=(6.4, 5))
    agg = per_seed.groupby("method")[[x, y]].agg(["mean", "std"])
    for m in _present(METHOD_ORDER, agg.index):
        r = agg.loc[m]
        ax.errorbar(r[(x, "mean")], r[(y, "mean")], xerr=np.nan_to_num(r[(x, "std")]),
                    yerr=np.nan_to_num(r[(y, "std")]), fmt="s" if m in REFERENCES else "o",
                    ms=8, capsize=3, color=METHOD_COLORS.get(m), label=_method_label(m),
                    mfc="white" if m in REFERENCES else METHOD_COLORS.get(m))
        sub = per_seed[per_seed["method"] == m]
        ax.scatter(sub[x], sub[y], s=12, alpha=0.35, color=METHOD_COLORS.get(m))
    ax.set_xlabel("average accuracy (test)" if x == "avg_acc" else x)
    ax.set_ylabel("worst-group accuracy (test)")
    ax.set_title("Fairness vs accuracy (hollow squares use group labels)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9)
    return fig


def group_acc_heatmap(table: pd.DataFrame):
    """Mean test accuracy per method (rows) and group (columns)."""
    fig, ax = plt.subplots(figsize=(1.6 * table.shape[1] + 3, 0.55 * table.shape[0] + 1.8))
    sns.heatmap(table, annot=True, fmt=".2f", cmap="RdYlGn", vmin=0, vmax=1, cbar_kws={"label": "accuracy"},
                linewidths=0.5, ax=ax)
    ax.set_yticklabels([_method_label(t.get_text()) for t in ax.get_yticklabels()], rotation=0)
    ax.set_xlabel("")
    ax.set_ylabel("")
    ax.tick_params(axis="x", labelrotation=15)
    ax.set_title("Test accuracy by method and group (mean over seeds)")
    return fig


def weight_distributions(df: pd.DataFrame, methods=("dedier", "laplace_kd")):
    """Histograms of final instance weights on the training set by group, one panel per method."""
    methods = [m for m in methods if m in set(df["method"])]
    names = list(dict.fromkeys(df.sort_values("group")["group_name"]))
    fig, axes = plt.subplots(1, len(methods), figsize=(5.4 * len(methods), 4), sharey=True,
                             squeeze=False)
    for ax, m in zip(axes[0], methods):
        sns.histplot(data=df[df["method"] == m], x="weight", hue="group_name", hue_order=names,
                     palette=group_palette(names), stat="density", common_norm=False,
                     element="step", fill=False, bins=30, ax=ax, legend=(ax is axes[0][-1]))
        ax.set_title(_method_label(m))
        ax.set_xlabel("instance weight (before batch normalisation)")
    if axes[0][-1].get_legend():
        sns.move_legend(axes[0][-1], "upper left", bbox_to_anchor=(1.0, 1.0), title=None)
    fig.suptitle("Who gets upweighted? Training-set weights by group", fontweight="bold")
    fig.tight_layout()
    return fig


def paired_differences(diffs: pd.DataFrame, metric: str = "worst_group_acc"):
    """Per-seed paired differences with mean and 95 % interval, one panel per baseline.
    ``diffs``: baseline, method, seed, diff, lo, hi (``experiment.paired_differences``)."""
    baselines = list(dict.fromkeys(diffs["baseline"]))
    methods = _present(METHOD_ORDER, diffs["method"])
    fig, axes = plt.subplots(1, len(baselines), figsize=(6.2 * len(baselines), 0.62 * len(methods) + 1.8),
                             sharey=True, squeeze=False)
    for ax, baseline in zip(axes[0], baselines):
        for i, m in enumerate(methods):
            sub = diffs[(diffs["baseline"] == baseline) & (diffs["method"] == m)]
            if sub.empty:
                continue
            ax.scatter(sub["diff"], np.full(len(sub), i), color=METHOD_COLORS.get(m), alpha=0.5, s=22)
            mean = sub["diff"].mean()
            lo, hi = sub["lo"].iloc[0], sub["hi"].iloc[0]
            ax.errorbar(mean, i, xerr=[[mean - lo if np.isfinite(lo) else 0], [hi - mean if np.isfinite(hi) else 0]],
                        fmt="D", color="black", capsize=4, ms=6)
        ax.axvline(0, color="#c44e52", lw=1, ls="--")
        ax.set_yticks(range(len(methods)))
        ax.set_yticklabels([_method_label(m) for m in methods])
        ax.set_xlabel(f"{metric} − {baseline}'s (same seed)")
        ax.set_title(f"against {_method_label(baseline)}", fontsize=11)
    axes[0][0].invert_yaxis()
    fig.suptitle("Paired differences per seed; ◆ mean with 95 % interval", fontweight="bold")
    fig.tight_layout()
    return fig
