"""Last-layer Laplace approximation at the early exit (README, "The maths").

The exit head is ``Linear(D+1, C, bias=False)`` on ``phi_tilde = [phi, 1]``; its GGN
is approximated by ``kron(B, A)``, the Kronecker factors of
:mod:`fairkd_utils.kron_factors` (``B`` summed, ``A`` averaged over instances, as
laplace-torch normalises them; ``vec(W)`` row-major), which that module accumulates.

Two priors:

* ``prior="exact"`` (default, as laplace-torch): precision ``kron(B, A) + tau*I``.
  With ``B = Q_B diag(lB) Q_B^T`` and ``A = Q_A diag(lA) Q_A^T`` the logit
  covariance at ``phi~`` is ``Q_B diag(s) Q_B^T`` with
  ``s_k = sum_j (q_Aj^T phi~)^2 / (lB_k lA_j + tau)`` -- no Jacobian, O(C*D) per
  instance once ``phi~`` is projected on ``Q_A``.  ``tau`` by the closed-form
  maximiser of laplace-torch's Laplace log marginal likelihood.
* ``prior="kron"`` (the slides, Meronen et al.): ``U = (sqrt(N) B/N + sqrt(tau) I)^-1``,
  ``V = (sqrt(N) A + sqrt(tau) I)^-1``, logit covariance ``(phi~^T V phi~) U``.  Not an
  evidence-based prior, so ``tau`` comes from validation NLL over a grid
  (:meth:`ExitLaplace.optimize_tau_val`, our own loop: laplace-torch 0.3's
  gridsearch never resets its NLL metric).
* Meronen et al. (2023)'s recipe (``fit_exit_laplace(..., prior="meronen")``, as their
  public code AaltoML/calibrated-dnn does it): the kron form with ``tau = 1/var0``
  (their factors are ``sqrt(N)`` times the per-instance means plus ``sqrt(1/var0) I``),
  ``var0`` chosen *jointly* with a temperature ``T`` on the logits by validation NLL
  over their grids (:data:`MERONEN_VAR0_GRID` x :data:`MERONEN_TEMP_GRID`), and a
  Monte-Carlo predictive of :data:`MERONEN_SAMPLES` draws shared by every instance
  (link ``"mc_shared"``): ``p = mean_s softmax((mu + v^(1/2) L g_s) / T)``.

Maths runs in float64; predictions come back in the dtype of the features given.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple, Sequence

import torch
from torch import nn

from .kron_factors import _MATH, KronFactors
from .models import phi_tilde
from .profiles import PRIORS

__all__ = [
    "ExitLaplace", "LaplacePrediction", "fit_exit_laplace", "fit_on_subset",
    "posterior_from_factors",
    "probit_two_class", "phi_tilde", "MERONEN_VAR0_GRID", "MERONEN_TEMP_GRID", "MERONEN_SAMPLES",
]

_LINKS = ("auto", "probit", "mc", "mc_shared")
#: Meronen et al. (2023)'s grids (calibrated-dnn, adaptive_inference.py): prior variance
#: var0 (tau = 1/var0) and logit temperature, searched jointly per exit on validation NLL.
MERONEN_VAR0_GRID = (0.5, 0.7, 1.0, 1.3, 1.5, 1.7, 2.0, 2.5, 3.0, 4.0)
MERONEN_TEMP_GRID = (0.3, 0.5, 0.7, 1.0, 1.3, 1.5, 1.7, 2.0, 2.5, 3.0)
#: Their Monte-Carlo predictive's number of draws.
MERONEN_SAMPLES = 50


class LaplacePrediction(NamedTuple):
    """Laplace predictive per instance.

    probs (n, C); margin (n,) = p_max - second-largest p; entropy (n,) of probs
    (nats); variance (n,) = variance of the logit difference between the two
    classes with the largest MAP logits (for C = 2 exactly sigma_d^2).
    """

    probs: torch.Tensor
    margin: torch.Tensor
    entropy: torch.Tensor
    variance: torch.Tensor


def probit_two_class(mu_d: torch.Tensor, var_d: torch.Tensor) -> torch.Tensor:
    """``p1 = sigmoid(mu_d / sqrt(1 + pi var_d / 8))`` for ``d = z_1 - z_0 ~ N(mu_d, var_d)``.

    The probit (MacKay) approximation of ``E[sigmoid(d)]``; applied to the logit
    difference it ignores the softmax-invariant direction a per-logit probit
    would wrongly take variance from.
    """
    return torch.sigmoid(mu_d / torch.sqrt(1.0 + math.pi * var_d / 8.0))


def _nll(probs: torch.Tensor, y: torch.Tensor) -> float:
    """Mean negative log-likelihood of the labels ``y`` (n,) under ``probs`` (n, C), in float64."""
    return float(-torch.log(probs.to(_MATH).gather(1, y[:, None]).clamp_min(1e-300)).mean())


# --------------------------------------------------------------------------- helpers
def _head_weight(head: nn.Module) -> torch.Tensor:
    lin = getattr(head, "linear", head)
    if not isinstance(lin, nn.Linear) or lin.bias is not None:
        raise TypeError("expected an ExitHead (its .linear Linear(D+1, C, bias=False) on [phi, 1]), "
                        f"got {type(head).__name__}.")
    return lin.weight.detach()


def _check_width(phi: torch.Tensor, d: int) -> None:
    if phi.ndim != 2:
        raise ValueError(f"features must be a 2-d tensor (n, D), got shape {tuple(phi.shape)}.")
    if phi.shape[1] != d:
        hint = (" -- that looks like phi_tilde = [phi, 1]; pass the raw features phi"
                if phi.shape[1] == d + 1 else "")
        raise ValueError(f"feature width does not match the exit head: expected D = {d} "
                         f"features (head is Linear({d}+1, C)), got {phi.shape[1]}{hint}.")


# --------------------------------------------------------------------------- posterior
class ExitLaplace:
    """Laplace posterior over the exit head's weight ``W`` (C, D+1) at the MAP.

    ``prior="exact"``: precision ``kron(B, A) + tau I``; ``tau=None`` -> marginal
    likelihood (:meth:`optimize_tau_marglik`).  ``prior="kron"``: the slides'
    symmetric Kronecker form; ``tau`` must be given or chosen with
    :meth:`optimize_tau_val` before predicting.
    """

    def __init__(self, weight: torch.Tensor, factors: KronFactors, prior: str = "exact",
                 tau: float | None = None):
        if prior not in PRIORS:
            raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}.")
        weight = torch.as_tensor(weight).detach()
        if weight.ndim != 2:
            raise ValueError(f"weight must be (C, D+1), got shape {tuple(weight.shape)}.")
        if factors.n_classes != weight.shape[0] or factors.n_features + 1 != weight.shape[1]:
            raise ValueError(
                f"factors do not match the head: weight is ({weight.shape[0]}, {weight.shape[1]}) "
                f"= (C, D+1) but factors have C = {factors.n_classes}, D+1 = {factors.n_features + 1}.")
        self.prior, self.factors, self.n_data = prior, factors, factors.n_data
        self.device, self.W = weight.device, weight.to(_MATH)
        self.B, self.A = factors.B.to(self.device, _MATH), factors.A.to(self.device, _MATH)
        if not (torch.isfinite(self.B).all() and torch.isfinite(self.A).all()):
            raise ValueError("the Kronecker factors contain NaN/inf, so the damped posterior is "
                             "not positive definite; refit from finite features and probabilities.")
        self.C, self.D1 = weight.shape
        if prior == "exact":
            self.lam_B, self.Q_B = torch.linalg.eigh(self.B)
            self.lam_A, self.Q_A = torch.linalg.eigh(self.A)
            # eigenvalues of kron(B, A), index (k, j) <-> eigvec q_Bk (x) q_Aj
            self.lam = torch.outer(self.lam_B, self.lam_A)
        # the prior's parameters once set or chosen; val_nll [(tau, nll), ...] and
        # val_nll_grid [(var0, T, nll), ...] once chosen on validation data
        self.tau = self.temperature = self.var0 = None
        self.val_nll = self.val_nll_grid = None
        #: "meronen" once :meth:`set_meronen` made this kron posterior Meronen's recipe
        #: (temperature on the logits, shared-draw MC of MERONEN_SAMPLES by default).
        self.recipe = prior
        if tau is not None:
            self.set_tau(tau)
        elif prior == "exact":
            self.optimize_tau_marglik()

    # ---------------------------------------------------------------- prior
    def set_tau(self, tau: float) -> "ExitLaplace":
        """Set the prior precision and precompute what prediction needs; raises when the
        damped posterior is not positive definite."""
        tau = float(tau)
        if not math.isfinite(tau):
            raise ValueError(f"tau must be finite, got {tau}.")
        if self.prior == "exact":
            denom = self.lam + tau
            lo = float(denom.min())
            if not lo > 1e-12 * max(1.0, float(denom.abs().max())):
                raise ValueError(
                    f"damped posterior kron(B, A) + tau I is not positive definite (smallest "
                    f"eigenvalue {lo:.3g} with tau = {tau:g}); B is singular (B 1 = 0), so tau "
                    f"must be > 0.")
            self._inv_denom = (1.0 / denom)  # (C, D+1)
        else:
            if tau <= 0:
                raise ValueError(f"damped posterior is not positive definite: the kron prior needs "
                                 f"tau > 0 (B is singular), got tau = {tau:g}.")
            N = self.n_data
            Uinv = math.sqrt(N) * self.B / N + math.sqrt(tau) * torch.eye(self.C).to(self.B)
            Vinv = math.sqrt(N) * self.A + math.sqrt(tau) * torch.eye(self.D1).to(self.A)
            (LU, info_u), (LV, info_v) = (torch.linalg.cholesky_ex(M) for M in (Uinv, Vinv))
            if int(info_u) or int(info_v):
                raise ValueError(f"damped Kronecker factors are not positive definite with tau = "
                                 f"{tau:g}; use a larger tau.")
            self.U = torch.cholesky_inverse(LU)
            self.V = torch.cholesky_inverse(LV)
            self.L = torch.linalg.cholesky(self.U)
        self.tau = tau
        return self

    def log_marginal_likelihood(self, tau: float | None = None) -> float:
        """laplace-torch's Laplace evidence (exact prior):
        ``log p(D|W) - 1/2 [sum log(lB lA + tau) - P log tau + tau ||W||^2]``,
        with ``log p(D|W) = sum_n log p_n[y_n]`` (needs labels in the factors)."""
        if self.prior != "exact":
            raise ValueError("the marginal likelihood is defined for prior='exact' only; the kron "
                             "prior's tau is chosen by optimize_tau_val.")
        ll = self.factors.log_lik
        if ll is None:
            raise ValueError("the factors were accumulated without labels, so log p(D|W) is "
                             "unknown; pass y to update/from_features.")
        tau = self.tau if tau is None else float(tau)
        logdet_post = torch.log(self.lam + tau).sum()
        scatter = tau * (self.W ** 2).sum()
        return float(ll.to(self.device) - 0.5 * (logdet_post - self.C * self.D1 * math.log(tau) + scatter))

    def optimize_tau_marglik(self, bounds: tuple[float, float] = (1e-10, 1e10)) -> float:
        """Maximise the log marginal likelihood over tau, in closed form from eigenvalues.

        d/dtau = 1/2 [P/tau - sum 1/(lam + tau) - ||W||^2] is decreasing in tau
        (lam >= 0), so the maximiser is its unique root, found by bisection in log tau.
        Eigenvalues below 0 (round-off of the singular B) are clamped to 0 here.
        """
        if self.prior != "exact":
            raise ValueError("prior='kron' is not an evidence-based prior; choose tau with "
                             "optimize_tau_val(phi_val, y_val).")
        lam = self.lam.clamp_min(0).reshape(-1)
        w2 = float((self.W ** 2).sum())
        P = lam.numel()

        def grad(t: float) -> float:
            return float(P / t - (1.0 / (lam + t)).sum()) - w2

        lo, hi = math.log(bounds[0]), math.log(bounds[1])
        if grad(math.exp(hi)) > 0:
            warnings.warn(f"marginal likelihood still increasing at tau = {bounds[1]:g} (||W|| ~ 0?);"
                          " using the upper bound.")
            return self.set_tau(bounds[1]).tau
        if grad(math.exp(lo)) < 0:
            warnings.warn(f"marginal likelihood decreasing already at tau = {bounds[0]:g}; using "
                          "the lower bound.")
            return self.set_tau(bounds[0]).tau
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if grad(math.exp(mid)) > 0 else (lo, mid)
            if hi - lo < 1e-13:
                break
        return self.set_tau(math.exp(0.5 * (lo + hi))).tau

    def optimize_tau_val(self, phi_val: torch.Tensor, y_val: torch.Tensor,
                         grid: Sequence[float] | torch.Tensor | None = None, *,
                         link: str = "auto", n_samples: int = 100, seed: int = 0) -> float:
        """Choose tau minimising the validation NLL over ``grid`` (default 10^-4..10^4,
        33 points); every grid point uses the same random numbers.  Sets and returns
        tau; ``self.val_nll`` keeps ``[(tau, nll), ...]``."""
        if grid is None:
            grid = torch.logspace(-4, 4, 33, dtype=_MATH)
        grid = [float(t) for t in (grid.reshape(-1) if isinstance(grid, torch.Tensor) else grid)]
        if not grid:
            raise ValueError("grid is empty: give at least one tau value.")
        y_val = self._val_labels(phi_val, y_val)
        results = []
        for t in grid:
            try:
                self.set_tau(t)
            except ValueError:
                results.append((t, math.inf))
                continue
            gen = torch.Generator(device=self.device).manual_seed(seed)
            p = self.predict(phi_val, link=link, n_samples=n_samples, generator=gen).probs
            results.append((t, _nll(p, y_val)))
        best, best_nll = min(results, key=lambda r: r[1])
        if not math.isfinite(best_nll):
            raise ValueError("no tau in the grid gives a positive-definite posterior; use "
                             "larger values.")
        self.val_nll = results
        return self.set_tau(best).tau

    def set_meronen(self, var0: float, temperature: float) -> "ExitLaplace":
        """Make this kron posterior Meronen et al.'s: ``tau = 1/var0`` and logits divided
        by ``temperature`` in every predictive; ``predict``'s "auto" becomes their
        shared-draw Monte Carlo ("mc_shared") with MERONEN_SAMPLES draws."""
        if self.prior != "kron":
            raise ValueError("Meronen et al.'s recipe is the kron form: build the ExitLaplace "
                             "with prior='kron' (or fit_exit_laplace(..., prior='meronen')).")
        var0, temperature = float(var0), float(temperature)
        if not (var0 > 0 and math.isfinite(var0) and temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"var0 and temperature must be positive and finite, got {var0}, {temperature}.")
        self.set_tau(1.0 / var0)
        self.recipe, self.temperature, self.var0 = "meronen", temperature, var0
        return self

    def optimize_meronen_val(self, phi_val: torch.Tensor, y_val: torch.Tensor,
                             var0_grid: Sequence[float] = MERONEN_VAR0_GRID,
                             temp_grid: Sequence[float] = MERONEN_TEMP_GRID, *,
                             n_samples: int = MERONEN_SAMPLES, seed: int = 0) -> tuple[float, float]:
        """Choose ``(var0, T)`` jointly, minimising the validation NLL of the shared-draw MC
        predictive over ``var0_grid`` x ``temp_grid`` (every pair with the same draws,
        seeded ``seed``; ties go to the first pair, temperature-major as their loop).
        Sets the recipe (:meth:`set_meronen`) and returns the pair;
        ``self.val_nll_grid`` keeps ``[(var0, T, nll), ...]``."""
        var0_grid, temp_grid = [float(v) for v in var0_grid], [float(t) for t in temp_grid]
        if not var0_grid or not temp_grid:
            raise ValueError("var0_grid and temp_grid need at least one value each.")
        y_val = self._val_labels(phi_val, y_val)
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}.")
        gen = torch.Generator(device=self.device).manual_seed(seed)
        # the draws predict(..., generator seeded `seed`) makes
        shared = torch.randn(self.C, n_samples, 1, dtype=torch.float32, device=self.device,
                             generator=gen)
        # U and V for every var0 from one eigendecomposition of B and of A (set_tau's
        # Cholesky inverses cost ~1 s each at D = 768): V = Q_A diag(1/(sqrt(N) lA + r)) Q_A^T
        # with r = sqrt(1/var0), so phi~^T V phi~ = sum_j (q_Aj^T phi~)^2 / (sqrt(N) lA_j + r)
        rN = math.sqrt(self.n_data)
        lam_B, Q_B = torch.linalg.eigh(self.B)
        lam_A, Q_A = torch.linalg.eigh(self.A)
        pt = self._prep(phi_val)
        mu, proj2 = pt @ self.W.T, (pt @ Q_A) ** 2
        nll = {}
        for var0 in var0_grid:
            r = math.sqrt(1.0 / var0)
            if not (float((rN * lam_A).min()) + r > 0 and float((rN * lam_B / self.n_data).min()) + r > 0):
                raise ValueError(f"damped Kronecker factors are not positive definite with var0 = {var0:g}.")
            sc = proj2 @ (1.0 / (rN * lam_A + r))
            chol_U = torch.linalg.cholesky((Q_B / (rN * lam_B / self.n_data + r)) @ Q_B.T)
            for t in temp_grid:
                p = self._mc(mu / t, sc / t ** 2, shared.dtype, n_samples, shared=shared, chol_U=chol_U)
                nll[(var0, t)] = _nll(p, y_val)
        order = [(v, t) for t in temp_grid for v in var0_grid]
        best = min(order, key=lambda k: nll[k])
        self.val_nll_grid = [(v, t, nll[(v, t)]) for v, t in order]
        self.set_meronen(*best)
        return best

    # ---------------------------------------------------------------- moments
    def _require_tau(self) -> None:
        if self.tau is None:
            raise ValueError("tau is not set: pass tau=..., or call optimize_tau_val(phi_val, "
                             "y_val) (kron prior) / optimize_tau_marglik() (exact prior).")

    def _val_labels(self, phi_val: torch.Tensor, y_val: torch.Tensor) -> torch.Tensor:
        """``y_val`` as labels (n,) on the device, checked to be one per validation instance."""
        y_val = torch.as_tensor(y_val).long().reshape(-1).to(self.device)
        if phi_val.shape[0] == 0 or phi_val.shape[0] != y_val.shape[0]:
            raise ValueError(f"need a non-empty validation set with one label per instance, got "
                             f"{phi_val.shape[0]} instances and {y_val.shape[0]} labels.")
        return y_val

    def _features(self, phi: torch.Tensor) -> torch.Tensor:
        """``phi`` as a tensor, checked to be raw exit features (n, D) with n > 0."""
        phi = torch.as_tensor(phi)
        _check_width(phi, self.D1 - 1)
        if phi.shape[0] == 0:
            raise ValueError("no instances: phi is empty; pass at least one feature row.")
        return phi

    def _prep(self, phi: torch.Tensor) -> torch.Tensor:
        return phi_tilde(self._features(phi).detach().to(self.device, _MATH))

    def _scale(self, pt: torch.Tensor) -> torch.Tensor:
        """Exact: s (n, C) in the B eigenbasis.  Kron: v = phi~^T V phi~ (n,)."""
        if self.prior == "exact":
            proj = pt @ self.Q_A
            return (proj * proj) @ self._inv_denom.T
        return ((pt @ self.V) * pt).sum(-1)

    def _cov_from_scale(self, sc: torch.Tensor) -> torch.Tensor:
        if self.prior == "exact":
            return (self.Q_B * sc[:, None, :]) @ self.Q_B.T
        return sc[:, None, None] * self.U

    def _diff_var(self, sc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Variance of z_a - z_b per instance (a, b index tensors (n,))."""
        if self.prior == "exact":
            dq = self.Q_B[a] - self.Q_B[b]            # (n, C): rows of Q_B
            return (dq * dq * sc).sum(-1)
        return sc * (self.U[a, a] + self.U[b, b] - 2 * self.U[a, b])

    def logit_mean_cov(self, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (n, C) and covariance (n, C, C) of the exit logits at raw features phi (float64)."""
        self._require_tau()
        pt = self._prep(phi)
        return pt @ self.W.T, self._cov_from_scale(self._scale(pt))

    def _noise(self, sc: torch.Tensor, n_samples: int, generator: torch.Generator | None,
               shared: torch.Tensor | None = None, chol_U: torch.Tensor | None = None) -> torch.Tensor:
        """Zero-mean logit noise, class-first (C, S, n), in sc's dtype; ``shared`` (C, S, 1):
        the same standard-normal draws for every instance (Meronen et al.'s MC); ``chol_U``
        in place of the kron form's ``L``.

        Class-first keeps the small class axis outermost: the softmax over it is
        ~30x faster than over a trailing axis of size C on CPU."""
        C, n = self.C, sc.shape[0]
        if shared is not None and self.prior == "kron":
            L = (self.L if chol_U is None else chol_U).to(sc.dtype)
            return (L @ shared[:, :, 0].to(sc.dtype))[:, :, None] * sc.sqrt()[None, None, :]
        g = (torch.randn(C, n_samples, n, dtype=sc.dtype, device=self.device, generator=generator)
             if shared is None else shared.to(sc.dtype).expand(C, n_samples, n))
        if self.prior == "exact":
            scaled = (sc.sqrt().T[:, None, :] * g).reshape(C, n_samples * n)
            return (self.Q_B.to(sc.dtype) @ scaled).reshape(C, n_samples, n)
        noise = (self.L.to(sc.dtype) @ g.reshape(C, n_samples * n)).reshape(C, n_samples, n)
        return noise * sc.sqrt()[None, None, :]

    def _mc(self, mu: torch.Tensor, sc: torch.Tensor, dtype: torch.dtype, n_samples: int,
            generator: torch.Generator | None = None, shared: torch.Tensor | None = None,
            chol_U: torch.Tensor | None = None) -> torch.Tensor:
        """``mean_s softmax(mu + noise_s)`` (n, C) float64 over ``n_samples`` draws made in
        ``dtype`` (:meth:`_noise`: with ``generator``, or ``shared`` by every instance)."""
        z = mu.T.to(dtype)[:, None, :] + self._noise(sc.to(dtype), n_samples, generator, shared, chol_U)
        return torch.softmax(z, 0).mean(1, dtype=_MATH).T

    def sample_logits(self, phi: torch.Tensor, n_samples: int = 100,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Samples (n_samples, n, C) of the exit logits: exact ``W phi~ + Q_B (sqrt(s) * g)``,
        kron ``W phi~ + (phi~^T V phi~)^(1/2) L g``; float64."""
        self._require_tau()
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}.")
        pt = self._prep(phi)
        mu = pt @ self.W.T
        z = mu.T[:, None, :] + self._noise(self._scale(pt), n_samples, generator)
        return z.permute(1, 2, 0)

    # ---------------------------------------------------------------- predictive
    def predict(self, phi: torch.Tensor, link: str = "auto", n_samples: int | None = None,
                generator: torch.Generator | None = None, chunk_size: int = 4096,
                mc_dtype: torch.dtype = torch.float32) -> LaplacePrediction:
        """Laplace predictive at raw exit features ``phi`` (n, D).

        link "auto": probit on the logit difference for C = 2, MC for C > 2; under
        Meronen et al.'s recipe (:meth:`set_meronen`) their "mc_shared".
        ``n_samples`` None: 100, or MERONEN_SAMPLES under their recipe.
        "mc_shared": ``n_samples`` standard-normal C-vectors drawn once and shared by
        every instance (as their code does), the softmax taken over all C logits.
        A temperature set by the recipe divides the logits' mean and standard deviation
        in every link; ``variance`` stays the posterior's (untempered).
        "probit" for C > 2 is laplace-torch's per-logit probit
        ``softmax(mu / sqrt(1 + pi diag(Sigma) / 8))``.  "mc": ``n_samples`` draws,
        batched over instances (``chunk_size``), vectorised over samples; without a
        generator a fresh one seeded 0 is used (reproducible).  MC draws are made in
        ``mc_dtype`` (float32 by default: ~6x faster, and its rounding is orders of
        magnitude below the MC noise); for C = 2 only the logit difference
        ``d ~ N(mu_d, sigma_d^2)`` is drawn (the softmax of two logits is sigmoid(d)).
        Means, covariances and the probit stay float64.  Outputs in phi's dtype.
        """
        self._require_tau()
        if link not in _LINKS:
            raise ValueError(f"link must be one of {_LINKS}, got {link!r}.")
        meronen = self.recipe == "meronen"
        if link == "auto":
            link = "mc_shared" if meronen else ("probit" if self.C == 2 else "mc")
        if n_samples is None:
            n_samples = MERONEN_SAMPLES if meronen else 100
        temp = self.temperature if meronen else 1.0
        phi = self._features(phi)
        out_dtype = phi.dtype if phi.is_floating_point() else torch.float32
        shared = None
        if link in ("mc", "mc_shared"):
            if n_samples < 1:
                raise ValueError(f"n_samples must be >= 1, got {n_samples}.")
            if generator is None:
                generator = torch.Generator(device=self.device).manual_seed(0)
            # keep each chunk's (S, n, C) sample block near 2^20 numbers (cache-friendly)
            chunk_size = max(1, min(chunk_size, (1 << 20) // (n_samples * self.C)))
            if link == "mc_shared":
                shared = torch.randn(self.C, n_samples, 1, dtype=mc_dtype, device=self.device,
                                     generator=generator)
        parts = []
        for i in range(0, phi.shape[0], chunk_size):
            pt = self._prep(phi[i:i + chunk_size])
            mu = pt @ self.W.T
            sc = self._scale(pt)
            top = mu.topk(2, dim=-1).indices
            var = self._diff_var(sc, top[:, 0], top[:, 1])
            if temp != 1.0:
                mu, sc = mu / temp, sc / temp ** 2
            if link == "mc_shared" or (link == "mc" and self.C > 2):
                probs = self._mc(mu, sc, mc_dtype, n_samples, generator, shared)
            elif self.C == 2:
                # z_1 - z_0 carries all of it: top-2 MAP classes are {0, 1}, so var is var_d
                mu_d = mu[:, 1] - mu[:, 0]
                if link == "probit":
                    p1 = probit_two_class(mu_d, var / temp ** 2)
                else:
                    g = torch.randn(n_samples, mu_d.shape[0], dtype=mc_dtype, device=self.device,
                                    generator=generator)
                    d = mu_d.to(mc_dtype) + (var.sqrt() / temp).to(mc_dtype) * g
                    p1 = torch.sigmoid(d).mean(0, dtype=_MATH)
                probs = torch.stack([1 - p1, p1], -1)
            else:  # probit, C > 2
                diag = self._cov_from_scale(sc).diagonal(dim1=-2, dim2=-1)
                probs = torch.softmax(mu / torch.sqrt(1 + math.pi / 8 * diag), -1)
            parts.append((probs, var))
        probs, var = (torch.cat(t) for t in zip(*parts))
        top2 = probs.topk(2, dim=-1).values
        entropy = -(probs * torch.log(probs.clamp_min(1e-300))).sum(-1)
        return LaplacePrediction(*(t.to(out_dtype) for t in (probs, top2[:, 0] - top2[:, 1], entropy, var)))

    def __repr__(self) -> str:
        tau = "unset" if self.tau is None else f"{self.tau:.4g}"
        extra = f", recipe='meronen', T={self.temperature:g}" if self.recipe == "meronen" else ""
        return (f"ExitLaplace(prior={self.prior!r}, C={self.C}, D={self.D1 - 1}, N={self.n_data}, "
                f"tau={tau}{extra})")


def fit_exit_laplace(head: nn.Module, phi: torch.Tensor, probs: torch.Tensor | None = None, *,
                     y: torch.Tensor | None = None, prior: str = "exact", tau: float | None = None,
                     phi_val: torch.Tensor | None = None, y_val: torch.Tensor | None = None,
                     grid: Sequence[float] | None = None, n_train: int | None = None) -> ExitLaplace:
    """Fit the exit Laplace of ``head`` (ExitHead) on training features ``phi`` (N, D).

    ``probs=None`` -> the head's own softmax.  Exact prior: tau by marginal likelihood
    unless given.  Kron prior: tau given, or chosen on ``(phi_val, y_val)`` over ``grid``.
    ``prior="meronen"``: the kron form with ``(var0, T)`` chosen jointly on
    ``(phi_val, y_val)`` (:meth:`ExitLaplace.optimize_meronen_val`; ``grid`` =
    ``(var0_grid, temp_grid)``, default theirs); its ``predict`` applies ``T`` and
    the shared-draw MC-50 by default.
    """
    W = _head_weight(head)
    phi = torch.as_tensor(phi)
    _check_width(phi, W.shape[1] - 1)
    if probs is None:
        with torch.no_grad():
            probs = torch.softmax(phi_tilde(phi.to(W.device, _MATH)) @ W.to(_MATH).T, -1)
    factors = KronFactors.from_features(phi.to(W.device), probs.to(W.device), y, n_train=n_train)
    return posterior_from_factors(W, factors, prior=prior, tau=tau, phi_val=phi_val, y_val=y_val,
                                  grid=grid)


def posterior_from_factors(weight: torch.Tensor, factors: KronFactors, *, prior: str = "exact",
                           tau: float | None = None, phi_val: torch.Tensor | None = None,
                           y_val: torch.Tensor | None = None,
                           grid: Sequence[float] | None = None) -> ExitLaplace:
    """The exit Laplace of the head weight ``weight`` (C, D+1) from accumulated
    ``factors``, each prior's parameter chosen as :func:`fit_exit_laplace` does (which
    calls this once it has the factors): exact, tau by marginal likelihood unless given;
    kron, tau given or by validation NLL over ``grid``; ``"meronen"``, the kron form with
    ``(var0, T)`` chosen jointly on ``(phi_val, y_val)``. Laplace-KD's refits
    (``laplace_source.LaplaceSource``) call it with the factors they accumulated in training."""
    if prior == "meronen":
        if tau is not None:
            raise ValueError("prior='meronen' chooses tau = 1/var0 on validation data; to fix it, "
                             "use prior='kron' with tau=... and ExitLaplace.set_meronen(var0, T).")
        if phi_val is None or y_val is None:
            raise ValueError("prior='meronen' chooses var0 and the temperature on validation "
                             "data: pass phi_val=... and y_val=....")
        la = ExitLaplace(weight, factors, prior="kron", tau=1.0)
        la.optimize_meronen_val(phi_val, y_val, *(grid or ()))
        return la
    if prior == "kron" and tau is None:
        if phi_val is None or y_val is None:
            raise ValueError("prior='kron' needs tau=... or validation data (phi_val, y_val) to "
                             "choose tau by NLL.")
        la = ExitLaplace(weight, factors, prior="kron", tau=None)
        la.optimize_tau_val(phi_val, y_val, grid)
        return la
    return ExitLaplace(weight, factors, prior=prior, tau=tau)


def fit_on_subset(head: nn.Module, phi: torch.Tensor, probs: torch.Tensor | None, idx, *,
                  y: torch.Tensor | None = None, **kwargs) -> ExitLaplace:
    """:func:`fit_exit_laplace` on exactly the training instances ``idx`` (distinct
    indices into ``phi``): the factors are those of ``phi[idx]`` and ``probs[idx]`` and
    stand for ``N = len(idx)`` instances. ``kwargs`` go to :func:`fit_exit_laplace`
    (prior, tau, phi_val, y_val, grid)."""
    phi = torch.as_tensor(phi)
    idx = torch.as_tensor(idx)
    if idx.ndim != 1 or idx.numel() == 0 or idx.is_floating_point() or idx.dtype == torch.bool:
        raise ValueError("idx must be a non-empty 1-d tensor of integer instance indices "
                         "(for a mask m pass m.nonzero().flatten()).")
    if int(idx.min()) < 0 or int(idx.max()) >= phi.shape[0] or len(idx.unique()) != len(idx):
        raise ValueError(f"idx must hold distinct indices in [0, {phi.shape[0]}) (the rows of phi).")

    def take(t):
        return None if t is None else torch.as_tensor(t)[idx.to(torch.as_tensor(t).device)]

    return fit_exit_laplace(head, take(phi), take(probs), y=take(y), **kwargs)
