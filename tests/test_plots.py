"""The figures' colours, labels and layout, checked on the artists of figures drawn
from small hand-made tables: one colour per key in every figure, group colours
apart from method colours, colour-blind-safe palettes, human labels, value labels
clear of error bars and of the chance line, nothing outside the figure."""

import itertools
import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_hex, to_rgb, to_rgba  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from fairkd_utils import palette, plots, profiles  # noqa: E402

GROUPS4 = ["landbird on land", "landbird on water", "waterbird on land", "waterbird on water"]
GROUPS6 = [f"{y}, {a}" for y in ("contradiction", "entailment", "neutral")
           for a in ("no negation", "negation")]
STUDY_METHODS = ["erm", "kd", "dedier", "dedier_both", "laplace_kd", "shuffled",
                 "group_balanced", "group_balanced_erm"]
COMING_METHODS = ["jtt", "dfr", "dedier_final"]
SEEDS = [0, 1, 2]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def hexes(colors):
    return {to_hex(c) for c in colors}


def same(a, b):
    return to_hex(a, keep_alpha=False) == to_hex(b, keep_alpha=False)


# ------------------------------------------------------------------ colour science
_CVD = {  # Machado, Oliveira & Fernandes (2009), severity 1, on linear RGB
    None: np.eye(3),
    "deuteranopia": np.array([[0.367322, 0.860646, -0.227968], [0.280085, 0.672501, 0.047413],
                              [-0.011820, 0.042940, 0.968881]]),
    "protanopia": np.array([[0.152286, 1.052583, -0.204868], [0.114503, 0.786281, 0.099216],
                            [-0.003882, -0.048116, 1.051998]]),
}


def _lab(color, cvd=None):
    rgb = np.array(to_rgb(color))
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    lin = np.clip(_CVD[cvd] @ lin, 0, 1)
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722],
                    [0.0193, 0.1192, 0.9505]]) @ lin / [0.95047, 1.0, 1.08883]
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def delta_e(a, b, vision=(None, "deuteranopia", "protanopia")):
    """CIE76 colour difference, the smallest over normal and simulated vision."""
    return min(float(np.linalg.norm(_lab(a, v) - _lab(b, v))) for v in vision)


def _contrast(c1, c2):
    lum = sorted([plots._luminance(to_rgba(c1)), plots._luminance(to_rgba(c2))])
    return (lum[1] + 0.05) / (lum[0] + 0.05)


# ------------------------------------------------------------------ hand-made tables
def group_table(names=GROUPS4):
    rows = [{"split": s, "group": g, "group_name": n, "y": g // 2, "a": g % 2, "n": int(n_)}
            for s, scale in (("train", 30), ("val", 5), ("test", 10))
            for g, (n, n_) in enumerate(zip(names, np.linspace(1, 9, len(names)) * scale))]
    return pd.DataFrame(rows)


def accuracy_table(hue, levels, names=GROUPS4):
    rng = np.random.default_rng(0)
    rows = [{"seed": s, hue: h, "group": g, "group_name": n, "acc": float(rng.uniform(0.2, 0.95))}
            for s in SEEDS for h in levels for g, n in enumerate(names)]
    rows += [{"seed": s, hue: h, "group": "all", "group_name": "all", "acc": 0.7}
             for s in SEEDS for h in levels]
    return pd.DataFrame(rows)


def confidence_table(hue="predictive", levels=("map", "probit"), names=GROUPS4):
    rng = np.random.default_rng(1)
    n = 40
    rows = []
    for h in levels:
        for g, name in enumerate(names):
            rows.append(pd.DataFrame({
                "seed": 0, "group": g, "group_name": name, hue: h,
                "confidence": rng.uniform(0.5, 1, n), "prob": rng.uniform(0.5, 1, n),
                "correct": rng.random(n) > 0.4,
                "prediction": np.where(rng.random(n) > 0.4, "right", "wrong")}))
    return pd.concat(rows, ignore_index=True)


def reliability_table():
    rng = np.random.default_rng(2)
    labels = ["MAP", "Laplace exact (probit)", "Laplace exact (mc)", "Laplace kron (probit)"]
    return pd.concat([pd.DataFrame({"predictive": lab, "prob": rng.uniform(0.5, 1, 300),
                                    "correct": rng.random(300) > 0.3}) for lab in labels])


def auroc_table():
    means = {"dedier_map_margin": 0.97, "laplace_margin": 0.49, "laplace_entropy": 0.51,
             "laplace_variance": 0.30}
    rows = [{"seed": s, "score": score, "target": t, "auroc": m + 0.004 * (s - 1) + (0.002 if k else 0)}
            for score, m in means.items() for k, t in enumerate(["minority group", "ERM student wrong"])
            for s in SEEDS]
    return pd.DataFrame(rows)


def weights_table(methods=("dedier", "dedier_both", "laplace_kd", "shuffled"), names=GROUPS4):
    rows = []
    for m in methods:
        terms = plots.METHOD_SPECS[m].terms or ("kd",)
        for s in SEEDS:
            for epoch in range(1, 5):
                for g, n in enumerate(names):
                    for term in terms:
                        rows.append({"seed": s, "method": m, "config_id": "c", "epoch": epoch, "group": g,
                                     "n": 10, "term": term, "weight": 1.0 + (g % 2) * epoch * 0.3,
                                     "group_name": n})
    return pd.DataFrame(rows)


def weight_distribution_table(names=GROUPS4):
    rng = np.random.default_rng(3)
    return pd.DataFrame([{"method": m, "group": g, "group_name": n, "weight": float(w)}
                         for m in ("dedier_both", "laplace_kd", "shuffled")
                         for g, n in enumerate(names) for w in rng.uniform(1, 1 + 2 * g, 60)])


def per_seed_table(methods=STUDY_METHODS):
    rng = np.random.default_rng(4)
    return pd.DataFrame([{"method": m, "seed": s, "worst_group_acc": float(rng.uniform(0, 0.8)),
                          "avg_acc": float(rng.uniform(0.5, 0.95))} for m in methods for s in SEEDS])


def diffs_table(methods=STUDY_METHODS):
    rng = np.random.default_rng(5)
    rows = []
    for b in ("kd", "dedier_both"):
        for m in methods:
            if m == b:
                continue
            d = rng.normal(0, 0.05, len(SEEDS))
            rows += [{"baseline": b, "method": m, "seed": s, "diff": float(v),
                      "lo": float(d.mean() - 0.05), "hi": float(d.mean() + 0.05)} for s, v in zip(SEEDS, d)]
    return pd.DataFrame(rows)


def heat_table(methods=STUDY_METHODS, names=GROUPS4):
    values = np.linspace(0, 1, len(methods) * len(names)).reshape(len(methods), len(names))
    return pd.DataFrame(values, index=methods, columns=names)


def laplace_sample_list(names=GROUPS4):
    rng = np.random.default_rng(6)
    return [{"group_name": n, "form": form, "z": rng.normal(size=(50, 2)) + [g, -g],
             "mean": np.array([g, -g], float), "y": g // 2}
            for g, n in enumerate(names) for form in ("exact", "kron")]


def every_figure():
    """(name, figure) for every figure function, on the tables above."""
    yield "group_counts", plots.group_counts(group_table())
    yield "group_samples", plots.group_samples({n: [np.full((8, 8, 3), 0.1 * g)] * 3
                                                for g, n in enumerate(GROUPS4)})
    yield "group_accuracy_bars", plots.group_accuracy_bars(accuracy_table("model", ["student", "exit"]),
                                                           hue="model", title="exit vs final")
    yield "confidence_by_group", plots.confidence_by_group(confidence_table(), value="confidence",
                                                           hue="predictive", col="prediction", title="t")
    yield "confidence_by_group (6 groups)", plots.confidence_by_group(
        confidence_table(names=GROUPS6), value="confidence", hue="predictive", col="prediction")
    yield "group_accuracy_bars (6 groups, 4 methods)", plots.group_accuracy_bars(
        accuracy_table("method", ["kd", "dedier_both", "laplace_kd", "group_balanced"], GROUPS6), hue="method")
    yield "group_counts (6 groups)", plots.group_counts(group_table(GROUPS6))
    yield "laplace_samples", plots.laplace_samples(laplace_sample_list())
    yield "reliability", plots.reliability(reliability_table(), ece={"MAP": 0.1})
    yield "score_auroc", plots.score_auroc(auroc_table())
    yield "weights_by_group", plots.weights_by_group(weights_table())
    yield "wga_vs_avg", plots.wga_vs_avg(per_seed_table())
    yield "group_acc_heatmap", plots.group_acc_heatmap(heat_table())
    yield "weight_distributions", plots.weight_distributions(weight_distribution_table(),
                                                             methods=("dedier_both", "laplace_kd", "shuffled"))
    yield "paired_differences", plots.paired_difference_intervals(diffs_table())


# ------------------------------------------------------------------ artist readers
def legend_colors(fig):
    """label -> colour of every legend entry in ``fig`` (axes and figure legends)."""
    out = {}
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend()] + list(fig.legends)
    for leg in legends:
        for handle, text in zip(leg.legend_handles, leg.get_texts()):
            if hasattr(handle, "get_markerfacecolor") and handle.get_marker() not in (None, "None", ""):
                color = handle.get_markeredgecolor()
            elif hasattr(handle, "get_color") and not hasattr(handle, "get_facecolor"):
                color = handle.get_color()
            elif hasattr(handle, "get_facecolor"):
                fc = np.atleast_2d(handle.get_facecolor())[0]
                color = fc if fc[3] > 0 else np.atleast_2d(handle.get_edgecolor())[0]
            else:
                color = handle.get_color()
            out[text.get_text()] = to_hex(color, keep_alpha=False)
    return out


def bar_colors(ax):
    """label -> facecolour of every labelled bar container."""
    return {c.get_label(): to_hex(c.patches[0].get_facecolor(), keep_alpha=False)
            for c in ax.containers if hasattr(c, "patches") and c.patches}


def all_texts(fig):
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def rendered(fig):
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def overlap(a, b, tol=1.0):
    return (a.x0 < b.x1 - tol and b.x0 < a.x1 - tol and a.y0 < b.y1 - tol and b.y0 < a.y1 - tol)


# ------------------------------------------------------------------ palettes
def test_group_palette_is_its_own_for_four_and_six_groups():
    methods = STUDY_METHODS + COMING_METHODS
    method_colors = hexes(palette.METHOD_COLORS[m] for m in methods) | hexes(palette.METHOD_COLORS.reserve)
    for names in (GROUPS4, GROUPS6):
        pal = palette.group_palette(names)
        assert len(hexes(pal.values())) == len(names)              # a colour per group
        assert not hexes(pal.values()) & method_colors             # none of them a method's
        for g, m in itertools.product(pal.values(), method_colors):
            assert delta_e(g, m, vision=(None,)) >= 20, (g, m)     # nor one that looks like it
        for a, b in itertools.combinations(pal.values(), 2):
            assert delta_e(a, b) >= 20, (a, b)                     # apart for colour-blind readers too
    # the bird data's second group is no longer Laplace-KD's green (nor any green)
    assert delta_e(palette.group_palette(GROUPS4)[GROUPS4[1]], palette.METHOD_COLORS["laplace_kd"],
                   vision=(None,)) >= 20


def test_method_colors_are_colour_blind_safe_with_room_for_three_more():
    methods = STUDY_METHODS + COMING_METHODS
    assert set(palette.METHOD_ORDER) <= set(methods) | set(palette.METHOD_COLORS)
    colors = [palette.METHOD_COLORS[m] for m in methods]
    assert len(hexes(colors)) == len(methods)
    for (ma, a), (mb, b) in itertools.combinations(zip(methods, colors), 2):
        assert delta_e(a, b) >= 12, (ma, mb)
    # the old palette failed exactly here: DeDiER's orange and Laplace-KD's green
    assert delta_e("#ff7f0e", "#2ca02c") < 12


def test_unknown_method_gets_a_stable_colour_of_its_own():
    known = hexes(palette.METHOD_COLORS.values())
    a = palette.METHOD_COLORS.get("some_new_method")
    assert a is not None and to_hex(a) not in known
    assert a == palette.METHOD_COLORS["some_new_method"] == palette.KeyedPalette({}, palette.METHOD_COLORS.reserve)[
        "some_new_method"]
    assert "some_new_method" not in palette.METHOD_COLORS      # a lookup does not add it
    assert palette.METHOD_COLORS.get("some_new_method", "red") == "red"
    assert palette.human_label("some_new_method") == "some new method"
    assert palette.human_label("dedier_final") == profiles.METHOD_SPECS["dedier_final"].label


def test_predictive_colour_by_key_in_every_figure_that_draws_it():
    rel = plots.reliability(reliability_table(), ece={"MAP": 0.1})
    lines = {ln.get_label(): ln for ln in rel.axes[0].get_lines()}
    key_of = {"MAP (ECE 0.100)": "map", "Laplace exact (probit)": "probit",
              "Laplace Kronecker (probit)": "probit", "Laplace exact (MC)": "mc"}
    for label, key in key_of.items():
        assert same(lines[label].get_color(), palette.PREDICTIVE_COLORS[key]), label
    kron, exact = lines["Laplace Kronecker (probit)"], lines["Laplace exact (probit)"]
    assert kron.get_linestyle() != exact.get_linestyle()        # the prior form by line style

    for values in (("map", "probit"), ("MAP", "Laplace exact (probit)")):
        fig = plots.confidence_by_group(confidence_table(levels=values), value="confidence", hue="predictive",
                                        col="prediction")
        boxes = hexes(p.get_facecolor() for ax in fig.axes for p in ax.patches)
        assert boxes == hexes([palette.PREDICTIVE_COLORS["map"], palette.PREDICTIVE_COLORS["probit"]])
        legend = legend_colors(fig)
        assert same(legend["MAP"], palette.PREDICTIVE_COLORS["map"])
    # the MAP exit is the same concept as the MAP predictive
    bars = plots.group_accuracy_bars(accuracy_table("model", ["student", "exit"]), hue="model")
    assert same(bar_colors(bars.axes[0])["early exit"], palette.PREDICTIVE_COLORS["map"])


def test_method_colour_by_key_in_every_figure_that_draws_it():
    methods = STUDY_METHODS + ["jtt", "some_new_method"]
    expected = {palette.human_label(m): to_hex(palette.METHOD_COLORS[m]) for m in methods}
    by_label = {palette.human_label(m): m for m in methods}

    wga = plots.wga_vs_avg(per_seed_table(methods))
    drawn = {c.get_label(): c.lines[0] for c in wga.axes[0].containers}
    assert set(drawn) == set(expected)
    for label, line in drawn.items():
        assert same(line.get_markeredgecolor(), expected[label]), label
        hollow = same(line.get_markerfacecolor(), "white")
        assert hollow == (by_label[label] in profiles.REFERENCES), label     # references hollow

    pdiff = plots.paired_difference_intervals(diffs_table(methods))
    ticks = [t.get_text() for t in pdiff.axes[0].get_yticklabels()]   # y is shared
    assert ticks == [palette.human_label(m) for m in palette._present(palette.METHOD_ORDER, methods)]
    for ax in pdiff.axes:
        for coll in ax.collections:
            rows = set(np.asarray(coll.get_offsets())[:, 1].round().astype(int))
            if len(rows) != 1 or len(coll.get_offsets()) != len(SEEDS):
                continue
            label = ticks[rows.pop()]
            assert same(np.atleast_2d(coll.get_edgecolor())[0], expected[label]), label
            filled = not same(np.atleast_2d(coll.get_facecolor())[0], "white")
            assert filled == (by_label[label] not in profiles.REFERENCES), label

    bars = plots.group_accuracy_bars(accuracy_table("method", methods), hue="method")
    for label, color in bar_colors(bars.axes[0]).items():
        assert same(color, expected[label]), label


def test_group_colour_by_key_in_every_figure_that_draws_it():
    for names in (GROUPS4, GROUPS6):
        pal = {n: to_hex(c) for n, c in palette.group_palette(names).items()}
        counts = plots.group_counts(group_table(names))
        assert bar_colors(counts.axes[0]) == pal
        weights = plots.weights_by_group(weights_table(names=names))
        assert legend_colors(weights) == pal
        for ax in weights.axes:
            if ax.get_visible():
                drawn = hexes(ln.get_color() for ln in ax.get_lines()) - {"#888888"}
                assert drawn == set(pal.values())
        dists = plots.weight_distributions(weight_distribution_table(names),
                                           methods=("dedier_both", "laplace_kd", "shuffled"))
        assert legend_colors(dists) == pal
    # keyed by the group index: a figure of two groups keeps their colours
    sub = weight_distribution_table()
    sub = sub[sub.group.isin([1, 3])]
    fig = plots.weight_distributions(sub, methods=("laplace_kd",))
    pal4 = palette.group_palette(GROUPS4)
    assert legend_colors(fig) == {GROUPS4[g]: to_hex(pal4[GROUPS4[g]]) for g in (1, 3)}


# ------------------------------------------------------------------ single figures
def test_heatmap_is_colour_blind_safe_with_readable_annotations():
    fig = plots.group_acc_heatmap(heat_table())
    ax = fig.axes[0]
    cmap = ax.collections[0].get_cmap()
    assert cmap.name != "RdYlGn"
    assert cmap.name in {"cividis", "viridis", "magma", "inferno", "plasma", "mako", "rocket"}
    values = heat_table().to_numpy()
    texts = [t for t in ax.texts if re.fullmatch(r"\d\.\d\d", t.get_text())]
    assert len(texts) == values.size
    for t in texts:
        x, y = t.get_position()
        cell = cmap(values[int(y), int(x)])
        assert _contrast(cell, t.get_color()) >= 4.5, (t.get_text(), t.get_color())
    assert [t.get_text() for t in ax.get_yticklabels()] == [palette.human_label(m) for m in STUDY_METHODS]


def test_score_auroc_labels_are_human_above_the_bars_and_clear_of_chance():
    fig = plots.score_auroc(auroc_table())
    ax = fig.axes[0]
    ticks = [t.get_text().replace("\n", " ") for t in ax.get_xticklabels()]
    assert ticks[0] == palette.SCORE_LABELS["dedier_map_margin"]
    assert not any("_" in t for t in ticks)
    custom = plots.score_auroc(auroc_table().replace("laplace_variance", "my_new_score"))
    assert "my new score" in [t.get_text().replace("\n", " ") for t in custom.axes[0].get_xticklabels()]

    bars = [p for c in ax.containers if hasattr(c, "patches") for p in c.patches]
    labels = [t for t in ax.texts if re.fullmatch(r"\d\.\d\d", t.get_text())]
    assert len(labels) == len(bars) == 8
    renderer = rendered(fig)
    for t in labels:
        x, y = t.get_position()
        bar = min(bars, key=lambda p: abs(p.get_x() + p.get_width() / 2 - x))
        assert y > bar.get_height(), t.get_text()
        assert abs(y - 0.5) > 0.01, t.get_text()
        box = t.get_window_extent(renderer).transformed(ax.transData.inverted())
        assert not (box.y0 - 0.01 < 0.5 < box.y1 + 0.01), t.get_text()   # the text itself clear too
    legend = ax.get_legend()
    assert legend is not None
    assert not overlap(legend.get_window_extent(renderer), ax.get_window_extent(renderer), tol=2)


def test_exit_vs_final_value_labels_sit_above_the_error_bars():
    df = accuracy_table("model", ["student", "exit"])
    fig = plots.group_accuracy_bars(df, hue="model")
    ax = fig.axes[0]
    tops = {}
    for coll in ax.collections:
        for seg in coll.get_segments():
            seg = np.asarray(seg)
            if len(seg) == 2 and np.isclose(seg[0, 0], seg[1, 0]):
                x = round(float(seg[0, 0]), 6)
                tops[x] = max(tops.get(x, -np.inf), float(seg[:, 1].max()))
    labels = [t for t in ax.texts if re.fullmatch(r"\d\.\d\d", t.get_text())]
    assert len(labels) == len(tops) > 0
    renderer = rendered(fig)
    for t in labels:
        x, y = t.get_position()
        top = tops[round(float(x), 6)]
        box = t.get_window_extent(renderer).transformed(ax.transData.inverted())
        assert box.y0 >= top, (t.get_text(), box.y0, top)
    legend = ax.get_legend().get_window_extent(renderer)
    for p in ax.patches:
        assert not overlap(legend, p.get_window_extent(renderer))


def test_every_figure_fits_uses_human_labels_and_its_texts_do_not_collide():
    raw = re.compile(r"\b[a-z]+_[a-z_]+\b")      # a code identifier such as dedier_map_margin
    for name, fig in every_figure():
        found = [t.get_text() for t in all_texts(fig) if raw.search(t.get_text())]
        assert not found, (name, found)
        renderer = rendered(fig)
        w, h = fig.get_size_inches()
        bb = fig.get_tightbbox(renderer)
        tol = 0.02
        assert bb.x0 >= -tol and bb.y0 >= -tol and bb.x1 <= w + tol and bb.y1 <= h + tol, (name, bb, (w, h))
        for ax in fig.axes:
            ticks = [t.get_window_extent(renderer) for t in ax.get_xticklabels() if t.get_text()]
            for a, b in itertools.combinations(ticks, 2):
                assert not overlap(a, b), name
        xlabels = [ax.xaxis.label.get_window_extent(renderer) for ax in fig.axes if ax.get_xlabel()]
        for a, b in itertools.combinations(xlabels, 2):
            assert not overlap(a, b), name
        plt.close(fig)


def test_paired_differences_label_is_readable():
    fig = plots.paired_difference_intervals(diffs_table(), "worst_group_acc")
    for ax in fig.axes:
        assert "worst-group accuracy" in ax.get_xlabel()
        assert "_" not in ax.get_xlabel() + ax.get_title()
        assert not any("_" in t.get_text() for t in ax.get_yticklabels())
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == [palette.human_label(m) for m in STUDY_METHODS]


def test_jittered_figure_is_byte_stable(tmp_path):
    with plt.rc_context({"savefig.dpi": 60}):   # the bytes, not the resolution, are under test
        for k in (1, 2):
            plots.savefig(plots.confidence_by_group(confidence_table(), value="confidence", hue="predictive"),
                          tmp_path / f"fig{k}")
    assert (tmp_path / "fig1.png").read_bytes() == (tmp_path / "fig2.png").read_bytes()
    assert (tmp_path / "fig1.pdf").read_bytes() == (tmp_path / "fig2.pdf").read_bytes()


def test_the_names_the_notebooks_call_stay_on_plots():
    """Notebooks call these as ``fk.plots.<name>``; the palette's ``METHOD_ORDER`` is plots' own."""
    for name in ("METHOD_ORDER", "confidence_by_group", "group_acc_heatmap", "group_accuracy_bars",
                 "group_counts", "group_samples", "laplace_regime", "laplace_samples",
                 "paired_difference_intervals", "reliability", "savefig", "score_auroc",
                 "weight_distributions", "weights_by_group", "wga_vs_avg"):
        assert callable(getattr(plots, name)) or name == "METHOD_ORDER", name
    assert plots.METHOD_ORDER is palette.METHOD_ORDER
