"""Claims about the distillation losses, the per-instance weights and the
method objectives (fairkd_utils/losses.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from fairkd_utils import losses as L
from fairkd_utils import metrics as M
from fairkd_utils import profiles
from fairkd_utils.data import Batch
from fairkd_utils.exit_laplace import ExitLaplace, LaplacePrediction
from fairkd_utils.kron_factors import KronFactors
from fairkd_utils.models import ExitHead, StudentOutput

torch.set_num_threads(1)
DT = torch.float64


def _pred(probs, variance=None):
    probs = torch.tensor(probs, dtype=DT)
    top2 = probs.topk(2, -1).values
    h = -(probs * probs.clamp_min(1e-300).log()).sum(-1)
    v = torch.zeros(len(probs), dtype=DT) if variance is None else torch.tensor(variance, dtype=DT)
    return LaplacePrediction(probs, top2[:, 0] - top2[:, 1], h, v)


# ---------------------------------------------------------------- DeDiER weight

def test_dedier_upweights_confidently_wrong_readouts_and_leaves_right_ones_at_one():
    beta = 2.0
    logits = torch.log(torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4]], dtype=DT))
    y = torch.tensor([1, 0, 1])  # wrong (cm 0.8), right, wrong (cm 0.2)
    w = L.dedier_weight(logits, y, beta)
    expected = torch.tensor([math.exp(beta * 0.8), 1.0, math.exp(beta * 0.2)], dtype=DT)
    torch.testing.assert_close(w, expected)


def test_dedier_signed_alpha_downweights_confidently_right_readouts():
    beta = 1.5
    logits = torch.log(torch.tensor([[0.9, 0.1], [0.9, 0.1]], dtype=DT))
    w = L.dedier_weight(logits, torch.tensor([1, 0]), beta, alpha="signed")
    torch.testing.assert_close(w, torch.tensor([math.exp(1.2), math.exp(-1.2)], dtype=DT))


def test_confidence_margin_is_top1_minus_top2_for_many_classes():
    p = torch.tensor([[0.5, 0.2, 0.3], [0.1, 0.1, 0.8]], dtype=DT)
    torch.testing.assert_close(L.confidence_margin(p), torch.tensor([0.2, 0.7], dtype=DT))


def test_weights_carry_no_gradient():
    logits = torch.randn(5, 3, requires_grad=True)
    assert not L.dedier_weight(logits, torch.zeros(5, dtype=torch.long), 2.0).requires_grad


# ---------------------------------------------------------------- Laplace-KD weight

def test_laplace_margin_weight_is_dedier_form_on_the_laplace_predictive():
    beta = 3.0
    pred = _pred([[0.7, 0.3], [0.2, 0.8], [0.45, 0.55]])
    y = torch.tensor([1, 1, 0])  # wrong (cm 0.4), right, wrong (cm 0.1)
    w = L.laplace_weight(pred, y, beta, score="margin")
    torch.testing.assert_close(w, torch.tensor([math.exp(1.2), 1.0, math.exp(0.3)], dtype=DT))


def test_laplace_entropy_weight_is_exp_beta_times_entropy_over_log_c():
    beta = 2.0
    pred = _pred([[0.5, 0.5], [1.0, 0.0], [0.9, 0.1]])
    h3 = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) / math.log(2)
    w = L.laplace_weight(pred, torch.tensor([0, 0, 1]), beta, score="entropy")
    torch.testing.assert_close(w, torch.tensor([math.exp(beta), 1.0, math.exp(beta * h3)], dtype=DT))
    # label-free, and the uniform predictive gets e^beta for any number of classes
    w3 = L.laplace_weight(_pred([[1 / 3] * 3]), torch.tensor([2]), beta, score="entropy")
    torch.testing.assert_close(w3, torch.tensor([math.exp(beta)], dtype=DT))


def test_laplace_variance_weight_is_scale_free_share_of_the_batch_mean_variance():
    beta = 2.0
    pred = _pred([[0.6, 0.4]] * 3, variance=[1.0, 3.0, 2.0])  # batch mean 2
    w = L.laplace_weight(pred, torch.tensor([0, 0, 0]), beta, score="variance")
    torch.testing.assert_close(w, torch.exp(beta * torch.tensor([1 / 3, 3 / 5, 1 / 2], dtype=DT)))
    scaled = _pred([[0.6, 0.4]] * 3, variance=[1e-3, 3e-3, 2e-3])
    torch.testing.assert_close(L.laplace_weight(scaled, torch.zeros(3, dtype=torch.long), beta,
                                                score="variance"), w)


def test_unknown_score_is_a_clear_error_listing_the_valid_ones():
    with pytest.raises(ValueError, match="margin.*entropy.*variance"):
        L.laplace_weight(_pred([[0.5, 0.5]]), torch.tensor([0]), 1.0, score="auroc")
    with pytest.raises(ValueError, match="margin.*entropy.*variance"):
        L.MethodConfig("laplace_kd", lam=0.5, T=2.0, beta=1.0, score="auroc")
    with pytest.raises(ValueError, match="dedier_both"):
        L.MethodConfig("deder")


# ---------------------------------------------------------------- losses

def test_loss_with_lambda_zero_is_cross_entropy_and_needs_no_teacher():
    s = torch.randn(7, 3, dtype=DT)
    y = torch.randint(0, 3, (7,))
    torch.testing.assert_close(L.student_loss(s, y, None, lam=0.0), F.cross_entropy(s, y))


def test_loss_with_unit_weights_is_hintons_kd():
    torch.manual_seed(0)
    s, t = torch.randn(6, 4, dtype=DT), torch.randn(6, 4, dtype=DT)
    y = torch.randint(0, 4, (6,))
    lam, T = 0.7, 3.0
    hinton = (1 - lam) * F.cross_entropy(s, y) + lam * T * T * F.kl_div(
        F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean")
    ones = torch.ones(6, dtype=DT)
    torch.testing.assert_close(L.student_loss(s, y, t, ones, ones, lam, T), hinton)
    # and the per-instance term is T^2 * sum_k p_t log(p_t / p_s), written out
    p_t, p_s = F.softmax(t / T, -1), F.softmax(s / T, -1)
    torch.testing.assert_close(L.kd_loss(s, t, T), T * T * (p_t * (p_t / p_s).log()).sum(-1))


def test_loss_applies_per_instance_weights_to_each_term():
    s, t = torch.randn(4, 2, dtype=DT), torch.randn(4, 2, dtype=DT)
    y = torch.tensor([0, 1, 1, 0])
    w_ce, w_kd = torch.tensor([1., 2., 3., 4.], dtype=DT), torch.tensor([4., 3., 2., 1.], dtype=DT)
    ce = F.cross_entropy(s, y, reduction="none")
    expected = (0.4 * w_ce * ce + 0.6 * w_kd * L.kd_loss(s, t, 2.0)).mean()
    torch.testing.assert_close(L.student_loss(s, y, t, w_ce, w_kd, 0.6, 2.0), expected)


def test_kd_term_vanishes_when_student_and_teacher_agree():
    s = torch.randn(5, 3, dtype=DT, requires_grad=True)
    kd = L.kd_loss(s, s.detach().clone(), 4.0)
    torch.testing.assert_close(kd, torch.zeros(5, dtype=DT))
    kd.sum().backward()
    torch.testing.assert_close(s.grad, torch.zeros_like(s))


def test_kd_without_teacher_logits_is_a_clear_error():
    with pytest.raises(ValueError, match="teacher_logits"):
        L.student_loss(torch.randn(2, 2), torch.tensor([0, 1]), None, lam=0.5)


def test_normalisation_keeps_the_batch_mean_at_one_and_carries_no_gradient():
    w = torch.rand(9, dtype=DT, requires_grad=True) * 5 + 0.1
    n = L.normalise(w)
    torch.testing.assert_close(n.mean(), torch.tensor(1.0, dtype=DT))
    assert not n.requires_grad
    torch.testing.assert_close(n / n[0], (w / w[0]).detach())  # ratios kept


def test_group_balanced_weight_is_inverse_group_frequency_with_train_mean_one():
    counts = torch.tensor([3498, 184, 56, 1057])
    w = L.group_balanced_weight(torch.arange(4), counts)
    torch.testing.assert_close(w * counts, torch.full((4,), counts.sum() / 4.0))  # w_g ∝ 1/n_g
    torch.testing.assert_close((w * counts).sum() / counts.sum(), torch.tensor(1.0))


# ---------------------------------------------------------------- configs

def test_method_config_rejects_nonsense_and_defaults_cover_every_method():
    assert set(L.DEFAULT_HPARAMS) == set(L.METHODS)
    with pytest.raises(ValueError, match="lam must be 0"):
        L.MethodConfig("erm", lam=0.5)
    with pytest.raises(ValueError, match="wrong.*signed"):
        L.MethodConfig("dedier", alpha="always")
    with pytest.raises(ValueError, match="tau"):
        L.MethodConfig("laplace_kd", prior="kron")
    cfg = L.default_config("dedier", warmup_epochs=3)
    assert cfg.warmup_epochs == 3 and cfg.beta == L.DEFAULT_HPARAMS["dedier"].beta
    assert cfg.config_id != cfg.replace(beta=cfg.beta + 1).config_id


# ---------------------------------------------------------------- objectives

N, C, D = 40, 2, 5


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(N, C, generator=g)
    y = torch.randint(0, C, (N,), generator=g)
    a = torch.randint(0, 2, (N,), generator=g)
    phi = torch.randn(N, D, generator=g)
    return teacher, y, a, phi


def _error_set():
    """A fixed error set for jtt's objective: every third training instance."""
    return torch.arange(N) % 3 == 0


class _Student(torch.nn.Module):
    """Just an exit head, which is what the objectives read from the student."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.exit = ExitHead(D, C)
        with torch.no_grad():
            self.exit.linear.weight.normal_(0, 1.0)


def _config(method, **overrides):
    """``default_config``, laplace_kd_subset's subset cut to a quarter of the tests' N."""
    cfg = L.default_config(method, **overrides)
    return cfg.replace(laplace_subset=N // 4) if cfg.laplace_subset else cfg


@pytest.fixture
def val(monkeypatch):
    """A validation split for laplace_kd_meronen's refits: labels, and features that the
    exit-feature pass (``train.predict``, patched) returns."""
    import types

    import fairkd_utils.train as train
    g = torch.Generator().manual_seed(11)
    split = types.SimpleNamespace(phi=torch.randn(N // 2, D, generator=g),
                                  y=torch.randint(0, C, (N // 2,), generator=g))
    monkeypatch.setattr(train, "predict", lambda model, ds, device=None: ds)
    return split


def _batches(y, a, phi, model, size=16):
    for i in range(0, N, size):
        idx = torch.arange(i, min(i + size, N))
        logits = torch.randn(len(idx), C, requires_grad=True)
        out = StudentOutput(logits, model.exit(phi[idx]).detach(), phi[idx])
        yield Batch(idx, torch.zeros(len(idx), 1), y[idx], a[idx]), out


def test_every_objective_returns_its_loss_and_the_weights_it_used(val):
    teacher, y, a, phi = _setup()
    model = _Student()
    counts = torch.bincount(y * 2 + a, minlength=4)
    for method in profiles.TRAINED:
        cfg = _config(method)
        obj = L.make_objective(cfg, teacher_logits=teacher, group_counts=counts, n_train=N,
                               n_classes=C, model=model, error_set=_error_set(), val=val)
        batch, out = next(_batches(y, a, phi, model))
        loss, w = obj.loss(out, batch, epoch=0)
        expected = L.student_loss(out.logits, batch.y, teacher[batch.idx], w["ce"], w["kd"],
                                  cfg.lam, cfg.T)
        torch.testing.assert_close(loss, expected)
        loss.backward()
        assert w["ce"].shape == w["kd"].shape == (len(batch.idx),)
        torch.testing.assert_close(w["ce"].mean(), torch.tensor(1.0))
        torch.testing.assert_close(w["kd"].mean(), torch.tensor(1.0))


def test_dedier_weights_the_kd_term_only_and_dedier_both_both_terms():
    teacher, y, a, phi = _setup()
    model = _Student()
    batch, out = next(_batches(y, a, phi, model))
    raw = L.dedier_weight(out.exit_logits, batch.y, 3.0)
    for method, ce_weighted in (("dedier", False), ("dedier_both", True)):
        cfg = L.MethodConfig(method, lam=0.5, T=2.0, beta=3.0, normalise=False)
        _, w = L.make_objective(cfg, teacher_logits=teacher).loss(out, batch, epoch=0)
        torch.testing.assert_close(w["kd"], raw)
        torch.testing.assert_close(w["ce"], raw if ce_weighted else torch.ones_like(raw))


def test_warm_up_gives_unit_weights_for_every_reweighting_method(val):
    teacher, y, a, phi = _setup()
    model = _Student()
    counts = torch.bincount(y * 2 + a, minlength=4)
    for method in profiles.REWEIGHTING:
        cfg = _config(method, warmup_epochs=2, normalise=False)
        obj = L.make_objective(cfg, teacher_logits=teacher, group_counts=counts, n_train=N,
                               n_classes=C, model=model, error_set=_error_set(), val=val)
        for epoch in range(3):
            term = profiles.METHOD_SPECS[method].terms[0]
            ws = [obj.loss(out, b, epoch)[1][term] for b, out in _batches(y, a, phi, model)]
            obj.on_epoch_end(epoch)
            w = torch.cat(ws)
            if epoch < 2:
                torch.testing.assert_close(w, torch.ones(N), msg=f"{method} epoch {epoch}")
            else:
                assert not torch.allclose(w, torch.ones(N)), f"{method} stays at 1 after warm-up"


def test_group_balanced_objective_weights_inverse_true_group_frequency():
    teacher, y, a, phi = _setup()
    counts = torch.bincount(y * 2 + a, minlength=4)
    cfg = L.MethodConfig("group_balanced", lam=0.5, T=2.0, normalise=False)
    obj = L.make_objective(cfg, teacher_logits=teacher, group_counts=counts, n_classes=C)
    model = _Student()
    batch, out = next(_batches(y, a, phi, model))
    _, w = obj.loss(out, batch, epoch=0)
    g = batch.y * 2 + batch.a
    torch.testing.assert_close(w["ce"], (N / 4) / counts[g].float())


def test_laplace_kd_accumulates_the_factors_of_its_batches_and_refits_at_epoch_end():
    teacher, y, a, phi = _setup()
    model = _Student()
    cfg = L.MethodConfig("laplace_kd", lam=0.5, T=2.0, beta=2.0, score="margin", normalise=False)
    obj = L.make_objective(cfg, teacher_logits=teacher, n_train=N, n_classes=C, model=model)
    batches = list(_batches(y, a, phi, model))
    for b, out in batches:
        _, w = obj.loss(out, b, epoch=0)
        torch.testing.assert_close(w["kd"], torch.ones(len(b.idx)))  # no posterior yet
    source = obj.inputs.laplace
    assert source.posterior is None
    one_shot = KronFactors.from_features(phi, torch.softmax(model.exit(phi).detach(), -1), y)
    torch.testing.assert_close(source.factors.B, one_shot.B)
    torch.testing.assert_close(source.factors.A, one_shot.A)
    obj.on_epoch_end(0)
    assert source.posterior is not None and source.factors is None
    # epoch 1 weights come from the posterior fitted on epoch 0's factors
    la = ExitLaplace(model.exit.linear.weight.detach(), one_shot)  # tau by marginal likelihood
    assert source.posterior.tau == pytest.approx(la.tau, rel=1e-9)
    b, out = batches[0]
    _, w = obj.loss(out, b, epoch=1)
    torch.testing.assert_close(w["ce"], L.laplace_weight(la.predict(out.phi), b.y, 2.0).float())
    torch.testing.assert_close(w["kd"], w["ce"])


def test_laplace_kd_every_k_steps_rescales_b_to_the_training_set():
    teacher, y, a, phi = _setup()
    model = _Student()
    cfg = L.MethodConfig("laplace_kd", lam=0.5, T=2.0, beta=2.0, refit_every=1, tau=1.0)
    obj = L.make_objective(cfg, teacher_logits=teacher, n_train=N, n_classes=C, model=model)
    b, out = next(_batches(y, a, phi, model))
    obj.loss(out, b, epoch=0)
    la = obj.inputs.laplace.posterior
    assert la is not None and la.tau == 1.0
    seen = KronFactors.from_features(phi[b.idx], torch.softmax(out.exit_logits, -1))
    torch.testing.assert_close(la.B, seen.B * (N / len(b.idx)))
    torch.testing.assert_close(la.A, seen.A)


def test_objectives_need_what_their_method_reads():
    teacher, y, a, phi = _setup()
    with pytest.raises(ValueError, match="teacher_logits"):
        L.make_objective(L.default_config("kd"))
    with pytest.raises(ValueError, match="model"):
        L.make_objective(L.default_config("laplace_kd"), teacher_logits=teacher, n_train=N)
    with pytest.raises(ValueError, match="group_counts"):
        L.make_objective(L.default_config("group_balanced"), teacher_logits=teacher)
    with pytest.raises(ValueError, match="rows"):
        L.make_objective(L.default_config("kd"), teacher_logits=teacher, n_train=N + 1)
    obj = L.make_objective(L.default_config("dedier"), teacher_logits=teacher)
    b = Batch(torch.arange(3), None, y[:3], a[:3])
    with pytest.raises(ValueError, match="exit_logits"):
        obj.loss(torch.randn(3, C), b, epoch=0)


def test_objective_fingerprint_description_changes_with_every_hyperparameter():
    from fairkd_utils.checkpoints import fingerprint
    teacher, y, a, phi = _setup()
    base = L.default_config("dedier")
    fp = lambda cfg, t=teacher: fingerprint(L.make_objective(cfg, teacher_logits=t).describe())  # noqa: E731
    assert fp(base) == fp(base)
    assert fp(base) != fp(base.replace(beta=base.beta + 1))
    assert fp(base) != fp(base.replace(warmup_epochs=1))
    assert fp(base) != fp(base, teacher + 1)


def test_method_config_round_trips_through_a_plain_dict():
    cfg = L.default_config("laplace_kd", score="variance", warmup_epochs=2, refit_every=10)
    assert L.MethodConfig(**cfg.to_dict()) == cfg
    with pytest.raises(TypeError, match="gamma"):
        L.default_config("laplace_kd", gamma=1.0)


def test_an_online_teacher_sees_the_batch_and_matches_cached_logits():
    """With augmentation the teacher runs on each batch; without it, that equals
    looking its logits up by index."""
    teacher, y, a, phi = _setup()
    net = torch.nn.Linear(1, C)
    xs = torch.randn(N, 1)
    with torch.no_grad():
        cached = net(xs)
    cfg = L.default_config("kd")
    model = _Student()
    online = L.make_objective(cfg, teacher_logits=L.OnlineTeacher(net, fingerprint="t"), n_classes=C)
    lookup = L.make_objective(cfg, teacher_logits=cached, n_train=N, n_classes=C)
    for batch, out in _batches(y, a, phi, model):
        batch = batch._replace(x=xs[batch.idx])
        torch.testing.assert_close(online.loss(out, batch, 0)[0], lookup.loss(out, batch, 0)[0])
    assert online.describe()["teacher_logits"] == "online:t"


def test_shuffled_keeps_the_batch_multiset_of_dedier_both_weights_but_not_their_order():
    teacher, y, a, phi = _setup()
    model = _Student()
    batch, out = next(_batches(y, a, phi, model))
    both = L.make_objective(L.MethodConfig("dedier_both", lam=0.5, T=2.0, beta=3.0, normalise=False),
                            teacher_logits=teacher)
    shuffled = L.make_objective(L.MethodConfig("shuffled", lam=0.5, T=2.0, beta=3.0, normalise=False),
                                teacher_logits=teacher, seed=1)
    w_both = both.loss(out, batch, epoch=0)[1]["ce"]
    w_shuf = shuffled.loss(out, batch, epoch=0)[1]
    torch.testing.assert_close(w_shuf["ce"], w_shuf["kd"])               # both terms
    torch.testing.assert_close(w_shuf["ce"].sort().values, w_both.sort().values)
    assert not torch.equal(w_shuf["ce"], w_both)


@pytest.mark.parametrize("method", L.METHODS)
def test_the_method_table_decides_terms_teacher_and_labels(method, val):
    """One table says, per method, where its weight comes from and which terms it
    multiplies; the objective built from it behaves accordingly after warm-up. A method
    that retrains another's last layer (DFR) has no training objective of its own."""
    spec = profiles.METHOD_SPECS[method]
    teacher, y, a, phi = _setup()
    model = _Student()
    counts = torch.bincount(y * 2 + a, minlength=4)
    cfg = _config(method, normalise=False)
    assert (cfg.lam > 0) == spec.distils
    if spec.last_layer_of:
        assert method not in profiles.TRAINED and spec.last_layer_of in profiles.TRAINED
        with pytest.raises(ValueError, match=f"retrains the last layer of {spec.last_layer_of}"):
            L.make_objective(cfg, teacher_logits=teacher, n_train=N, n_classes=C)
        return
    obj = L.make_objective(cfg, teacher_logits=teacher, group_counts=counts, n_train=N, n_classes=C,
                           model=model, error_set=_error_set(), val=val)
    obj.on_epoch_end(0)  # laplace_kd: nothing accumulated yet, so its weights stay 1
    if spec.weight == "exit_laplace":
        for b, out in _batches(y, a, phi, model):
            obj.loss(out, b, 0)
        obj.on_epoch_end(0)
    batch, out = next(_batches(y, a, phi, model))
    w = obj.loss(out, batch, epoch=1)[1]
    for term in ("ce", "kd"):
        weighted = not torch.allclose(w[term], torch.ones_like(w[term]))
        assert weighted == (term in spec.terms), (method, term)
    assert method in profiles.REWEIGHTING if spec.terms else method not in profiles.REWEIGHTING
    if spec.group_labels:  # the weight is a function of the true group alone
        g = batch.y * 2 + batch.a
        for k in g.unique():
            assert w["ce"][g == k].unique().numel() == 1


# ---------------------------------------------------------------- the reviewer's baselines

def test_jtt_weights_are_lambda_up_on_the_error_set_and_one_elsewhere_only_after_warmup():
    teacher, y, a, phi = _setup()
    model = _Student()
    errors = _error_set()
    cfg = L.MethodConfig("jtt", lam=0.5, T=2.0, jtt_epochs=1, jtt_upweight=7.0, warmup_epochs=1,
                         normalise=False)
    obj = L.make_objective(cfg, teacher_logits=teacher, n_train=N, n_classes=C, error_set=errors)
    for epoch in range(2):
        for b, out in _batches(y, a, phi, model):
            _, w = obj.loss(out, b, epoch)
            expected = (torch.where(errors[b.idx], 7.0, 1.0) if epoch >= 1
                        else torch.ones(len(b.idx)))               # unit weights in the warm-up
            torch.testing.assert_close(w["ce"], expected)
            torch.testing.assert_close(w["kd"], expected)          # both terms
    raw = L.instance_weight(cfg, None, Batch(torch.arange(N), None, y, a), L.WeightInputs(error_set=errors))
    torch.testing.assert_close(raw, torch.where(errors, 7.0, 1.0))
    with pytest.raises(ValueError, match="error_set"):
        L.make_objective(cfg, teacher_logits=teacher, n_train=N, n_classes=C)
    with pytest.raises(ValueError, match="n_train"):
        L.make_objective(cfg, teacher_logits=teacher, n_train=N, n_classes=C, error_set=errors[:-1])


def test_jtt_weighting_equals_upsampling_the_error_set_in_expectation():
    """The loss of the training set with the error set repeated lambda_up times equals
    the jtt-weighted loss normalised by the weights' mean (README: weighting is
    upsampling in expectation)."""
    teacher, y, a, phi = _setup()
    s = torch.randn(N, C, dtype=DT)
    errors, up = _error_set(), 4
    cfg = L.MethodConfig("jtt", lam=0.3, T=2.0, jtt_epochs=1, jtt_upweight=float(up))
    everyone = Batch(torch.arange(N), None, y, a)
    w = L.instance_weight(cfg, None, everyone, L.WeightInputs(error_set=errors)).to(DT)
    weighted = L.student_loss(s, y, teacher.to(DT), L.normalise(w), L.normalise(w), 0.3, 2.0)
    idx = torch.cat([torch.arange(N), torch.nonzero(errors).flatten().repeat(up - 1)])
    upsampled = L.student_loss(s[idx], y[idx], teacher.to(DT)[idx], lam=0.3, T=2.0)
    torch.testing.assert_close(weighted, upsampled)


def test_dedier_final_weight_is_dedier_weight_of_the_final_logits_on_both_terms():
    teacher, y, a, phi = _setup()
    model = _Student()
    batch, out = next(_batches(y, a, phi, model))
    cfg = L.MethodConfig("dedier_final", lam=0.5, T=2.0, beta=3.0, normalise=False)
    loss, w = L.make_objective(cfg, teacher_logits=teacher).loss(out, batch, epoch=0)
    expected = L.dedier_weight(out.logits.detach(), batch.y, 3.0)
    torch.testing.assert_close(w["ce"], expected)
    torch.testing.assert_close(w["kd"], expected)
    assert not torch.allclose(expected, L.dedier_weight(out.exit_logits, batch.y, 3.0))  # not the exit's
    loss.backward()  # the weights carry no gradient, the loss does
    assert out.logits.grad is not None


def test_fields_of_one_method_are_refused_elsewhere_and_stay_out_of_other_ids():
    with pytest.raises(ValueError, match="jtt_upweight is jtt's alone"):
        L.MethodConfig("kd", lam=0.5, jtt_upweight=5.0)
    with pytest.raises(ValueError, match="jtt_epochs is jtt's alone"):
        L.MethodConfig("jtt", lam=0.5, jtt_upweight=5.0)
    with pytest.raises(ValueError, match="lambda_up"):
        L.MethodConfig("jtt", lam=0.5, jtt_epochs=1, jtt_upweight=0.5)
    with pytest.raises(ValueError, match="dfr_penalty"):
        L.MethodConfig("dfr", lam=0.5, dfr_penalty="l3")
    jtt = L.default_config("jtt")
    assert jtt.config_id != jtt.replace(jtt_epochs=jtt.jtt_epochs + 1).config_id
    assert jtt.config_id != jtt.replace(jtt_upweight=jtt.jtt_upweight + 1).config_id
    kd = L.default_config("kd")
    plain = {k: v for k, v in kd.to_dict().items() if k not in ("jtt_epochs", "jtt_upweight", "dfr_penalty")}
    import hashlib
    import json
    assert kd.config_id == "c" + hashlib.sha1(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:7]


# ---------------------------------------------------------------- Laplace-KD's diagnostics

def _laplace_objective(n_classes=C, top_k=None, seed=0):
    """A laplace_kd objective on a student whose exit has ``n_classes`` outputs, fitted
    on epoch 0 and recording epoch 1's diagnostics; returns it with epoch 1's batches
    and the raw weights it gave them."""
    teacher, y, a, phi = _setup()
    y = y % n_classes if n_classes > 2 else y
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.exit = ExitHead(D, n_classes)
    with torch.no_grad():
        model.exit.linear.weight.normal_(0, 1.0)
    cfg = L.MethodConfig("laplace_kd", lam=0.5, T=2.0, beta=2.0, normalise=False)
    counts = torch.bincount(y * 2 + a, minlength=2 * n_classes)
    obj = L.make_objective(cfg, teacher_logits=torch.randn(N, n_classes), group_counts=counts, n_train=N,
                           n_classes=n_classes, model=model, seed=seed, top_k=top_k)

    def batches():
        for i in range(0, N, 16):
            idx = torch.arange(i, min(i + 16, N))
            out = StudentOutput(torch.randn(len(idx), n_classes), model.exit(phi[idx]).detach(), phi[idx])
            yield Batch(idx, torch.zeros(len(idx), 1), y[idx], a[idx]), out

    for b, out in batches():
        obj.loss(out, b, 0)
    obj.on_epoch_end(0)
    obj.on_epoch_start(1)
    seen = [(b, out, obj.loss(out, b, 1)[1]["ce"]) for b, out in batches()]
    return obj, seen, y, a


def test_laplace_effect_reads_within_wrong_agreement_top_k_and_group_shares_by_hand():
    from scipy.stats import kendalltau, spearmanr

    obj, seen, y, a = _laplace_objective(top_k=6)
    stats = obj.epoch_stats(1)
    wl = torch.cat([w for _, _, w in seen]).double()
    exit_logits = torch.cat([out.exit_logits for _, out, _ in seen])
    wd = L.dedier_weight(exit_logits, y, 2.0).double()
    wrong = (exit_logits.argmax(1) != y).numpy()
    assert stats["laplace_n_wrong"] == wrong.sum() > 2
    assert stats["laplace_wrong_spearman"] == pytest.approx(spearmanr(wd[wrong], wl[wrong]).statistic)
    assert stats["laplace_wrong_kendall"] == pytest.approx(kendalltau(wd[wrong], wl[wrong]).statistic)
    top = lambda w: set(sorted(range(N), key=lambda i: (-float(w[i]), i))[:6])  # noqa: E731
    assert stats["laplace_topk_overlap"] == pytest.approx(len(top(wd) & top(wl)) / 6)
    g = (y * 2 + a).numpy()
    for k in range(4):
        assert stats[f"weight_share_g{k}"] == pytest.approx(float(wl[g == k].sum() / wl.sum()))
    assert math.isnan(stats["laplace_mc_wrong_spearman"])  # C = 2: the probit is deterministic
    assert set(stats) == {*L.LAPLACE_EFFECT, *(f"weight_share_g{k}" for k in range(4))}


def test_laplace_effect_within_wrong_sees_a_reordering_the_all_instances_spearman_hides():
    """95 right instances at weight 1 for both weightings and 5 wrong ones whose order
    Laplace-KD reverses: over all instances Spearman stays near 1, within the wrong
    ones it is -1 (hand-made weights in the objective's own record)."""
    obj, _, _, _ = _laplace_objective()
    source = obj.inputs.laplace
    wd = torch.cat([torch.ones(95), torch.tensor([2.0, 3.0, 4.0, 5.0, 6.0])])
    wl = torch.cat([torch.ones(95), torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0])])
    source._effect = {"w_dedier": [wd], "w_laplace": [wl], "dp": [torch.zeros(100)],
                      "wrong": [wd > 1], "idx": [torch.arange(100)],
                      "g": [torch.zeros(100, dtype=torch.long)]}
    stats = obj.epoch_stats(1)
    assert stats["laplace_rank_corr"] > 0.9
    assert stats["laplace_wrong_spearman"] == pytest.approx(-1.0)
    assert stats["laplace_wrong_kendall"] == pytest.approx(-1.0)


def test_laplace_effect_noise_floor_is_two_independent_monte_carlo_draws():
    """C = 3 (Monte-Carlo predictive): the floor is the within-wrong correlation of the
    weights drawn with the training generator (seed) and a second one (seed + 1), and
    drawing it leaves the training weights as they were."""
    obj, seen, y, a = _laplace_objective(n_classes=3, seed=4)
    stats = obj.epoch_stats(1)
    la = obj.inputs.laplace.posterior
    gens = [torch.Generator().manual_seed(4), torch.Generator().manual_seed(5)]
    draws = [torch.cat([L.laplace_weight(la.predict(out.phi, generator=gen), b.y, 2.0) for b, out, _ in seen])
             for gen in gens]
    torch.testing.assert_close(torch.cat([w for _, _, w in seen]), draws[0].float())  # training weights
    exit_logits = torch.cat([out.exit_logits for _, out, _ in seen])
    want = M.within_wrong_rank_corr(draws[0], draws[1], exit_logits.argmax(1) != y)
    assert stats["laplace_mc_wrong_spearman"] == pytest.approx(want["spearman"])
    assert stats["laplace_mc_wrong_kendall"] == pytest.approx(want["kendall"])
    assert 0 < stats["laplace_mc_wrong_spearman"] < 1
