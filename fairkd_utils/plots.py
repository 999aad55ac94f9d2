"""Every figure of the study, drawn from tidy tables, with one palette per concept
and one set of names so that notebooks and slides agree (``palette``: the colours,
labels, orders and markers per concept, the style and the helpers every figure
shares; colours are looked up by key, never by display label).

``savefig(fig, figures_dir / "04_reliability")`` writes ``.png`` (for reading)
and ``.pdf`` (for slides), both byte-stable across reruns.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from . import records
from .palette import (_PREDICTIVE_MARKERS, FORM_COLORS, FORM_LABELS, FORM_LINESTYLES, METHOD_COLORS,
                      METHOD_MARKERS, METHOD_ORDER, PREDICTIVE_COLORS, PREDICTIVE_ORDER,
                      REGIME_RECIPES, REGIME_SCORE_COLORS, REGIME_SOURCES, SCORE_LABELS, SPLIT_LABELS,
                      SPLIT_ORDER, TARGET_COLORS, _form_key, _groups_of, _hue_color, _hue_label,
                      _hue_order, _legend_outside, _lines, _patches, _predictive_key,
                      _predictive_label, _present, _wrap, human_label)
from .profiles import METHOD_SPECS, REFERENCES


def savefig(fig, stem, close: bool = True) -> None:
    """Write ``stem.png`` and ``stem.pdf`` atomically; the PDF carries no
    creation date so reruns are byte-identical."""
    stem = Path(stem)
    for fmt, meta in (("png", {"Software": None}), ("pdf", {"CreationDate": None, "Producer": None})):
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, metadata=meta)
        records.write_bytes(stem.with_suffix(f".{fmt}"), buf.getvalue())
    if close:
        plt.close(fig)


#: Inches per category on a categorical x axis: a wrapped group name ("contradiction,
#: no negation") fits without touching its neighbours.
_SLOT_IN = 1.5


# --------------------------------------------------------------------- notebook 01
def group_counts(groups: pd.DataFrame):
    """Bar chart of samples per group and split (log scale: groups differ ~60x)."""
    names, pal = _groups_of(groups)
    splits = _present(SPLIT_ORDER, groups["split"])
    fig, ax = plt.subplots(figsize=(8.5, 4.2), layout="constrained")
    sns.barplot(data=groups, x="split", y="n", hue="group_name", order=splits, hue_order=names,
                palette=pal, saturation=1, ax=ax)
    for cont, name in zip(ax.containers, names):   # one container per group, in hue order
        cont.set_label(name)
        ax.bar_label(cont, fmt="%d", fontsize=8, padding=1)
    ax.set(yscale="log", ylabel="instances (log scale)", xlabel="", title="Instances per group and split")
    ax.set_xticks(range(len(splits)), [SPLIT_LABELS.get(s, s) for s in splits])
    _legend_outside(ax, *_patches(pal), title="group")
    return fig


def group_samples(images: dict, n_cols: int | None = None):
    """A row of example images per group; ``images`` maps group name -> list of HWC arrays."""
    n_cols = n_cols or max(len(v) for v in images.values())
    fig, axes = plt.subplots(len(images), n_cols, figsize=(1.25 * n_cols + 1.8, 1.3 * len(images) + 0.5),
                             squeeze=False, layout="constrained")
    for r, (name, imgs) in enumerate(images.items()):
        for c, ax in enumerate(axes[r]):
            ax.set(xticks=[], yticks=[])
            ax.spines[:].set_visible(False)
            if c < len(imgs):
                ax.imshow(np.clip(imgs[c], 0, 1), interpolation="nearest")
        axes[r, 0].set_ylabel(_wrap(name, 18), rotation=0, ha="right", va="center", fontsize=10)
    fig.suptitle("Examples per group (label on background)", fontweight="bold")
    return fig


# --------------------------------------------------------------------- notebooks 02-03
def _grouped_bars(ax, agg: pd.DataFrame, cats, levels, colors, labels, ticklabels, lw=None, elinewidth=None):
    """Grouped bars of ``agg`` (index (category, level); columns mean, std, n): per level
    a bar (``colors[level]``, labelled ``labels[level]``) at each category it has, with
    the sd as error bars where a bar has several values, on a categorical x axis
    (``ticklabels``) and a y axis ticked from 0 to 1. ``lw``, ``elinewidth``: the
    widths of the bars' edges and of the error bars (None: the style's). Returns
    ``(x, row of agg, sd, category, level)`` per bar, level by level."""
    step = 0.8 / len(levels)
    bars = []
    for j, level in enumerate(levels):
        here = [(i + (j - (len(levels) - 1) / 2) * step, agg.loc[(cat, level)], cat)
                for i, cat in enumerate(cats) if (cat, level) in agg.index]
        sds = [float(r["std"]) if r["n"] > 1 and np.isfinite(r["std"]) else 0.0 for _, r, _ in here]
        xs, means = [x for x, _, _ in here], [float(r["mean"]) for _, r, _ in here]
        ax.bar(xs, means, step * 0.92, color=colors[level], label=labels[level],
               edgecolor="white", linewidth=lw, zorder=2)
        if any(sd > 0 for sd in sds):
            ax.errorbar(xs, means, yerr=sds, fmt="none", ecolor="#333333", elinewidth=elinewidth,
                        capsize=3, zorder=3)
        bars += [(x, r, sd, cat, level) for (x, r, cat), sd in zip(here, sds)]
    ax.set_xticks(range(len(cats)), ticklabels)
    ax.set(xlim=(-0.6, len(cats) - 0.4), yticks=np.linspace(0, 1, 6), xlabel="")
    ax.grid(axis="x", visible=False)
    return bars


def group_accuracy_bars(df: pd.DataFrame, hue: str = "model", title: str = "", palette=None):
    """Per-group accuracy bars (``df``: group_name, acc, and the ``hue`` column),
    error bars (sd) over seeds where there are several; each value is written
    above its error bar. Colours by key of the ``hue`` concept (model, method,
    split), or ``palette`` (hue value -> colour) where given."""
    names = _groups_of(df[df["group_name"] != "all"])[0]
    names += ["all"] if (df["group_name"] == "all").any() else []
    levels = _hue_order(hue, df[hue])
    fallback = iter(sns.color_palette("colorblind", len(levels)))   # for values of no known concept
    colors = {h: (palette or {}).get(h) or _hue_color(hue, h) or next(fallback) for h in levels}
    agg = df.groupby(["group_name", hue])["acc"].agg(["mean", "std", "count"]).rename(
        columns={"count": "n"})
    fig, ax = plt.subplots(figsize=(max(8.5, _SLOT_IN * len(names) + 3.0), 4.2), layout="constrained")
    bars = _grouped_bars(ax, agg, names, levels, colors, {h: _hue_label(hue, h) for h in levels},
                         [_wrap("all groups" if n == "all" else n) for n in names], lw=0.6, elinewidth=1.1)
    many = len(levels) > 3                           # narrow bars: smaller, vertical labels
    for x, r, sd, _, _ in bars:                      # each value above its error bar
        ax.text(x, float(r["mean"]) + sd + 0.015, f"{r['mean']:.2f}", ha="center", va="bottom",
                fontsize=7 if many else 8, rotation=90 if many else 0, zorder=4)
    label_h = 0.11 if many else 0.06                 # a value label's height in data units (about)
    top = max([1.14] + [t.get_position()[1] + label_h for t in ax.texts])
    ax.set(ylim=(0, top), ylabel="accuracy", title=title)
    _legend_outside(ax, title=None)
    return fig


def confidence_by_group(df: pd.DataFrame, value: str = "prob", hue: str = "correct",
                        col: str | None = None, title: str = "", ylabel: str | None = None):
    """Distribution of a confidence score per group, right vs wrong predictions apart.
    ``df``: group_name, ``value``, ``hue`` (and optionally ``col`` for facets).
    A ``predictive`` hue is coloured by its key (``map``, ``probit``, ``mc``, or a
    label naming one such as ``"Laplace exact (probit)"``)."""
    df = df.copy()
    if hue == "correct":
        df["prediction"] = np.where(df["correct"].astype(bool), "right", "wrong")
        hue = "prediction"
    levels = _hue_order(hue, df[hue])
    shown_as = {h: _hue_label(hue, h) for h in levels}
    df["_hue"] = df[hue].map(shown_as)
    hue_order = [shown_as[h] for h in levels]
    pal = {shown_as[h]: _hue_color(hue, h) for h in levels}
    if any(c is None for c in pal.values()):   # a hue of no known concept
        pal = dict(zip(hue_order, sns.color_palette("colorblind", len(hue_order)).as_hex()))
    order = _groups_of(df)[0]
    cols = list(dict.fromkeys(df[col])) if col else [None]
    panel_w = max(5.2, _SLOT_IN * len(order))
    fig, axes = plt.subplots(1, len(cols), figsize=(panel_w * len(cols) + 1.6, 4.4), squeeze=False,
                             sharey=True, layout="constrained")
    for ax, c in zip(axes[0], cols):
        sub = df if c is None else df[df[col] == c]
        with warnings.catch_warnings():  # seaborn 0.13 still passes matplotlib 3.11's deprecated `vert`
            warnings.filterwarnings("ignore", message="vert: bool was deprecated")
            sns.boxplot(data=sub, x="group_name", y=value, hue="_hue", order=order, hue_order=hue_order,
                        palette=pal, saturation=1, showfliers=False, width=0.7, legend=False, ax=ax)
        shown = sub.sample(frac=1.0, random_state=0).groupby(["_hue", "group_name"]).head(60)
        state = np.random.get_state()  # seaborn jitters with numpy's global generator:
        np.random.seed(0)              # seed it here so reruns draw byte-identical figures
        try:
            sns.stripplot(data=shown, x="group_name", y=value, hue="_hue", order=order, hue_order=hue_order,
                          dodge=True, palette=pal, size=2, alpha=0.45, legend=False, ax=ax)
        finally:
            np.random.set_state(state)
        ax.set_xticks(range(len(order)), [_wrap(n) for n in order])
        panel = "" if c is None else f"{c} predictions" if col == "prediction" else human_label(c)
        ax.set(xlabel="", title=panel)
    axes[0][0].set_ylabel(ylabel or (human_label(col) if value == "value" and col else human_label(value)))
    _legend_outside(axes[0][-1], *_patches(pal), title="prediction" if hue == "prediction" else None)
    if title:
        fig.suptitle(title, fontweight="bold")
    return fig


# --------------------------------------------------------------------- notebook 04
def laplace_samples(samples: list[dict], title: str = "Samples of the exit's predictive"):
    """Clouds of sampled exit logits for example instances (two classes).

    ``samples``: dicts with keys group_name, form ('exact'|'kron'), z (S, 2) array,
    mean (2,), y. Each panel shows the MAP logit, the sample cloud of both
    forms and the decision line z0 = z1."""
    groups = list(dict.fromkeys(s["group_name"] for s in samples))
    fig, axes = plt.subplots(1, len(groups), figsize=(3.6 * len(groups), 4.6), squeeze=False)
    for ax, gname in zip(axes[0], groups):
        cur = [s for s in samples if s["group_name"] == gname]
        lo, hi = np.percentile(np.concatenate([np.asarray(s["z"]) for s in cur]), [1, 99])
        pad = 0.15 * (hi - lo + 1e-6)
        for s in cur:
            z = np.asarray(s["z"])
            ax.scatter(z[:, 0], z[:, 1], s=5, alpha=0.3, color=FORM_COLORS.get(s["form"], "#777777"),
                       label=FORM_LABELS.get(s["form"], f"{s['form']} prior"), rasterized=True)
        m = np.asarray(cur[0]["mean"])
        ax.scatter([m[0]], [m[1]], marker="*", s=160, color="black", zorder=5, label="MAP logits")
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="#444444", lw=1.2, ls="--",
                label="decision line $z_0 = z_1$")
        ax.set(xlim=(lo - pad, hi + pad), ylim=(lo - pad, hi + pad), aspect="equal", xlabel="logit $z_0$")
        ax.set_title(f"{gname}\n(true y = {cur[0]['y']})", fontsize=10)
    axes[0][0].set_ylabel("logit $z_1$")
    handles, labels = axes[0][0].get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    fig.suptitle(title, fontweight="bold")
    fig.legend(uniq.values(), uniq.keys(), loc="lower center", bbox_to_anchor=(0.5, 0.0),
               ncol=len(uniq), markerscale=1.5)
    fig.tight_layout(rect=(0, 0.09, 1, 1))   # fixed-aspect panels: tight, not constrained
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
    """Reliability diagram: ``df`` has prob (top-label confidence), correct and ``hue``.
    Colour by the predictive each hue value names (``map``/``MAP``, ``... (probit)``,
    ``... (mc)``), line style by the prior form it names (exact solid, kron dashed)."""
    fig, ax = plt.subplots(figsize=(5.6, 6.2), layout="constrained")
    ax.plot([0, 1], [0, 1], color="#888888", ls=":", lw=1.2, label="perfect calibration")
    keyed = {h: _predictive_key(h) for h in dict.fromkeys(df[hue])}
    rank = {k: i for i, k in enumerate(PREDICTIVE_ORDER)}
    for h in sorted(keyed, key=lambda h: (rank.get(keyed[h], len(rank)), _form_key(h) == "kron")):
        sub = df[df[hue] == h]
        curve = reliability_curve(sub["prob"].to_numpy(), sub["correct"].to_numpy().astype(float))
        key = keyed[h]
        label = _predictive_label(h) + (f" (ECE {ece[h]:.3f})" if ece and h in ece else "")
        color = PREDICTIVE_COLORS[key or h]
        filled = key in (None, "map")
        ax.plot(curve["confidence"], curve["accuracy"], marker=_PREDICTIVE_MARKERS.get(key, "D"),
                ms=6 if filled else 7, color=color, mfc=color if filled else "white", mew=1.4,
                ls=FORM_LINESTYLES.get(_form_key(h), "-"), lw=1.6, label=label, zorder=3 if filled else 2)
    ax.set(xlim=(0.45 if df["prob"].min() >= 0.45 else 0, 1.0), ylim=(0, 1.02),
           xlabel="confidence (top label)", ylabel="accuracy", title=title)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize=9, ncol=1)
    return fig


def score_auroc(df: pd.DataFrame, title: str = "Which score singles out hard instances?",
                labels: dict | None = None):
    """AUROC per score and target (``df``: score, target, auroc[, seed]): mean over
    seeds with sd error bars and one dot per seed; values written above each bar,
    clear of the 0.5 chance line. Tick labels from ``labels`` or :data:`SCORE_LABELS`
    (else :func:`human_label` of the key)."""
    scores = list(dict.fromkeys(df["score"]))
    targets = _present(list(TARGET_COLORS), df["target"])
    agg = df.groupby(["score", "target"])["auroc"].agg(["mean", "std", "count", "max"]).rename(
        columns={"count": "n"})
    names = {**SCORE_LABELS, **(labels or {})}
    fig, ax = plt.subplots(figsize=(9, 4.6), layout="constrained")
    width = 0.8 / len(targets)                   # of a bar's slot, as _grouped_bars draws it
    text_h = 0.055                               # a label's height in data units (about)
    top = 1.0
    ticks = [_wrap(names.get(s) or human_label(s), 16) for s in scores]
    bars = _grouped_bars(ax, agg, scores, targets, TARGET_COLORS, {t: t for t in targets}, ticks)
    for x, r, sd, s, t in bars:
        if "seed" in df and r["n"] > 1:
            vals = df[(df["score"] == s) & (df["target"] == t)].sort_values("seed")["auroc"]
            ax.scatter(x + np.linspace(-0.22, 0.22, len(vals)) * width, vals, s=10,
                       color="white", edgecolor="#222222", linewidth=0.7, zorder=4)
        y = max(float(r["mean"]) + sd, float(r["max"])) + 0.02
        if y < 0.5 + 0.02 and y + text_h > 0.5 - 0.02:   # would sit on the chance line
            y = 0.5 + 0.02
        ax.text(x, y, f"{r['mean']:.2f}", ha="center", va="bottom", fontsize=9, zorder=5)
        top = max(top, y + text_h + 0.02)
    ax.axhline(0.5, color="#222222", ls="--", lw=1.1, label="chance (0.5)", zorder=3.5)
    ax.set(ylim=(0, top), ylabel="AUROC (expected direction)", title=title)
    handles, names = _patches({t: TARGET_COLORS[t] for t in targets})
    handles.append(Line2D([], [], color="#222222", ls="--", lw=1.1))
    _legend_outside(ax, handles, names + ["chance (0.5)"], title="target")
    return fig


# --------------------------------------------------------------------- notebooks 05-06
def weights_by_group(weights: pd.DataFrame, term: str | None = None):
    """Mean instance weight per group over epochs, one panel per method: of ``term``, or
    (None) of the term each method weights (KD where it weights both)."""
    df = weights
    if "term" in df:
        own = df["method"].map(lambda m: METHOD_SPECS[m].terms[-1] if METHOD_SPECS[m].terms else "kd")
        df = df[df["term"] == (term or own)]
    methods = _present(METHOD_ORDER, df["method"])
    names, pal = _groups_of(df)
    ncols = min(3, len(methods))
    nrows = -(-len(methods) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols + 2.2, 3.2 * nrows + 0.4),
                             sharey=True, sharex=True, squeeze=False, layout="constrained")
    flat = axes.ravel()
    for ax, m in zip(flat, methods):
        sns.lineplot(data=df[df["method"] == m], x="epoch", y="weight", hue="group_name",
                     hue_order=names, palette=pal, errorbar="sd", marker="o",
                     ms=3, lw=1.8, ax=ax, legend=False)
        ax.axhline(1.0, color="#888888", lw=0.8, ls=":")
        ax.set_title(human_label(m), fontsize=10)
        ax.set_ylabel(f"mean {term.upper()} weight" if term else "mean instance weight")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in flat[len(methods):]:
        ax.set_visible(False)
    _legend_outside(flat[ncols - 1], *_lines(pal), title="group")
    fig.suptitle("Instance weights per group during distillation", fontweight="bold")
    return fig


def wga_vs_avg(per_seed: pd.DataFrame, x: str = "avg_acc", y: str = "worst_group_acc"):
    """Worst-group vs average accuracy per method, mean +- std over seeds; small dots
    are single seeds, references (group labels in training) hollow squares."""
    fig, ax = plt.subplots(figsize=(8.4, 5.2), layout="constrained")
    agg = per_seed.groupby("method")[[x, y]].agg(["mean", "std"])
    for m in _present(METHOD_ORDER, agg.index):
        r = agg.loc[m]
        color, ref = METHOD_COLORS[m], m in REFERENCES
        marker = "s" if ref else METHOD_MARKERS.get(m, "o")
        ax.errorbar(r[(x, "mean")], r[(y, "mean")], xerr=np.nan_to_num(r[(x, "std")]),
                    yerr=np.nan_to_num(r[(y, "std")]), fmt=marker,
                    ms=12 if marker == "*" else 8, capsize=3, color=color, label=human_label(m),
                    mfc="white" if ref else color, mec=color, mew=1.6, zorder=3)
        sub = per_seed[per_seed["method"] == m]
        ax.scatter(sub[x], sub[y], s=14, alpha=0.45, color=color, linewidths=0, zorder=2)
    ax.set(xlabel=f"{human_label(x)} (test)", ylabel=f"{human_label(y)} (test)",
           title="Fairness vs accuracy (hollow squares use group labels)")
    _legend_outside(ax, fontsize=9)
    return fig


#: Colour-blind-safe sequential map for accuracies (dark = 0, light = 1).
HEATMAP_CMAP = "cividis"


def _luminance(rgba) -> float:
    """WCAG relative luminance of an RGB(A) colour."""
    c = np.asarray(rgba[:3], dtype=float)
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return float(c @ [0.2126, 0.7152, 0.0722])


def group_acc_heatmap(table: pd.DataFrame):
    """Mean test accuracy per method (rows) and group (columns); cividis (colour-blind
    safe, light = accurate), references below a white rule."""
    fig, ax = plt.subplots(figsize=(1.7 * table.shape[1] + 4.2, 0.55 * table.shape[0] + 2.0),
                           layout="constrained")
    cmap = plt.get_cmap(HEATMAP_CMAP)
    sns.heatmap(table, annot=False, cmap=cmap, vmin=0, vmax=1, cbar_kws={"label": "accuracy"},
                linewidths=0.5, ax=ax)
    for (i, j), v in np.ndenumerate(table.to_numpy(dtype=float)):
        if np.isfinite(v):   # black or white, whichever contrasts more with the cell
            ax.text(j + 0.5, i + 0.5, f"{v:.2f}", ha="center", va="center", fontsize=11,
                    color="black" if _luminance(cmap(v)) > 0.179 else "white")
    rows = [str(r) for r in table.index]
    ax.set_yticks(np.arange(len(rows)) + 0.5, [human_label(r) for r in rows], rotation=0)
    ax.set_xticks(np.arange(table.shape[1]) + 0.5, [_wrap(c) for c in table.columns], rotation=0)
    refs = [i for i, r in enumerate(rows) if r in REFERENCES]
    if refs and refs == list(range(refs[0], len(rows))) and refs[0] > 0:
        ax.axhline(refs[0], color="white", lw=4)
    ax.set(xlabel="", ylabel="", title="Test accuracy by method and group (mean over seeds)")
    ax.tick_params(axis="both", length=0)
    return fig


def weight_distributions(df: pd.DataFrame, methods=("dedier", "laplace_kd")):
    """Histograms of final instance weights on the training set by group, one panel per method."""
    methods = [m for m in methods if m in set(df["method"])]
    names, pal = _groups_of(df)
    fig, axes = plt.subplots(1, len(methods), figsize=(5.0 * len(methods) + 2.0, 4.2), sharey=True,
                             squeeze=False, layout="constrained")
    for ax, m in zip(axes[0], methods):
        sns.histplot(data=df[df["method"] == m], x="weight", hue="group_name", hue_order=names,
                     palette=pal, stat="density", common_norm=False,
                     element="step", fill=False, bins=30, lw=1.8, ax=ax, legend=False)
        ax.set(title=human_label(m), xlabel="instance weight\n(before batch normalisation)")
    axes[0][0].set_ylabel("density (within each group)")
    _legend_outside(axes[0][-1], *_lines(pal), title="group")
    fig.suptitle("Who gets upweighted? Training-set weights by group", fontweight="bold")
    return fig


def paired_difference_intervals(diffs: pd.DataFrame, metric: str = "worst_group_acc"):
    """Per-seed paired differences with mean and 95 % interval, one panel per baseline.
    ``diffs``: baseline, method, seed, diff, lo, hi (``paired_differences`` of the metrics)."""
    baselines = list(dict.fromkeys(diffs["baseline"]))
    methods = _present(METHOD_ORDER, list(diffs["method"]) + baselines)
    fig, axes = plt.subplots(1, len(baselines), sharey=True, squeeze=False, layout="constrained",
                             figsize=(5.4 * len(baselines) + 2.6, 0.55 * len(methods) + 2.2))
    for ax, baseline in zip(axes[0], baselines):
        for i, m in enumerate(methods):
            if m == baseline:
                ax.text(0, i, "baseline  ", fontsize=9, fontstyle="italic", color="#666666",
                        ha="right", va="center")
                continue
            sub = diffs[(diffs["baseline"] == baseline) & (diffs["method"] == m)]
            if sub.empty:
                continue
            color, ref = METHOD_COLORS[m], m in REFERENCES
            ax.scatter(sub["diff"], np.full(len(sub), i), s=26, zorder=2,
                       facecolors="white" if ref else color, edgecolors=color, linewidths=1.2,
                       alpha=0.9 if ref else 0.6)
            mean = sub["diff"].mean()
            lo, hi = sub["lo"].iloc[0], sub["hi"].iloc[0]
            err = [[mean - lo if np.isfinite(lo) else 0], [hi - mean if np.isfinite(hi) else 0]]
            ax.errorbar(mean, i, xerr=err, fmt="D", color="black", capsize=4, ms=6, zorder=3)
        ax.axvline(0, color="#444444", lw=1, ls="--", zorder=1)
        ax.set_yticks(range(len(methods)), [human_label(m) for m in methods])
        ax.set(ylim=(len(methods) - 0.5, -0.5),
               xlabel=f"Δ {human_label(metric)}\n(method − baseline, same seed)")
        ax.set_title(f"against {human_label(baseline)}", fontsize=11)
    fig.suptitle(f"Paired differences in {human_label(metric)} per seed "
                 "(◆ mean with 95 % interval)", fontweight="bold")
    return fig


# --------------------------------------------------------------------- notebook 04: the regime map
def _recipe(recipe):
    """(marker, line style, label) of a prior recipe; one the map does not know: diamonds, dotted."""
    return REGIME_RECIPES.get(recipe, ("D", ":", recipe))


def laplace_regime(df: pd.DataFrame, title: str = "When does the exit's Laplace change DeDiER's weights?"):
    """The regime map (``laplace_regime.regime_map`` rows; columns source, recipe, score,
    n_fit, params_per_instance, median_logit_var, spearman_wrong, noise_floor_spearman):
    one panel per source, x the posterior's median logit variance (log scale), y the
    within-wrong Spearman correlation of the Laplace-KD weights with DeDiER's, means
    over seeds. One line per (recipe, score) through the subset sizes, each point
    labelled with its parameters per fitted instance; the band from each series' MC
    noise floor (two independent draws of the same fit) up to 1 is where agreement
    cannot be told from Monte-Carlo noise."""
    sources = _present(REGIME_SOURCES, df["source"])
    means = ["params_per_instance", "median_logit_var", "spearman_wrong", "noise_floor_spearman"]
    agg = df.groupby(["source", "recipe", "score", "n_fit"], sort=False)[means].mean().reset_index()
    fig, axes = plt.subplots(1, len(sources), figsize=(4.6 * len(sources) + 2.4, 4.6), sharey=True,
                             layout="constrained", squeeze=False)
    for ax, source in zip(axes[0], sources):
        for (recipe, score), s in agg[agg["source"] == source].groupby(["recipe", "score"], sort=False):
            s = s.sort_values("median_logit_var")
            marker, ls, _ = _recipe(recipe)
            color = REGIME_SCORE_COLORS[score]
            floor = s["noise_floor_spearman"].to_numpy(float)
            ok = np.isfinite(floor)
            if ok.any():
                ax.fill_between(s["median_logit_var"][ok], floor[ok], 1.0, color=color, alpha=0.13,
                                linewidth=0, zorder=1)
            ax.plot(s["median_logit_var"], s["spearman_wrong"], marker=marker, ls=ls, color=color,
                    markersize=6, lw=1.5, zorder=3)
            up = recipe == next(iter(REGIME_RECIPES))     # the recipes' labels above / below
            for x, y, p in zip(s["median_logit_var"], s["spearman_wrong"], s["params_per_instance"]):
                ax.annotate(f"{p:.2g}", (x, y), xytext=(-3, 5) if up else (3, -6),
                            textcoords="offset points", ha="right" if up else "left",
                            va="bottom" if up else "top", fontsize=6.5, color="#333333", zorder=4)
        ax.axhline(0, color="#888888", lw=0.8, zorder=0)
        ax.set(xscale="log", title=source, xlabel="median posterior logit variance")
    axes[0][0].set(ylabel="within-wrong Spearman with DeDiER's weights", ylim=(-1.05, 1.08))
    scores = list(dict.fromkeys(df["score"]))
    recipes = list(dict.fromkeys(df["recipe"]))
    handles = [Line2D([], [], color=REGIME_SCORE_COLORS[s], lw=2) for s in scores]
    labels = [SCORE_LABELS.get(f"laplace_{s}", human_label(s)) for s in scores]
    handles += [Line2D([], [], color="#444444", marker=_recipe(r)[0], ls=_recipe(r)[1]) for r in recipes]
    labels += [_recipe(r)[2] for r in recipes]
    handles.append(Patch(color="#888888", alpha=0.3))
    labels.append("MC noise floor to 1")
    _legend_outside(axes[0][-1], handles, labels, title="numbers: parameters\nper fitted instance")
    fig.suptitle(title, fontweight="bold")
    return fig
