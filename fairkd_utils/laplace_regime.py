"""When does the exit's Laplace change DeDiER's weights? The regime map.

The posterior's logit variance at a training instance is its leverage over the
curvature, and the mean leverage is exactly ``(D+1)/N``: a small exit fitted on many
instances has a predictive that barely moves the MAP probabilities, so Laplace-KD ranks
the instances as DeDiER does. :func:`regime_map` fits the exit Laplace of one ERM exit
on nested random subsets of the training split (each a prefix of one seeded
permutation), under each prior recipe, and measures on the training instances how far
the Laplace-KD weights ``exp(beta * u)`` (``losses.laplace_weight``, one row per score)
move from DeDiER's MAP weights (``losses.dedier_weight``), against the x-axis of the
regime: the posterior's median logit variance. Rank agreement is taken among the
instances the MAP exit gets wrong (``metrics.within_wrong_rank_corr``): the only ones
DeDiER moves; over all instances the ties at weight 1 hide any difference.

:func:`simulate_paper_regime` makes the paper's regime -- a BERT-base exit, 768-d
features, three classes, MultiNLI's 206,175 training instances (~0.011 parameters per
instance) -- as a **simulation** (Gaussian class-conditional features with a spurious
direction), for the same map.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from . import losses, metrics
from .exit_laplace import ExitLaplace, fit_on_subset
from .models import ExitHead, phi_tilde
from .multinli import MULTINLI_COUNTS
from .profiles import LAPLACE_SCORES

__all__ = ["RECIPES", "nested_subsets", "regime_map", "simulate_paper_regime"]

#: The prior recipes of the map: ``fit_exit_laplace``'s prior and its label.
RECIPES = {"exact": "exact prior, marginal likelihood", "meronen": "Meronen et al. (2023)"}


def nested_subsets(n: int, sizes, seed: int = 0) -> dict[int, torch.Tensor]:
    """``{size: indices}``: the first ``size`` entries of one permutation of ``range(n)``
    seeded ``seed``, so every smaller subset lies inside every larger one."""
    sizes = sorted({int(s) for s in sizes}, reverse=True)
    if not sizes or sizes[-1] < 1 or sizes[0] > n:
        raise ValueError(f"subset sizes must lie in [1, {n}] (the training instances), got {sizes}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return {s: perm[:s] for s in sizes}


def default_sizes(n: int, batch: int = 128) -> list[int]:
    """N, N/10, N/100 and one batch of ``batch`` (those of at least 2 instances), largest first."""
    return sorted({s for s in (n, n // 10, n // 100, min(batch, n)) if s >= 2}, reverse=True)


def regime_map(head, phi, y, g, phi_val, y_val, *, beta: float, exit_logits=None,
               n_groups: int | None = None, sizes=None, recipes=tuple(RECIPES),
               scores=LAPLACE_SCORES, seed: int = 0, top_share: float = 0.1,
               eval_idx=None, source: str = "") -> pd.DataFrame:
    """The regime map of one ERM exit ``head`` (ExitHead) with training features ``phi``
    (N, D), labels ``y``, groups ``g``, validation ``phi_val``/``y_val`` (Meronen's
    choice of var0 and T) and DeDiER's ``beta``.

    For each subset size (default :func:`default_sizes`; nested, :func:`nested_subsets`
    with ``seed``) and recipe (``"exact"``: prior precision by marginal likelihood on
    the subset; ``"meronen"``), the Laplace is fitted on the subset and its predictive
    (the one Laplace-KD would use: probit for two classes and MC-100 otherwise for
    ``exact``, Meronen's shared-draw MC-50 with temperature) evaluated on the training
    instances (all, or ``eval_idx``). One row per score, columns:

    * ``spearman_wrong``, ``kendall_wrong``: rank agreement of the Laplace-KD weights
      with DeDiER's among the instances the MAP exit gets wrong;
    * ``topk_overlap``: share of DeDiER's ``k = ceil(top_share * n_wrong)`` most
      upweighted instances that are among the Laplace-KD weights' ``k`` most upweighted;
    * ``weight_share_shift``: total-variation distance between the groups' shares of
      the two weightings (``metrics.group_weight_share``);
    * ``median_logit_var``: median posterior variance of the top-2 logit difference
      (untempered); ``params_per_instance`` = C(D+1)/n_fit; ``mean_leverage`` =
      (D+1)/n_fit; ``max_abs_dp``: largest change of a probability against the MAP;
    * ``noise_floor_spearman``: within-wrong Spearman between the weights of two
      independent MC draws of the same fit (NaN for the deterministic probit);
    * ``tau``, ``var0``, ``temperature``; ``factors_s`` (seconds for the subset's
      factors and the exact posterior; the recipes share the factors) and ``fit_s``
      (the recipe's prior choice and predictions).
    """
    if not beta > 0:
        raise ValueError(f"beta must be positive (DeDiER's weight exp(beta cm alpha)), got {beta}")
    bad = [r for r in recipes if r not in RECIPES]
    if bad:
        raise ValueError(f"unknown recipes {bad}; choose from {list(RECIPES)}")
    phi = torch.as_tensor(phi)
    y, g = torch.as_tensor(y).long(), torch.as_tensor(g).long()
    if not (len(phi) == len(y) == len(g)):
        raise ValueError(f"phi, y and g need one row per training instance ({len(phi)}, {len(y)}, {len(g)})")
    W = head.linear.weight.detach().double()
    logits = (phi_tilde(phi.double()) @ W.T if exit_logits is None
              else torch.as_tensor(exit_logits).double())
    probs = torch.softmax(logits, -1)
    C, D1 = W.shape
    n_groups = int(g.max()) + 1 if n_groups is None else int(n_groups)
    ev = torch.arange(len(phi)) if eval_idx is None else torch.as_tensor(eval_idx).long()
    phi_ev, y_ev, g_ev, p_map = phi[ev].double(), y[ev], g[ev], probs[ev]
    w_ref = losses.dedier_weight(logits[ev], y_ev, beta).double()
    wrong = (p_map.argmax(1) != y_ev).numpy()
    n_wrong = int(wrong.sum())
    k = max(1, math.ceil(top_share * n_wrong))
    share_ref = metrics.group_weight_share(w_ref.numpy(), g_ev, n_groups)
    rows = []
    for n_fit, idx in nested_subsets(len(phi), sizes or default_sizes(len(phi)), seed).items():
        t0 = time.perf_counter()
        exact = fit_on_subset(head, phi, probs, idx, y=y)         # tau by marginal likelihood
        factors_s = time.perf_counter() - t0
        for recipe in recipes:
            t0 = time.perf_counter()
            la = exact if recipe == "exact" else ExitLaplace(W, exact.factors, prior="kron")  # same factors
            if recipe == "meronen":
                la.optimize_meronen_val(phi_val, y_val)
            mc = recipe == "meronen" or C > 2
            preds = [la.predict(phi_ev, generator=torch.Generator().manual_seed(s)) for s in (0, 1)[:1 + mc]]
            fit_s = time.perf_counter() - t0
            dp = float((preds[0].probs.double() - p_map).abs().max())
            for score in scores:
                w = [losses.laplace_weight(p, y_ev, beta, score).double().numpy() for p in preds]
                rc = metrics.within_wrong_rank_corr(w_ref, w[0], wrong)
                floor = (metrics.within_wrong_rank_corr(w[0], w[1], wrong)["spearman"] if mc
                         else float("nan"))
                shift = 0.5 * np.abs(metrics.group_weight_share(w[0], g_ev, n_groups) - share_ref).sum()
                rows.append({
                    "source": source, "seed": seed, "recipe": recipe, "prior": RECIPES[recipe],
                    "score": score, "n_fit": n_fit, "n_eval": len(ev), "n_wrong": n_wrong,
                    "params_per_instance": C * D1 / n_fit, "mean_leverage": D1 / n_fit,
                    "spearman_wrong": rc["spearman"], "kendall_wrong": rc["kendall"],
                    "topk_overlap": metrics.topk_overlap(w_ref.numpy(), w[0], k), "k": k,
                    "weight_share_shift": float(shift),
                    "median_logit_var": float(preds[0].variance.double().median()),
                    "max_abs_dp": dp, "noise_floor_spearman": floor,
                    "predictive": "mc_shared" if recipe == "meronen" else ("mc" if mc else "probit"),
                    "tau": la.tau, "var0": la.var0 if recipe == "meronen" else float("nan"),
                    "temperature": la.temperature if recipe == "meronen" else float("nan"),
                    "factors_s": factors_s, "fit_s": fit_s})
    return pd.DataFrame(rows)


def simulate_paper_regime(n_train: int = 206_175, d: int = 768, n_val: int = 5_000, *,
                          core: float = 1.0, spurious: float = 4.0, seed: int = 0) -> dict:
    """A **simulation** of the paper's regime: a BERT-base early exit (``d`` = 768
    features, three classes) on MultiNLI's training split (206,175 instances; groups
    ``g = 2 y + a`` drawn in MultiNLI's proportions, ``a`` = negation).

    Features (float32): ``phi = core * m_y + spurious * (a - mean a) * u + e`` with
    ``m_y``, ``u`` orthonormal random directions and ``e ~ N(0, I_d)``: a weak label
    direction and a strong spurious one, so the exit reads negation and is wrong,
    confidently, on entailment/neutral with negation. The MAP exit (:class:`ExitHead`)
    is the L2-regularised (``1e-4 ||W||^2 / 2``) softmax regression restricted to the
    span of the four signal directions and the bias, fitted by L-BFGS: the full MAP adds
    weights of size ~sqrt(d/N) along noise directions, which this leaves out (fitting
    all 769 x 3 weights on 206k instances costs minutes on two cores). Validation:
    ``n_val`` instances in MultiNLI's validation proportions. Seeded, deterministic on a
    CPU. Returns ``head``, ``phi``, ``y``, ``g``, ``phi_val``, ``y_val``, ``g_val`` and
    ``directions`` (4, d): the label directions ``m_0..m_2`` and the spurious ``u``."""
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.linalg.qr(torch.randn(d, 4, generator=gen, dtype=torch.float64))[0].T.float()

    def draw(counts, n):
        p = torch.tensor(counts, dtype=torch.float64)
        g = torch.multinomial(p / p.sum(), n, replacement=True, generator=gen)
        y, a = g // 2, (g % 2).float()
        a_mean = float(p[1::2].sum() / p.sum())
        x = torch.randn(n, d, generator=gen)
        x += core * dirs[y] + spurious * (a - a_mean)[:, None] * dirs[3]
        return x, y, g

    phi, y, g = draw(MULTINLI_COUNTS["train"], n_train)
    phi_val, y_val, g_val = draw(MULTINLI_COUNTS["val"], n_val)
    z = phi_tilde((phi @ dirs.T).double())                    # coordinates in the span, and 1
    w = torch.zeros(3, 5, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=200, tolerance_grad=1e-10,
                            tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ w.T, y) + 0.5e-4 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    head = ExitHead(d, 3)
    with torch.no_grad():
        head.linear.weight.copy_(torch.cat([w[:, :4].float() @ dirs, w[:, 4:].float()], 1))
    head.requires_grad_(False)
    return {"head": head, "phi": phi, "y": y, "g": g, "phi_val": phi_val, "y_val": y_val, "g_val": g_val,
            "directions": dirs}
