"""The exit Laplace (fairkd_utils.exit_laplace) against laplace-torch 0.3 and closed forms.

Weight flattening: row-major ``vec(W)[c*(D+1) + j] = W[c, j]`` (torch's
``parameters_to_vector``), so the GGN is ``kron(B, A)`` and the head Jacobian at
``phi~`` is ``J = kron(I_C, phi~^T)`` (C x C(D+1)).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fairkd_utils.exit_laplace import (ExitLaplace, LaplacePrediction, fit_exit_laplace, phi_tilde,
                                       probit_two_class)
from fairkd_utils.kron_factors import KronFactors
from fairkd_utils.models import ExitHead

laplace = pytest.importorskip("laplace")

torch.set_num_threads(1)
DT = torch.float64


class AppendOne(nn.Module):
    def forward(self, x):
        return phi_tilde(x)


def make_problem(C: int, D: int = 6, N: int = 300, seed: int = 0):
    """Random float64 features, a head with non-trivial weights, labels drawn from it."""
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(N, D, generator=g, dtype=DT)
    model = nn.Sequential(AppendOne(), nn.Linear(D + 1, C, bias=False)).to(DT)
    with torch.no_grad():
        model[1].weight.copy_(0.8 * torch.randn(C, D + 1, generator=g, dtype=DT))
        probs = torch.softmax(model(phi), -1)
    y = torch.multinomial(probs, 1, generator=g).squeeze(1)
    return phi, y, model, probs


def factors_from(B, A, n: int) -> KronFactors:
    """Factors given directly (B summed, A averaged over ``n`` instances, laplace-torch's
    ``la.H_facs.kfacs[0]``), through the checkpoint round trip ``KronFactors.from_state``."""
    B, A = (torch.as_tensor(M).detach().to(torch.float64) for M in (B, A))
    return KronFactors.from_state({"n": n, "n_train": None, "labelled": False, "B_sum": B.clone(),
                                   "A_sum": A * n, "log_lik": torch.zeros((), dtype=torch.float64)})


def fit_laplace_torch(model, phi, y, batch_size=64):
    la = laplace.Laplace(model, "classification", subset_of_weights="last_layer",
                         hessian_structure="kron", last_layer_name="1")
    la.fit(DataLoader(TensorDataset(phi, y), batch_size=batch_size))
    return la


@pytest.fixture(scope="module", params=[2, 10], ids=["C2", "C10"])
def problem(request):
    C = request.param
    phi, y, model, probs = make_problem(C, D=6 if C == 2 else 8)
    la = fit_laplace_torch(model, phi, y)
    return dict(C=C, phi=phi, y=y, model=model, probs=probs, la=la,
                W=model[1].weight.detach())


def test_factors_equal_laplace_torch_kfacs(problem):
    """B (summed, from the model's own probabilities) and A (averaged) are laplace-torch's."""
    B_lt, A_lt = problem["la"].H_facs.kfacs[0]
    f = KronFactors.from_features(problem["phi"], problem["probs"], problem["y"], batch_size=37)
    C, D1 = problem["C"], problem["phi"].shape[1] + 1
    assert B_lt.shape == (C, C) and A_lt.shape == (D1, D1)
    torch.testing.assert_close(f.B, B_lt, rtol=0, atol=1e-10)
    torch.testing.assert_close(f.A, A_lt, rtol=0, atol=1e-12)
    # labels enter only the log-likelihood (GGN, not empirical Fisher)
    assert math.isclose(float(f.log_lik), -float(problem["la"].loss), rel_tol=1e-12)
    other_y = (problem["y"] + 1) % C
    la2 = fit_laplace_torch(problem["model"], problem["phi"], other_y)
    torch.testing.assert_close(la2.H_facs.kfacs[0][0], B_lt, rtol=0, atol=1e-10)


def test_batchwise_accumulation_equals_one_pass_and_rescales_for_partial_epochs():
    phi, y, model, probs = make_problem(3, N=120)
    whole = KronFactors.from_features(phi, probs, y)
    acc = KronFactors()
    for i in range(0, 120, 25):
        acc.update(phi_tilde(phi[i:i + 25]), probs[i:i + 25], y[i:i + 25])
    torch.testing.assert_close(acc.B, whole.B)
    torch.testing.assert_close(acc.A, whole.A)
    assert acc.n == 120 and acc.n_data == 120
    half = KronFactors(n_train=120).update(phi_tilde(phi[:60]), probs[:60], y[:60])
    ref = KronFactors.from_features(phi[:60], probs[:60], y[:60])
    torch.testing.assert_close(half.B, 2 * ref.B)          # B summed: scaled N_train / n_seen
    torch.testing.assert_close(half.A, ref.A)              # A averaged: unchanged
    torch.testing.assert_close(half.log_lik, 2 * ref.log_lik)
    assert half.n == 60 and half.n_data == 120


def test_exact_predictive_covariance_matches_laplace_torch_f_var(problem):
    la, phi = problem["la"], problem["phi"]
    tau = 0.7
    la.prior_precision = tau
    f_mu, f_var = la._glm_predictive_distribution(phi[:100])
    ours = ExitLaplace(problem["W"], factors_from(*la.H_facs.kfacs[0], n=phi.shape[0]),
                       tau=tau)
    mu, cov = ours.logit_mean_cov(phi[:100])
    assert cov.dtype == DT and cov.shape == f_var.shape
    assert (mu - f_mu).abs().max() < 1e-10
    assert (cov - f_var).abs().max() < 1e-8
    # and from our own factors, not laplace-torch's
    ours2 = ExitLaplace(problem["W"], KronFactors.from_features(phi, problem["probs"]), tau=tau)
    assert (ours2.logit_mean_cov(phi[:100])[1] - f_var).abs().max() < 1e-8


def test_marglik_tau_agrees_with_laplace_torch(problem):
    la, phi = problem["la"], problem["phi"]
    f = KronFactors.from_features(phi, problem["probs"], problem["y"])
    ours = ExitLaplace(problem["W"], f)               # tau by marginal likelihood by default
    for tau in (0.05, 1.0, 20.0):                     # the objective itself, exactly
        lml = la.log_marginal_likelihood(torch.tensor([tau], dtype=DT))
        assert math.isclose(ours.log_marginal_likelihood(tau), float(lml), rel_tol=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la.optimize_prior_precision(method="marglik", n_steps=600, lr=0.1)
    tau_lt = float(la.prior_precision)
    # laplace-torch runs Adam on log tau: agree to its optimiser's precision
    assert abs(math.log(ours.tau) - math.log(tau_lt)) < 1e-3, (ours.tau, tau_lt)
    assert ours.log_marginal_likelihood() >= float(la.log_marginal_likelihood()) - 1e-9


def test_exact_form_equals_dense_posterior_covariance():
    phi, y, model, probs = make_problem(3, D=4, N=50)
    la = ExitLaplace(model[1].weight, KronFactors.from_features(phi, probs), tau=0.3)
    P = torch.kron(la.B, la.A) + 0.3 * torch.eye(3 * 5, dtype=DT)
    Sigma = torch.linalg.inv(P)
    pt = phi_tilde(phi[:7])
    J = torch.stack([torch.kron(torch.eye(3, dtype=DT), x[None]) for x in pt])  # (n, C, C(D+1))
    dense = J @ Sigma @ J.transpose(1, 2)
    torch.testing.assert_close(la.logit_mean_cov(phi[:7])[1], dense, rtol=1e-10, atol=1e-12)


def test_kron_form_covariance_equals_dense_jacobian_form():
    phi, y, model, probs = make_problem(4, D=5, N=80)
    la = ExitLaplace(model[1].weight, KronFactors.from_features(phi, probs), prior="kron", tau=2.0)
    N = 80
    U = torch.linalg.inv(math.sqrt(N) * la.B / N + math.sqrt(2.0) * torch.eye(4, dtype=DT))
    V = torch.linalg.inv(math.sqrt(N) * la.A + math.sqrt(2.0) * torch.eye(6, dtype=DT))
    pt = phi_tilde(phi[:9])
    J = torch.stack([torch.kron(torch.eye(4, dtype=DT), x[None]) for x in pt])
    dense = J @ torch.kron(U, V) @ J.transpose(1, 2)
    torch.testing.assert_close(la.logit_mean_cov(phi[:9])[1], dense, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("prior", ["exact", "kron"])
def test_sample_mean_and_covariance_converge_to_closed_forms(prior):
    phi, y, model, probs = make_problem(3, D=4, N=60, seed=1)
    la = ExitLaplace(model[1].weight, KronFactors.from_features(phi, probs), prior=prior, tau=0.5)
    S = 40_000
    x = phi[:2]
    z = la.sample_logits(x, S, generator=torch.Generator().manual_seed(3))
    assert z.shape == (S, 2, 3)
    mu, cov = la.logit_mean_cov(x)
    d = torch.diagonal(cov, dim1=-2, dim2=-1)
    se_mean = (d / S).sqrt()
    assert ((z.mean(0) - mu).abs() <= 3 * se_mean).all()
    zc = z - z.mean(0)
    cov_hat = torch.einsum("sni,snj->nij", zc, zc) / (S - 1)
    se_cov = ((d[:, :, None] * d[:, None, :] + cov ** 2) / S).sqrt()   # Gaussian sampling s.e.
    assert ((cov_hat - cov).abs() <= 3 * se_cov).all()


def test_two_class_probit_is_the_formula_and_close_to_the_true_integral():
    phi, y, model, probs = make_problem(2, D=5, N=40, seed=2)
    la = ExitLaplace(model[1].weight, KronFactors.from_features(phi, probs), tau=0.05)
    x = torch.cat([phi[:20], 3 * torch.randn(5, 5, dtype=DT)])        # some atypical inputs
    pred = la.predict(x)                                                # auto -> probit
    mu, cov = la.logit_mean_cov(x)
    mu_d = mu[:, 1] - mu[:, 0]
    var_d = cov[:, 1, 1] + cov[:, 0, 0] - 2 * cov[:, 0, 1]
    p1 = torch.sigmoid(mu_d / torch.sqrt(1 + math.pi * var_d / 8))
    torch.testing.assert_close(pred.probs[:, 1], p1, rtol=0, atol=1e-12)
    torch.testing.assert_close(pred.probs.sum(-1), torch.ones(25, dtype=DT))
    torch.testing.assert_close(pred.variance, var_d, rtol=1e-12, atol=1e-14)
    chunked = la.predict(x, chunk_size=7)                              # chunking is invisible (up to BLAS round-off)
    torch.testing.assert_close(chunked.probs, pred.probs, rtol=0, atol=1e-14)
    assert var_d.max() > 1.0                                            # the test has teeth
    # E[sigmoid(d)], d ~ N(mu_d, var_d), by the trapezoid rule on a fine grid
    t = torch.linspace(-10, 10, 20001, dtype=DT)
    dens = torch.exp(-0.5 * t ** 2) / math.sqrt(2 * math.pi)
    vals = torch.sigmoid(mu_d[:, None] + var_d.sqrt()[:, None] * t[None]) * dens
    exact = torch.trapezoid(vals, t, dim=-1)
    assert (pred.probs[:, 1] - exact).abs().max() < 0.02
    # MC converges to the true integral, not to the probit
    mc = la.predict(x, link="mc", n_samples=20000, generator=torch.Generator().manual_seed(0))
    assert (mc.probs[:, 1] - exact).abs().max() < 4 * 0.5 / math.sqrt(20000)


def test_probit_two_class_function():
    assert math.isclose(float(probit_two_class(torch.tensor(2.0, dtype=DT), torch.tensor(0.0, dtype=DT))),
                        1 / (1 + math.exp(-2)))
    assert float(probit_two_class(torch.tensor(0.0), torch.tensor(9.0))) == 0.5


def test_multiclass_prediction_outputs():
    phi, y, model, probs = make_problem(10, D=8, N=200, seed=4)
    la = ExitLaplace(model[1].weight, KronFactors.from_features(phi, probs))
    x = phi[:50]
    pred = la.predict(x, n_samples=200, generator=torch.Generator().manual_seed(0))
    assert isinstance(pred, LaplacePrediction)
    assert pred.probs.shape == (50, 10) and pred.margin.shape == (50,)
    torch.testing.assert_close(pred.probs.sum(-1), torch.ones(50, dtype=DT))
    top2 = pred.probs.topk(2, -1).values
    torch.testing.assert_close(pred.margin, top2[:, 0] - top2[:, 1])
    torch.testing.assert_close(pred.entropy, -(pred.probs * pred.probs.log()).sum(-1))
    mu, cov = la.logit_mean_cov(x)
    a, b = mu.topk(2, -1).indices.unbind(-1)
    r = torch.arange(50)
    torch.testing.assert_close(pred.variance, cov[r, a, a] + cov[r, b, b] - 2 * cov[r, a, b])
    # same generator seed -> the same answer, bit for bit
    again = la.predict(x, n_samples=200, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(pred.probs, again.probs, rtol=0, atol=0)
    # float32 features in -> float32 out
    assert la.predict(x.float()).probs.dtype == torch.float32


def test_mc_predictive_matches_laplace_torch_up_to_mc_noise(problem):
    if problem["C"] == 2:
        pytest.skip("C=2 is covered by the probit/integral test")
    la_lt, phi = problem["la"], problem["phi"]
    la_lt.prior_precision = 1.0
    x = phi[:200]
    S = 2000
    p_lt = la_lt(x, pred_type="glm", link_approx="mc", n_samples=S,
                 generator=torch.Generator().manual_seed(1))
    ours = ExitLaplace(problem["W"], KronFactors.from_features(phi, problem["probs"]), tau=1.0)
    p = ours.predict(x, link="mc", n_samples=S, generator=torch.Generator().manual_seed(2)).probs
    # each probability is a mean of S draws in [0, 1]: s.e. <= 0.5/sqrt(S), two estimates
    assert (p - p_lt).abs().max() < 4 * math.sqrt(2) * 0.5 / math.sqrt(S)


def test_kron_tau_by_validation_nll_is_our_own_grid_loop():
    phi, y, model, probs = make_problem(2, D=5, N=200, seed=5)
    pv, yv = phi[150:], y[150:]
    la = ExitLaplace(model[1].weight, KronFactors.from_features(phi[:150], probs[:150]),
                     prior="kron")
    grid = [0.01, 0.1, 1.0, 10.0, 100.0]
    tau = la.optimize_tau_val(pv, yv, grid)
    nll = []
    for t in grid:
        fresh = ExitLaplace(model[1].weight, la.factors, prior="kron", tau=t)
        p = fresh.predict(pv).probs
        nll.append(float(-torch.log(p[torch.arange(len(yv)), yv]).mean()))
    assert tau == grid[min(range(5), key=nll.__getitem__)]
    assert [round(v, 12) for _, v in la.val_nll] == [round(v, 12) for v in nll]


def test_fit_exit_laplace_from_an_exit_head():
    phi, y, model, probs = make_problem(3, D=6, N=100, seed=6)
    head = ExitHead(6, 3).to(DT)
    head.linear.weight.data.copy_(model[1].weight.data)
    la = fit_exit_laplace(head, phi, y=y)
    ref = ExitLaplace(model[1].weight, KronFactors.from_features(phi, probs, y))
    assert math.isclose(la.tau, ref.tau, rel_tol=1e-12)
    kr = fit_exit_laplace(head, phi[:80], y=y[:80], prior="kron", phi_val=phi[80:],
                          y_val=y[80:], grid=[0.1, 1.0, 10.0])
    assert kr.tau in (0.1, 1.0, 10.0)


# --------------------------------------------------------------------------- bad input
def test_zero_instances_are_clear_errors():
    head = ExitHead(4, 2).to(DT)
    with pytest.raises(ValueError, match="empty"):
        ExitLaplace(torch.zeros(2, 5), KronFactors())
    with pytest.raises(ValueError, match="no instances"):
        fit_exit_laplace(head, torch.zeros(0, 4))


def test_feature_width_mismatch_names_expected_and_got():
    phi, y, model, probs = make_problem(2, D=5, N=40)
    la = ExitLaplace(model[1].weight, KronFactors.from_features(phi, probs), tau=1.0)
    with pytest.raises(ValueError, match=r"expected D = 5 .* got 7"):
        la.predict(torch.randn(3, 7, dtype=DT))
    with pytest.raises(ValueError, match="looks like phi_tilde"):
        la.logit_mean_cov(phi_tilde(phi[:3]))
    with pytest.raises(ValueError, match=r"expected D = 4 .* got 5"):
        fit_exit_laplace(ExitHead(4, 2), phi)
    with pytest.raises(ValueError, match="last column all ones"):
        KronFactors().update(phi[:3], probs[:3])
    with pytest.raises(ValueError, match="do not match the head"):
        ExitLaplace(torch.zeros(2, 9, dtype=DT), KronFactors.from_features(phi, probs))


def test_non_positive_definite_posterior_is_a_clear_error():
    phi, y, model, probs = make_problem(3, D=4, N=40)
    f = KronFactors.from_features(phi, probs)
    W = model[1].weight
    for tau in (-0.5, 0.0):              # B 1 = 0, so tau = 0 is singular too
        with pytest.raises(ValueError, match="not positive definite"):
            ExitLaplace(W, f, tau=tau)
        with pytest.raises(ValueError, match="not positive definite"):
            ExitLaplace(W, f, prior="kron", tau=tau)
    bad = factors_from(f.B * float("nan"), f.A, n=40)
    with pytest.raises(ValueError, match="not positive definite"):
        ExitLaplace(W, bad, tau=1.0)
    with pytest.raises(ValueError, match="NaN"):
        KronFactors().update(phi_tilde(phi[:2]), torch.full((2, 3), float("nan"), dtype=DT))
    with pytest.raises(ValueError, match="tau is not set"):
        ExitLaplace(W, f, prior="kron").predict(phi[:2])


# --------------------------------------------------------------------------- Meronen et al.'s recipe
from fairkd_utils.exit_laplace import (MERONEN_SAMPLES, MERONEN_TEMP_GRID,  # noqa: E402
                                       MERONEN_VAR0_GRID, fit_on_subset)


def _meronen_problem(C=3, seed=7):
    phi, y, model, probs = make_problem(C, D=4, N=90, seed=seed)
    head = ExitHead(4, C).to(DT)
    head.linear.weight.data.copy_(model[1].weight.data)
    la = fit_exit_laplace(head, phi[:60], probs[:60], y=y[:60], prior="meronen",
                          phi_val=phi[60:], y_val=y[60:])
    return phi, y, model, probs, la


def test_meronen_posterior_and_predictive_equal_a_dense_computation_of_their_formula():
    phi, y, model, probs, la = _meronen_problem()
    C, D1, N = 3, 5, 60
    assert la.prior == "kron" and la.recipe == "meronen" and la.n_data == N
    assert la.var0 in MERONEN_VAR0_GRID and la.temperature in MERONEN_TEMP_GRID
    # factors by hand, then their damped factors sqrt(N) * mean + sqrt(1/var0) I
    pt, p = phi_tilde(phi[:60]), probs[:60]
    B = sum(torch.diag(q) - torch.outer(q, q) for q in p)
    A = sum(torch.outer(x, x) for x in pt) / N
    prec0 = math.sqrt(1 / la.var0)
    P = torch.kron(math.sqrt(N) * B / N + prec0 * torch.eye(C, dtype=DT),
                   math.sqrt(N) * A + prec0 * torch.eye(D1, dtype=DT))
    Sigma = torch.linalg.inv(P)                                   # dense posterior covariance
    W = model[1].weight.detach()
    x = phi[60:75]
    mus, covs = [], []
    for xi in phi_tilde(x):
        J = torch.autograd.functional.jacobian(lambda w: w.reshape(C, D1) @ xi, W.reshape(-1))
        mus.append(W @ xi)
        covs.append(J @ Sigma @ J.T)
    mu, cov = torch.stack(mus), torch.stack(covs)
    mu_la, cov_la = la.logit_mean_cov(x)
    torch.testing.assert_close(mu_la, mu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cov_la, cov, rtol=1e-9, atol=1e-12)
    # predictive: the same S standard-normal C-vectors for every instance, logits / T
    S, T = MERONEN_SAMPLES, la.temperature
    g = torch.randn(C, S, 1, dtype=DT, generator=torch.Generator().manual_seed(11))[:, :, 0]
    dense = torch.stack([torch.softmax((m[:, None] + torch.linalg.cholesky(c) @ g) / T, 0).mean(1)
                         for m, c in zip(mu, cov)])
    ours = la.predict(x, generator=torch.Generator().manual_seed(11), mc_dtype=DT)
    torch.testing.assert_close(ours.probs, dense, rtol=0, atol=1e-10)
    assert not torch.allclose(dense, torch.softmax(mu / T, -1), atol=1e-3)   # the draws matter
    # the default predictive is this one (MC-50, shared draws, seed 0), in float32 draws
    default = la.predict(x)
    ref = la.predict(x, link="mc_shared", n_samples=S, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(default.probs, ref.probs, rtol=0, atol=0)
    torch.testing.assert_close(default.variance, ours.variance, rtol=0, atol=0)   # untempered
    a, b = mu.topk(2, -1).indices.unbind(-1)
    r = torch.arange(len(x))
    torch.testing.assert_close(ours.variance, cov[r, a, a] + cov[r, b, b] - 2 * cov[r, a, b])


def test_meronen_choice_minimises_validation_nll_over_the_joint_grid():
    phi, y, model, probs, la = _meronen_problem(C=2, seed=8)
    pv, yv = phi[60:], y[60:]
    nll = {}
    for v in MERONEN_VAR0_GRID:
        for t in MERONEN_TEMP_GRID:
            fresh = ExitLaplace(model[1].weight, la.factors, prior="kron", tau=1.0).set_meronen(v, t)
            p = fresh.predict(pv, generator=torch.Generator().manual_seed(0)).probs
            nll[(v, t)] = float(-torch.log(p[torch.arange(len(yv)), yv]).mean())
    assert len(la.val_nll_grid) == 100
    # the grid's eigendecomposition path against set_tau's Cholesky inverses (float32 draws)
    assert {(v, t): n for v, t, n in la.val_nll_grid} == pytest.approx(nll, rel=1e-6)
    best = min(nll.values())
    assert nll[(la.var0, la.temperature)] == best and la.tau == 1 / la.var0
    assert len(set(round(v, 9) for v in nll.values())) > 10                # the grid is not flat


def test_meronen_temperature_enters_the_two_class_probit_and_the_errors_are_clear():
    phi, y, model, probs, la = _meronen_problem(C=2, seed=9)
    la.set_meronen(2.0, 0.5)
    mu, cov = la.logit_mean_cov(phi[:10])
    mu_d, var_d = mu[:, 1] - mu[:, 0], cov[:, 1, 1] + cov[:, 0, 0] - 2 * cov[:, 0, 1]
    p1 = torch.sigmoid((mu_d / 0.5) / torch.sqrt(1 + math.pi * var_d / 0.25 / 8))
    torch.testing.assert_close(la.predict(phi[:10], link="probit").probs[:, 1], p1, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="phi_val"):
        fit_exit_laplace(ExitHead(4, 2).to(DT), phi, prior="meronen")
    with pytest.raises(ValueError, match="set_meronen"):
        fit_exit_laplace(ExitHead(4, 2).to(DT), phi, prior="meronen", tau=1.0, phi_val=phi, y_val=y)
    with pytest.raises(ValueError, match="kron form"):
        ExitLaplace(model[1].weight, la.factors, tau=1.0).set_meronen(1.0, 1.0)
    with pytest.raises(ValueError, match="positive"):
        la.set_meronen(1.0, 0.0)


# --------------------------------------------------------------------------- fits on a subset
def test_fit_on_subset_uses_exactly_the_subset():
    phi, y, model, probs = make_problem(3, D=5, N=120, seed=10)
    head = ExitHead(5, 3).to(DT)
    head.linear.weight.data.copy_(model[1].weight.data)
    idx = torch.randperm(120, generator=torch.Generator().manual_seed(0))[:40]
    sub = fit_on_subset(head, phi, probs, idx, y=y)
    sliced = fit_exit_laplace(head, phi[idx], probs[idx], y=y[idx])
    full = fit_exit_laplace(head, phi, probs, y=y)
    assert sub.n_data == 40 and full.n_data == 120
    torch.testing.assert_close(sub.B, sliced.B, rtol=0, atol=0)
    torch.testing.assert_close(sub.A, sliced.A, rtol=0, atol=0)
    assert sub.tau == sliced.tau
    assert not torch.allclose(sub.A, full.A) and sub.tau != full.tau
    # B summed over the subset's own probabilities, A averaged over the subset, by hand
    pt = phi_tilde(phi[idx])
    torch.testing.assert_close(sub.A, pt.T @ pt / 40)
    torch.testing.assert_close(sub.B, torch.diag(probs[idx].sum(0)) - probs[idx].T @ probs[idx])
    kr = fit_on_subset(head, phi, None, idx.numpy(), prior="kron", tau=2.0)
    torch.testing.assert_close(kr.A, sliced.A)
    for bad in (torch.tensor([], dtype=torch.long), torch.tensor([0, 0]), torch.tensor([120]),
                torch.ones(120, dtype=torch.bool), torch.tensor([0.0, 1.0])):
        with pytest.raises(ValueError, match="idx"):
            fit_on_subset(head, phi, probs, bad)
