"""Laplace-KD's weight source (README, "The maths"): the stateful part of
``laplace_kd`` and its variants (``profiles.LAPLACE_METHODS``).

:class:`LaplaceSource` accumulates ``kron_factors.KronFactors`` of the early exit
from the batches the training loop already computes, refits the exit's Laplace
posterior (``exit_laplace.posterior_from_factors``) at each epoch's end (and every
``refit_every`` steps), weights each batch by ``losses.laplace_weight`` of its
predictive, keeps its factors for a shared warm-up's state, and records the
diagnostics of ``laplace_effect.csv`` (its :meth:`LaplaceSource.epoch_stats`,
columns ``losses.LAPLACE_EFFECT``): how far its weights are from DeDiER's.
:func:`laplace_subset_indices` gives laplace_kd_subset's instances per epoch.

``losses`` reaches this module only inside ``make_objective`` and
``warmup_objective`` (this module imports ``losses``' weights and helpers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import Tensor

from . import metrics
from .exit_laplace import posterior_from_factors
from .kron_factors import KronFactors
from .losses import LAPLACE_EFFECT, MethodConfig, _exit_logits, _full, dedier_weight, laplace_weight
from .models import phi_tilde

__all__ = ["LaplaceSource", "laplace_subset_indices", "spearman"]


class LaplaceSource:
    """``laplace_kd``'s weight: DeDiER's form from the early exit's last-layer Laplace
    predictive (README, "The maths"). Each epoch from the one before warm-up ends,
    ``kron_factors.KronFactors`` are accumulated from the batches the loop already
    computes (``phi~ = [phi, 1]``, ``softmax(exit_logits)``, labels; detached, no extra
    pass); at its end (and every ``refit_every`` steps if set) the posterior is refit, B
    rescaled by N_train / n_seen, ``tau`` fixed or by marginal likelihood. Weights are 1
    until the first fit. The predictive's mean is the exit's *current* weight
    (``model.exit.linear.weight``), its covariance the last refit's (which does not depend
    on W), so Laplace-KD and DeDiER read the same exit. For C > 2 the predictive is Monte
    Carlo, its generator seeded ``seed`` at the first fit. ``fit=False`` (the shared
    warm-up, :func:`losses.warmup_objective`): only accumulate epoch ``warmup_epochs - 1``'s
    factors, for :meth:`state`.

    The variants (``profiles.LAPLACE_METHODS``) change only the posterior:
    ``prior="meronen"`` (laplace_kd_meronen) chooses var0 and a temperature on the
    validation split ``val`` at each refit (:func:`exit_laplace.posterior_from_factors`),
    reading the current exit's features there (one eval-mode pass over ``val``,
    ``train.predict``), and predicts by Meronen et al.'s shared-draw Monte Carlo (its
    generator seeded ``seed`` whatever C); ``config.laplace_subset`` (laplace_kd_subset)
    accumulates only the instances of :func:`laplace_subset_indices` (``seed``, epoch),
    without rescaling: the posterior stands for N = the instances of the subset seen."""

    def __init__(self, config: MethodConfig, model: torch.nn.Module | None, n_train: int | None,
                 seed: int = 0, fit: bool = True, group_counts=None, top_k: int | None = None,
                 val=None):
        if fit and (model is None or not hasattr(getattr(model, "exit", None), "linear")):
            raise ValueError("laplace_kd needs the student (make_objective(..., model=student)) "
                             "to read its exit head's weight model.exit.linear.weight")
        if not n_train or n_train < 1:
            raise ValueError(f"laplace_kd needs n_train (the training set size), got {n_train}")
        if fit and config.prior == "meronen" and val is None:
            raise ValueError(f"{config.method} (prior='meronen') chooses var0 and the temperature on "
                             "validation NLL at each refit: pass the validation split "
                             "(make_objective(..., val=splits['val']))")
        if config.laplace_subset is not None and config.laplace_subset > n_train:
            raise ValueError(f"{config.method}: laplace_subset={config.laplace_subset} exceeds the "
                             f"{n_train} training instances; give a smaller subset")
        self.config, self.model, self.n_train, self.seed, self.fit = config, model, int(n_train), seed, fit
        self.val = val
        self._subset, self._subset_epoch = None, None  # laplace_kd_subset's (N_train,) mask
        self.generator = None      # the Monte-Carlo predictive's (C > 2), made at the first fit
        self.posterior = None      # the current ExitLaplace; None before the first fit
        self.factors = None        # this epoch's KronFactors
        # steps since the last refit; this epoch's diagnostics (epoch_stats, from epoch_start
        # on); a second Monte-Carlo generator, the diagnostics' noise floor
        self._steps, self._effect, self._floor = 0, None, None
        self.n_groups, self.top_k = (0 if group_counts is None else len(group_counts)), top_k

    def weight(self, out, batch) -> Tensor | None:
        if self.posterior is None:
            return None
        la = self.posterior
        la.W = self.model.exit.linear.weight.detach().to(la.W)  # current mean, last refit's covariance
        pred = la.predict(_full(out.phi), generator=self.generator)
        w = laplace_weight(pred, batch.y, self.config.beta, self.config.score, self.config.alpha)
        if self._effect is not None:
            self._record_effect(out, batch, pred, w)
        return w

    def observe(self, out, batch, epoch: int) -> None:
        first = self.config.warmup_epochs - 1  # the fit at that epoch's end is the first one used
        if epoch < first or (not self.fit and epoch > first):
            return
        phi = _full(out.phi)
        probs = F.softmax(_exit_logits(out), dim=-1)
        y = batch.y.to(phi.device)
        subset = self.config.laplace_subset
        if subset is not None:  # only this epoch's subset, standing for itself (no rescaling)
            if self._subset_epoch != epoch:
                self._subset = torch.zeros(self.n_train, dtype=torch.bool)
                self._subset[laplace_subset_indices(self.n_train, subset, self.seed, epoch)] = True
                self._subset_epoch = epoch
            keep = self._subset[batch.idx.cpu()].to(phi.device)
            if not bool(keep.any()):
                return
            phi, probs, y = phi[keep], probs[keep], y[keep]
        if self.factors is None:
            self.factors = KronFactors(n_train=None if subset is not None else self.n_train)
        self.factors.update(phi_tilde(phi), probs, y)
        self._steps += 1
        k = self.config.refit_every
        if self.fit and k is not None and self._steps % k == 0 and epoch >= self.config.warmup_epochs:
            self._refit()

    def _refit(self) -> None:
        """The exit Laplace of the current head weight from this epoch's factors under
        ``config.prior`` (Meronen's recipe: var0 and temperature on the current exit's
        validation features)."""
        W, cfg, val = self.model.exit.linear.weight.detach(), self.config, {}
        if cfg.prior == "meronen":
            from .train import predict  # train imports no losses; kept local all the same

            p = predict(self.model, self.val, device=W.device)
            val = {"phi_val": p.phi.to(W.device), "y_val": self.val.y}
        self.posterior = posterior_from_factors(W, self.factors, prior=cfg.prior, tau=cfg.tau, **val)
        if self.generator is None and (self.posterior.C > 2 or self.posterior.recipe == "meronen"):
            # Monte-Carlo predictive
            self.generator = torch.Generator(device=W.device).manual_seed(self.seed)
            self._floor = torch.Generator(device=W.device).manual_seed(self.seed + 1)

    def epoch_end(self, epoch: int) -> None:
        if not self.fit:
            return
        if self.factors is not None and self.factors.n > 0:
            self._refit()
        self.factors, self._steps = None, 0

    def state(self) -> dict:
        return {"laplace_factors": None if self.factors is None else self.factors.state()}

    def load_state(self, state: dict | None, epoch: int) -> None:
        """Continue from a shared warm-up (``train.train_warmup`` with
        :func:`losses.warmup_objective`) that ends before ``epoch``: its last epoch's factors
        are what this source would have accumulated itself, so the refit at that
        epoch's end is done now, exactly as in a run from scratch."""
        factors = (state or {}).get("laplace_factors")
        if epoch - 1 < self.config.warmup_epochs - 1:
            return  # the warm-up ended before this source accumulates: nothing to continue
        if self.config.laplace_subset is not None:
            raise ValueError(f"{self.config.method} fits each epoch's posterior on its own subset, "
                             "which a shared warm-up's factors (all instances) cannot give: train "
                             "it from scratch (students.shares_warmup is False for it)")
        if factors is None:
            raise ValueError("laplace_kd branches from a warm-up state without Laplace factors "
                             "(train it with warmup_objective)")
        self.factors = KronFactors.from_state(factors)
        self.epoch_end(epoch - 1)

    # -- the size of the Laplace effect (logged per epoch by the loop) ----------
    def epoch_start(self) -> None:
        self._effect = {}

    def _record_effect(self, out, batch, pred, w) -> None:
        cfg, exit_logits = self.config, _exit_logits(out)
        seen = {"w_dedier": dedier_weight(exit_logits, batch.y, cfg.beta, cfg.alpha), "w_laplace": w,
                "dp": (pred.probs.detach() - F.softmax(exit_logits.to(pred.probs.dtype), -1)).abs().amax(-1),
                "wrong": exit_logits.argmax(-1) != batch.y, "idx": batch.idx,
                "g": batch.y * (self.n_groups // exit_logits.shape[-1]) + batch.a.to(batch.y.device)}
        if self._floor is not None:  # a second, independent Monte-Carlo draw: the noise floor
            again = self.posterior.predict(_full(out.phi), generator=self._floor)
            seen["w_again"] = laplace_weight(again, batch.y, cfg.beta, cfg.score, cfg.alpha)
        for name, value in seen.items():
            self._effect.setdefault(name, []).append(value.detach().cpu())

    def epoch_stats(self) -> dict:
        """How far Laplace-KD's weights are from DeDiER's (the same exit's MAP weights, same
        beta and alpha) over this epoch's training instances (:data:`losses.LAPLACE_EFFECT`): the
        Spearman over all (near 1: most tie at weight 1), max and mean |p_Laplace - p_MAP|,
        how many the exit's MAP gets wrong and the Spearman and Kendall within those; the
        share of the ``top_k`` most upweighted instances both have (ties to the lower
        dataset index); the within-wrong correlations of two independent Monte-Carlo
        draws, the noise floor (NaN for C = 2: the probit is deterministic); each group's
        share of the raw Laplace-KD weight. NaN before the first refit."""
        if not self.fit:
            return {}
        shares = [f"weight_share_g{k}" for k in range(self.n_groups)]
        if not (self._effect or {}).get("w_laplace"):
            return dict.fromkeys([*LAPLACE_EFFECT, *shares], float("nan"))
        e = {name: torch.cat(values) for name, values in self._effect.items()}
        wd, wl, dp, wrong = e["w_dedier"].double(), e["w_laplace"].double(), e["dp"].double(), e["wrong"]
        nan2 = {"spearman": float("nan"), "kendall": float("nan")}
        within = metrics.within_wrong_rank_corr(wd, wl, wrong)
        floor = metrics.within_wrong_rank_corr(wl, e["w_again"].double(), wrong) if "w_again" in e else nan2
        order = e["idx"].argsort()  # dataset order
        k = min(self.top_k or 0, len(wl))
        stats = [spearman(wd, wl), float(dp.max()), float(dp.mean()), int(wrong.sum()),
                 within["spearman"], within["kendall"],
                 metrics.topk_overlap(wd[order], wl[order], k) if k else float("nan"),
                 floor["spearman"], floor["kendall"]]
        share = metrics.group_weight_share(wl, e["g"], self.n_groups) if shares else []
        return {**dict(zip(LAPLACE_EFFECT, stats)), **dict(zip(shares, map(float, share)))}


def laplace_subset_indices(n_train: int, size: int, seed: int, epoch: int) -> Tensor:
    """laplace_kd_subset's instances of ``epoch`` (0-based) for ``seed``: the first
    ``size`` of a permutation of ``range(n_train)`` seeded ``1_000_003 * seed + epoch``
    (a new subset each epoch, the same in every run of that seed)."""
    gen = torch.Generator().manual_seed(1_000_003 * int(seed) + int(epoch))
    return torch.randperm(int(n_train), generator=gen)[:int(size)]


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN if either is constant."""
    a, b = a.detach().double().cpu().numpy(), b.detach().double().cpu().numpy()
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)
