"""The study's palette and style: one palette per concept, so that names and colours
agree in every figure (``plots`` draws them; notebooks and slides read the same).

Colours are looked up by *key*, never by display label: a method (``"kd"``), a
model (``"exit"``), a predictive (``"map"``), a group (its index, or its place in
the group table). The same key has the same colour in every figure:

* methods (:data:`METHOD_COLORS`): Okabe-Ito's colour-blind-safe set plus three
  dark/light extras for the methods still to come (``jtt``, ``dfr``,
  ``dedier_final``); any other method gets a stable colour of its own (a hash of
  its name into a reserve list). References (methods that use group labels) are
  drawn hollow.
* groups (:func:`group_palette`): a palette of their own, never a method's
  colour: one hue per label (olive, violet, rose), dark for the first attribute
  value and light for the second (``g = 2 y + a``): four groups for the bird
  data, six for three labels x negation.
* predictives (:data:`PREDICTIVE_COLORS`): MAP in DeDiER's orange, the Laplace
  probit in Laplace-KD's green (the readout each method weights by), MC sampling
  in sky blue; models (:data:`MODEL_COLORS`) reuse them for the exit.

Every pair within a palette stays apart under simulated deuteranopia and
protanopia (checked in ``tests/test_plots.py``). Labels are human: methods from
:data:`METHOD_LABELS`, metrics from :data:`METRIC_LABELS`, scores from
:data:`SCORE_LABELS`, anything else through :func:`human_label`. :func:`use_style`
(called on import) sets the plotting style; the small helpers below map a hue
value to its colour, label and order and place legends, for every figure.
"""

from __future__ import annotations

import re
import textwrap
import zlib

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from matplotlib.colors import to_hex
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from .profiles import METHOD_SPECS


class KeyedPalette(dict):
    """``key -> colour``; a key it does not hold gets a stable colour from
    ``reserve`` (chosen by a CRC of the key, so the same in every process)."""

    def __init__(self, colors: dict, reserve):
        super().__init__(colors)
        self.reserve = tuple(reserve)

    def __missing__(self, key):
        return self.reserve[zlib.crc32(str(key).encode()) % len(self.reserve)]

    def get(self, key, default=None):
        """Like ``dict.get``, but with no ``default`` a missing key gets its reserve colour."""
        return self[key] if key in self or default is None else default


METHOD_ORDER = list(METHOD_SPECS)
METHOD_LABELS = {m: spec.label for m, spec in METHOD_SPECS.items()}
#: Okabe & Ito (2008) for the study's methods, grey for the teacher-free baseline,
#: black and wine for the references; the last three are reserved for methods to come.
METHOD_COLORS = KeyedPalette({
    "erm": "#BBBBBB", "kd": "#0072B2", "dedier": "#E69F00", "dedier_both": "#D55E00",
    "laplace_kd": "#009E73", "shuffled": "#CC79A7", "group_balanced": "#000000",
    "group_balanced_erm": "#882255",
    "jtt": "#56B4E9", "dfr": "#332288", "dedier_final": "#5C3A00",
    # the laplace set's variants of Laplace-KD: greens and teals next to its green
    "laplace_kd_entropy": "#44AA99", "laplace_kd_variance": "#1B5E20",
    "laplace_kd_meronen": "#999933", "laplace_kd_subset": "#88CCAA",
}, reserve=("#E1BE6A", "#1A85FF", "#222255", "#117733"))
#: Marker per method (a second cue next to colour); references are hollow squares.
METHOD_MARKERS = {"erm": "v", "kd": "o", "dedier": "^", "dedier_both": "D", "laplace_kd": "*",
                  "shuffled": "P", "jtt": "X", "dedier_final": "h", "laplace_kd_entropy": "p",
                  "laplace_kd_variance": "H", "laplace_kd_meronen": "8", "laplace_kd_subset": "d"}
#: One hue per label, dark then light for the two attribute values (g = 2 y + a).
GROUP_COLORS = ("#424B01", "#919D33",   # label 0: olive
                "#605889", "#9789EB",   # label 1: violet
                "#9B575B", "#E5A6A7")   # label 2: rose

PREDICTIVE_ORDER = ["map", "probit", "mc"]
PREDICTIVE_COLORS = KeyedPalette({"map": "#E69F00", "probit": "#009E73", "mc": "#56B4E9"},
                                 reserve=("#6699CC", "#AA4499"))
PREDICTIVE_LABELS = {"map": "MAP", "probit": "Laplace (probit)", "mc": "Laplace (MC samples)"}
#: Marker per predictive in the reliability diagram.
_PREDICTIVE_MARKERS = {"map": "o", "probit": "s", "mc": "^"}
#: Prior forms of the exit Laplace (colour in the sample clouds, line style in curves).
FORM_COLORS = {"exact": "#009E73", "kron": "#7E57C2"}
FORM_LINESTYLES = {"exact": "-", "kron": "--"}
FORM_LABELS = {"exact": "exact prior", "kron": "Kronecker prior"}

MODEL_ORDER = ["teacher", "student", "exit", "exit_laplace"]
MODEL_COLORS = KeyedPalette({"teacher": "#332288", "student": "#0072B2",
                             "exit": PREDICTIVE_COLORS["map"],
                             "exit_laplace": PREDICTIVE_COLORS["probit"]},
                            reserve=("#88CCEE", "#AA4499"))
MODEL_LABELS = {"teacher": "teacher", "student": "student (final head)",
                "exit": "early exit", "exit_laplace": "early exit (Laplace)"}

SPLIT_ORDER = ["train", "val", "test"]
SPLIT_COLORS = {"train": "#D9D9D9", "val": "#9E9E9E", "test": "#4D4D4D"}
SPLIT_LABELS = {"train": "train", "val": "validation", "test": "test"}

#: Right and wrong predictions (Tol's medium-contrast blue and red).
OUTCOME_COLORS = {"right": "#6699CC", "wrong": "#BB5566"}
#: What a hardness score should single out (Tol's high-contrast pair).
TARGET_COLORS = KeyedPalette({"minority group": "#DDAA33", "ERM student wrong": "#004488"},
                             reserve=("#BB5566", "#6699CC", "#999933"))

METRIC_LABELS = {
    "worst_group_acc": "worst-group accuracy", "avg_acc": "average accuracy",
    "train_weighted_acc": "train-weighted accuracy", "group_gap": "group gap (best − worst)",
    "ece": "calibration error (ECE)", "nll": "negative log-likelihood", "acc": "accuracy",
    "auroc": "AUROC",
}
SCORE_LABELS = {
    "dedier_map_margin": "DeDiER margin (MAP exit)", "laplace_margin": "Laplace margin",
    "laplace_entropy": "Laplace entropy", "laplace_variance": "Laplace logit variance",
}
#: The label tables :func:`human_label` reads (a method's label first).
_LABELS = {**SCORE_LABELS, **METRIC_LABELS, **METHOD_LABELS}
#: Words :func:`human_label` spells its own way.
_WORDS = {"map": "MAP", "kd": "KD", "erm": "ERM", "dedier": "DeDiER", "laplace": "Laplace",
          "jtt": "JTT", "dfr": "DFR", "auroc": "AUROC", "ece": "ECE", "nll": "NLL",
          "mc": "MC", "acc": "accuracy", "avg": "average", "val": "validation", "kron": "Kronecker"}


def human_label(key) -> str:
    """The display name of a key: from the label tables, else the key with its
    underscores as spaces and known words spelled out (``dedier_map_margin`` ->
    ``DeDiER MAP margin``)."""
    key = str(key)
    words = (_WORDS.get(w.lower(), w) for w in re.split(r"[_\s]+", key) if w)
    return _LABELS.get(key) or " ".join(words) or key


def use_style() -> None:
    """The study's plotting style (called on import; idempotent)."""
    sns.set_theme(context="notebook", style="whitegrid", font_scale=1.05)
    plt.rcParams.update({
        "figure.dpi": 110, "savefig.dpi": 200, "savefig.bbox": "tight",
        "axes.titleweight": "bold", "axes.spines.top": False, "axes.spines.right": False,
        "legend.frameon": False, "pdf.fonttype": 42, "svg.hashsalt": "fairkd",
    })


use_style()


def _group_color(index: int, n_groups: int):
    if n_groups <= len(GROUP_COLORS):
        return GROUP_COLORS[index]
    # More groups than the paired palette holds: evenly along cividis (blue to
    # yellow, colour-blind safe, no method's green).
    return to_hex(plt.get_cmap("cividis")(0.1 + 0.8 * index / max(n_groups - 1, 1)))


def group_palette(group_names) -> dict:
    """A colour per group, the names given in group order (``g = 2 y + a``): one
    hue per label, dark for the first attribute value and light for the second
    (olive, violet, rose: up to six groups; more fall back to cividis). Never a
    method's colour."""
    names = list(dict.fromkeys(group_names))
    return {n: _group_color(i, len(names)) for i, n in enumerate(names)}


def _groups_of(df: pd.DataFrame):
    """Group names in group order and their colours, keyed by the group index
    where ``df`` has one (so a subset of groups keeps its colours)."""
    if "group" in df:
        pairs = df[["group", "group_name"]].drop_duplicates("group_name")
        pairs = pairs.assign(group=pd.to_numeric(pairs["group"], errors="coerce")).dropna()
        if len(pairs):
            pairs = pairs.sort_values("group", kind="stable")
            n = int(pairs["group"].max()) + 1
            return list(pairs["group_name"]), {name: _group_color(int(g), n)
                                                for g, name in zip(pairs["group"], pairs["group_name"])}
    names = list(dict.fromkeys(df["group_name"]))
    return names, group_palette(names)


# --------------------------------------------------------------------- helpers every figure shares
def _wrap(text, width: int = 14) -> str:
    return "\n".join(textwrap.wrap(str(text), width)) or str(text)


def _present(order, values):
    values = list(dict.fromkeys(values))
    return [v for v in order if v in values] + [v for v in values if v not in order]


def _predictive_key(value):
    """The predictive a hue value stands for: ``"map"``, ``"MAP"``, ``"Laplace exact
    (probit)"`` -> map, map, probit; None when it names none."""
    low = str(value).strip().lower()
    words = [low] + re.findall(r"\(([a-z]+)\)", low) + re.findall(r"[a-z]+", low)
    return next((w for w in words if w in PREDICTIVE_COLORS), None)


def _form_key(value):
    words = re.findall(r"[a-z]+", str(value).lower())
    return next((w for w in words if w in FORM_COLORS), None)


#: The palette of each concept a hue can name (a keyed palette gives every value a colour,
#: a plain table None for a value it does not hold).
_HUE_COLORS = {"method": METHOD_COLORS, "model": MODEL_COLORS, "predictive": PREDICTIVE_COLORS,
               "split": SPLIT_COLORS, "target": TARGET_COLORS, "prediction": OUTCOME_COLORS,
               "correct": OUTCOME_COLORS}


def _hue_color(hue: str, value):
    """The colour of one hue value of a known concept, looked up by key (a predictive
    by the key its label names); a hue of no known concept takes a model's or a
    method's colour where the value is one, else None."""
    if hue == "predictive":
        value = _predictive_key(value) or value
    if hue in _HUE_COLORS:
        return _HUE_COLORS[hue].get(value)
    return next((table[value] for table in (MODEL_COLORS, METHOD_COLORS) if value in table), None)


def _predictive_label(value) -> str:
    """``map`` -> MAP, ``Laplace kron (mc)`` -> Laplace Kronecker (MC): keys through
    :data:`PREDICTIVE_LABELS`, labels with their abbreviations spelled out."""
    if value in PREDICTIVE_LABELS:
        return PREDICTIVE_LABELS[value]
    return re.sub(r"\bkron\b", "Kronecker", str(value)).replace("(mc)", "(MC)")


#: How each concept a hue can name labels its values (any other hue: the value as it is).
_HUE_LABELS = {"method": human_label, "model": lambda v: MODEL_LABELS.get(v) or human_label(v),
               "split": lambda v: SPLIT_LABELS.get(v, v), "predictive": _predictive_label}


def _hue_label(hue: str, value) -> str:
    return _HUE_LABELS.get(hue, str)(value)


def _hue_order(hue: str, values):
    order = {"method": METHOD_ORDER, "model": MODEL_ORDER, "split": SPLIT_ORDER,
             "predictive": PREDICTIVE_ORDER, "prediction": ["right", "wrong"]}.get(hue, [])
    return _present(order, values)


def _legend_outside(ax, handles=None, labels=None, **kw):
    """The legend to the right of ``ax``, outside the plot area (the constrained
    layout makes room for it)."""
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    if ax.get_legend():
        ax.get_legend().remove()
    if handles:
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, **kw)


def _patches(colors: dict):
    return [Patch(facecolor=c, edgecolor="#333333", linewidth=0.6) for c in colors.values()], list(colors)


def _lines(colors: dict, lw: float = 1.8):
    return [Line2D([], [], color=c, lw=lw) for c in colors.values()], list(colors)


# --------------------------------------------------------------------- notebook 04: the regime map
#: Regime map: sources in this order (one panel each), a colour per Laplace score (the
#: margin in Laplace-KD's green), a marker and line style per prior recipe.
REGIME_SOURCES = ["image miniature", "text miniature", "paper regime (simulation)"]
REGIME_SCORE_COLORS = KeyedPalette({"margin": METHOD_COLORS["laplace_kd"], "entropy": "#56B4E9",
                                    "variance": "#CC79A7"}, reserve=("#E1BE6A", "#332288"))
REGIME_RECIPES = {"exact": ("o", "-", "exact prior (marginal likelihood)"),
                  "meronen": ("s", "--", "Meronen et al. (2023)")}
