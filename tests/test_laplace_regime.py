"""The regime map (fairkd_utils.laplace_regime) against independent recomputations of
its rows, the simulation of the paper's regime, and its figure."""

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from fairkd_utils import laplace_regime as R  # noqa: E402
from fairkd_utils import losses, palette, plots  # noqa: E402
from fairkd_utils.exit_laplace import fit_exit_laplace  # noqa: E402
from fairkd_utils.models import ExitHead, phi_tilde  # noqa: E402

DT = torch.float64


def problem(C=2, D=4, N=400, n_val=120, seed=0):
    """Features with a spurious coordinate, an exit head that leans on it, groups 2y+a."""
    gen = torch.Generator().manual_seed(seed)
    n = N + n_val
    y = torch.randint(0, C, (n,), generator=gen)
    a = (torch.rand(n, generator=gen) < 0.85).long()
    a = torch.where(y == 0, a, 1 - a)
    phi = torch.randn(n, D, generator=gen, dtype=DT)
    phi[:, 0] += 0.8 * y
    phi[:, -1] += 2.0 * a
    head = ExitHead(D, C).to(DT)
    with torch.no_grad():
        head.linear.weight.copy_(torch.randn(C, D + 1, generator=gen, dtype=DT))
        head.linear.weight[:, -2] += torch.linspace(1.5, -1.5, C, dtype=DT)   # reads a
    return head, phi[:N], y[:N], 2 * y[:N] + a[:N], phi[N:], y[N:]


def test_nested_subsets_are_prefixes_of_one_seeded_permutation():
    subs = R.nested_subsets(50, [50, 5, 20], seed=3)
    assert list(subs) == [50, 20, 5]
    assert sorted(subs[50].tolist()) == list(range(50))
    assert subs[20].tolist() == subs[50][:20].tolist() and subs[5].tolist() == subs[20][:5].tolist()
    assert R.nested_subsets(50, [20], seed=3)[20].tolist() == subs[20].tolist()
    assert R.nested_subsets(50, [20], seed=4)[20].tolist() != subs[20].tolist()
    assert R.default_sizes(400) == [400, 128, 40, 4] and R.default_sizes(4800) == [4800, 480, 128, 48]
    with pytest.raises(ValueError, match=r"\[1, 50\]"):
        R.nested_subsets(50, [51])


@pytest.mark.parametrize("C", [2, 3])
def test_regime_map_rows_equal_an_independent_recomputation(C):
    head, phi, y, g, pv, yv = problem(C=C)
    df = R.regime_map(head, phi, y, g, pv, yv, beta=2.0, seed=1, source="toy")
    assert len(df) == 4 * 2 * 3                       # sizes x recipes x scores
    assert set(df["n_fit"]) == {400, 128, 40, 4} and (df["source"] == "toy").all()
    torch.testing.assert_close(torch.tensor(df["params_per_instance"].to_numpy()),
                               torch.tensor(C * 5 / df["n_fit"].to_numpy()))
    logits = phi_tilde(phi) @ head.linear.weight.detach().T
    p_map = torch.softmax(logits, -1)
    wrong = (p_map.argmax(1) != y).numpy()
    assert (df["n_wrong"] == wrong.sum()).all() and 5 < wrong.sum() < 395
    w_ref = losses.dedier_weight(logits, y, 2.0).numpy()
    idx = R.nested_subsets(400, [40], seed=1)[40]
    fits = {"exact": fit_exit_laplace(head, phi[idx], p_map[idx], y=y[idx]),
            "meronen": fit_exit_laplace(head, phi[idx], p_map[idx], y=y[idx], prior="meronen",
                                        phi_val=pv, y_val=yv)}
    for recipe, la in fits.items():
        draws = [la.predict(phi, generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
        for score in ("margin", "entropy", "variance"):
            row = df[(df.recipe == recipe) & (df.score == score) & (df.n_fit == 40)].iloc[0]
            w = [losses.laplace_weight(p, y, 2.0, score).numpy() for p in draws]
            assert row["spearman_wrong"] == pytest.approx(spearmanr(w_ref[wrong], w[0][wrong]).statistic)
            assert row["median_logit_var"] == pytest.approx(float(draws[0].variance.median()))
            assert row["max_abs_dp"] == pytest.approx(float((draws[0].probs - p_map).abs().max()))
            assert row["tau"] == pytest.approx(la.tau)
            mc = recipe == "meronen" or C > 2
            assert math.isnan(row["noise_floor_spearman"]) != mc
            if mc and score != "variance":
                assert row["noise_floor_spearman"] == pytest.approx(
                    spearmanr(w[0][wrong], w[1][wrong]).statistic)
    # the smallest fits move the weights more than the full one (the regime's point)
    margin = df[(df.score == "margin") & (df.recipe == "exact")].set_index("n_fit")
    assert margin.loc[4, "median_logit_var"] > margin.loc[400, "median_logit_var"]
    assert margin.loc[4, "max_abs_dp"] > margin.loc[400, "max_abs_dp"]


def test_regime_map_refuses_bad_input_clearly():
    head, phi, y, g, pv, yv = problem()
    with pytest.raises(ValueError, match="unknown recipes"):
        R.regime_map(head, phi, y, g, pv, yv, beta=2.0, recipes=("laplace",))
    with pytest.raises(ValueError, match="one row per training instance"):
        R.regime_map(head, phi, y[:10], g, pv, yv, beta=2.0)
    with pytest.raises(ValueError, match="beta"):
        R.regime_map(head, phi, y, g, pv, yv, beta=0.0)


def test_simulated_paper_regime_is_seeded_and_its_exit_reads_the_spurious_direction():
    a = R.simulate_paper_regime(n_train=6000, d=24, n_val=300, seed=0)
    b = R.simulate_paper_regime(n_train=6000, d=24, n_val=300, seed=0)
    assert torch.equal(a["phi"], b["phi"]) and torch.equal(a["head"].linear.weight, b["head"].linear.weight)
    assert a["phi"].shape == (6000, 24) and a["phi_val"].shape == (300, 24)
    assert set(a["g"].tolist()) == set(range(6)) and torch.equal(a["y"], a["g"] // 2)
    # groups in MultiNLI's training proportions (within 4 standard errors)
    share = torch.bincount(a["g"], minlength=6).double() / 6000
    p = torch.tensor([57498, 11158, 67376, 1521, 66630, 1992], dtype=DT) / 206175
    assert ((share - p).abs() <= 4 * (p * (1 - p) / 6000).sqrt()).all()
    # the MAP of the span: the gradient of the regularised loss vanishes there
    w = a["head"].linear.weight.detach().double().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(phi_tilde(a["phi"].double()) @ w.T, a["y"]) + 0.5e-4 * w.pow(2).sum()
    (grad,) = torch.autograd.grad(loss, w)
    assert (grad[:, :-1] @ a["directions"].double().T).abs().max() < 1e-5 and grad[:, -1].abs().max() < 1e-5
    assert grad.abs().max() > 1e-4                 # the noise directions are left out of the fit
    with torch.no_grad():
        wrong = a["head"](a["phi"]).argmax(1) != a["y"]
    rate = [float(wrong[a["g"] == k].float().mean()) for k in range(6)]
    assert min(rate[3], rate[5]) > 2 * rate[1]      # negation read as contradiction: wrong on the minority


def regime_table():
    rows = []
    for source, ppi0 in (("image miniature", 0.007), ("paper regime (simulation)", 0.011)):
        for recipe in ("exact", "meronen"):
            for score, base in (("margin", 0.99), ("entropy", -0.9), ("variance", 0.02)):
                for seed in (0, 1):
                    for i, n in enumerate((1000, 100, 10)):
                        rows.append({"source": source, "recipe": recipe, "score": score, "seed": seed,
                                     "n_fit": n, "params_per_instance": ppi0 * 10 ** i,
                                     "median_logit_var": 0.01 * 10 ** i + 0.001 * seed,
                                     "spearman_wrong": base - 0.05 * i,
                                     "noise_floor_spearman": 0.98 - 0.02 * i if recipe == "meronen" else np.nan})
    return pd.DataFrame(rows)


def test_laplace_regime_figure_has_a_panel_per_source_and_the_expected_artists():
    fig = plots.laplace_regime(regime_table())
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in axes] == ["image miniature", "paper regime (simulation)"]
    for ax, per_instance in zip(axes, ({"0.007", "0.07", "0.7"}, {"0.011", "0.11", "1.1"})):
        assert ax.get_xscale() == "log"
        series = [ln for ln in ax.get_lines() if ln.get_marker() not in (None, "None", "")]
        assert len(series) == 6                                        # recipes x scores
        assert {ln.get_marker() for ln in series} == {"o", "s"}
        assert {ln.get_linestyle() for ln in series} == {"-", "--"}
        assert {to_hex(ln.get_color()) for ln in series} == {
            to_hex(palette.REGIME_SCORE_COLORS[s]) for s in ("margin", "entropy", "variance")}
        margin = [ln for ln in series if ln.get_marker() == "o"
                  and to_hex(ln.get_color()) == to_hex(palette.REGIME_SCORE_COLORS["margin"])][0]
        np.testing.assert_allclose(margin.get_xdata(), [0.0105, 0.1005, 1.0005])   # means over seeds
        np.testing.assert_allclose(margin.get_ydata(), [0.99, 0.94, 0.89])
        labels = [t.get_text() for t in ax.texts]
        assert len(labels) == 18 and set(labels) == per_instance      # one per point
        bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
        assert len(bands) == 3                                         # Meronen's MC series only
    legend = fig.axes[-1].get_legend() or axes[-1].get_legend()
    texts = [t.get_text() for t in legend.get_texts()]
    assert "Laplace margin" in texts and "Meronen et al. (2023)" in texts and "MC noise floor to 1" in texts
    assert axes[0].get_ylabel() == "within-wrong Spearman with DeDiER's weights"
    plt.close(fig)
