"""The laplace method set (issue 21, item 3): the Laplace-KD variants whose weights can
differ from laplace_kd's, each checked against an independent computation."""

import json
import types

import pytest
import torch
import torch.nn.functional as F

from fairkd_utils import laplace_source, losses, profiles
from fairkd_utils.data import Batch
from fairkd_utils.exit_laplace import fit_exit_laplace
from fairkd_utils.kron_factors import KronFactors
from fairkd_utils.models import ExitHead, StudentOutput

#: Every method's default config_id and to_dict at the branch's starting commit (07e78b4).
BEFORE = json.loads('''{"dedier": ["c6eb1d08", {"T": 2.0, "alpha": "wrong", "beta": 3.0, "dfr_penalty": null, "jtt_epochs": null, "jtt_upweight": null, "lam": 0.5, "method": "dedier", "normalise": true, "prior": "exact", "refit_every": null, "score": "margin", "tau": null, "warmup_epochs": 0}], "dedier_both": ["c27ba6b2", {"T": 2.0, "alpha": "wrong", "beta": 3.0, "dfr_penalty": null, "jtt_epochs": null, "jtt_upweight": null, "lam": 0.5, "method": "dedier_both", "normalise": true, "prior": "exact", "refit_every": null, "score": "margin", "tau": null, "warmup_epochs": 0}], "dedier_final": ["c6a67855", {"T": 2.0, "alpha": "wrong", "beta": 3.0, "dfr_penalty": null, "jtt_epochs": null, "jtt_upweight": null, "lam": 0.5, "method": "dedier_final", "normalise": true, "prior": "exact", "refit_every": null, "score": "margin", "tau": null, "warmup_epochs": 0}], "dfr": ["cc7c9258", {"T": 2.0, "alpha": "wrong", "beta": 0.0, "dfr_penalty": "l1", "jtt_epochs": null, "jtt_upweight": null, "lam": 0.5, "method": "dfr", "normalise": true, "prior": "exact", "refit_every": null, "score": "margin", "tau": null, "warmup_epochs": 0}], "erm": ["c6939bf5", {"T": 1.0, "alpha": "wrong", "beta": 0.0, "dfr_penalty": null, "jtt_epochs": null, "jtt_upweight": null, "lam": 0.0, "method": "erm", "normalise": true, "prior": "exact", "refit_every": null, "score": "margin", "tau": null, "warmup_epochs": 0}], "group_balanced": ["cebb35c2", {"T": 2.0, "alpha": "wrong", "beta": 0.0, "dfr_penalty": null, "jtt_epochs": null, "jtt_upweight": null, "lam": 0.5, "method": "group_balanced", "normalise": true, "prior": "exact", "refit_every": null, "score": "margin", "tau": null, "warmup_epochs": 0}], "group_balanced_erm": ["c93dee6f", {"T": 1.0, "alpha": "wrong", "beta": 0.0, "dfr_penalty": null, "jtt_epochs": null, "jtt_upweight": null, "lam": 0.0, "method": "group_balanced_erm", "normalise": true, "prior": "exact", "refit_every": null, "score": "margin", "tau": null, "warmup_epochs": 0}], "jtt": ["c071c3dd", {"T": 2.0, "alpha": "wrong", "beta": 0.0, "dfr_penalty": null, "jtt_epochs": 1, "jtt_upweight": 20.0, "lam": 0.5, "method": "jtt", "normalise": true, "prior": "exact", "refit_every": null, "score": "margin", "tau": null, "warmup_epochs": 0}], "kd": ["c11bb9ed", {"T": 2.0, "alpha": "wrong", "beta": 0.0, "dfr_penalty": null, "jtt_epochs": null, "jtt_upweight": null, "lam": 0.5, "method": "kd", "normalise": true, "prior": "exact", "refit_every": null, "score": "margin", "tau": null, "warmup_epochs": 0}], "laplace_kd": ["c9635c58", {"T": 2.0, "alpha": "wrong", "beta": 3.0, "dfr_penalty": null, "jtt_epochs": null, "jtt_upweight": null, "lam": 0.5, "method": "laplace_kd", "normalise": true, "prior": "exact", "refit_every": null, "score": "margin", "tau": null, "warmup_epochs": 0}], "shuffled": ["c5de7c6e", {"T": 2.0, "alpha": "wrong", "beta": 3.0, "dfr_penalty": null, "jtt_epochs": null, "jtt_upweight": null, "lam": 0.5, "method": "shuffled", "normalise": true, "prior": "exact", "refit_every": null, "score": "margin", "tau": null, "warmup_epochs": 0}]}''')


def test_existing_methods_configs_unchanged():
    for m, (cid, d) in BEFORE.items():
        cfg = losses.DEFAULT_HPARAMS[m]
        assert cfg.config_id == cid and cfg.to_dict() == d, m


def test_method_set_resolves_and_has_own_run_directory():
    prof = profiles.PROFILES["smoke"]
    assert profiles.resolve_methods(prof, "laplace") == prof.methods + profiles.LAPLACE_METHODS
    assert profiles.method_set_tag("laplace") == "-laplace"
    assert "laplace" in profiles.METHOD_SETS
    for m in profiles.LAPLACE_METHODS:
        assert profiles.SWEPT_HPARAMS[m] == ("beta",)
        assert profiles.required_hparams(m) == (("kd", "lam"), ("kd", "T"), (m, "beta"))
        assert profiles.METHOD_SPECS[m].weight == "exit_laplace"
    assert losses.DEFAULT_HPARAMS["laplace_kd_entropy"].score == "entropy"
    assert losses.DEFAULT_HPARAMS["laplace_kd_variance"].score == "variance"
    assert losses.DEFAULT_HPARAMS["laplace_kd_meronen"].prior == "meronen"
    assert losses.DEFAULT_HPARAMS["laplace_kd_subset"].laplace_subset == losses.LAPLACE_SUBSET
    # a file may set the subset size but never the field that makes a variant
    profiles.check_hparams({"x": {"laplace_kd_subset": {"beta": 2.0, "laplace_subset": 300}}}, "f")
    with pytest.raises(ValueError, match="does not read score"):
        profiles.check_hparams({"x": {"laplace_kd_entropy": {"score": "margin"}}}, "f")
    with pytest.raises(ValueError, match="that is what makes it"):
        losses.DEFAULT_HPARAMS["laplace_kd_entropy"].replace(score="margin")
    with pytest.raises(ValueError, match="laplace_kd_subset's alone"):
        losses.DEFAULT_HPARAMS["laplace_kd"].replace(laplace_subset=10)
    with pytest.raises(ValueError, match="leave tau"):
        losses.DEFAULT_HPARAMS["laplace_kd_meronen"].replace(tau=1.0)


def _setup(C=3, D=4, N=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    head = ExitHead(D, C)
    with torch.no_grad():
        head.linear.weight.copy_(torch.randn(C, D + 1, generator=g))
    model = types.SimpleNamespace(exit=head)
    phi = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=g)
    return model, head, phi, y


def _out(head, phi):
    with torch.no_grad():
        ex = head(phi.float()).double()
    return StudentOutput(ex, ex, phi)


def _epoch(src, head, phi, y, epoch, bs=16):
    src.epoch_start()
    for i in range(0, len(y), bs):
        idx = torch.arange(i, min(i + bs, len(y)))
        src.observe(_out(head, phi[idx]), Batch(idx, None, y[idx], torch.zeros_like(idx)), epoch)
    src.epoch_end(epoch)


def test_subset_refit_uses_exactly_the_subset():
    model, head, phi, y = _setup()
    cfg = losses.DEFAULT_HPARAMS["laplace_kd_subset"].replace(laplace_subset=20, warmup_epochs=1)
    src = laplace_source.LaplaceSource(cfg, model, len(y), seed=3)
    _epoch(src, head, phi, y, epoch=0)
    idx = laplace_source.laplace_subset_indices(len(y), 20, 3, 0)
    assert len(idx.unique()) == 20
    with torch.no_grad():
        probs = F.softmax(head(phi.float()).double(), -1)
    ref = KronFactors.from_features(phi[idx.sort().values], probs[idx.sort().values], y[idx.sort().values])
    la = src.posterior
    assert la.n_data == 20 and src.factors is None
    torch.testing.assert_close(la.factors.B, ref.B)
    torch.testing.assert_close(la.factors.A, ref.A)
    torch.testing.assert_close(la.factors.log_lik, ref.log_lik)
    # another epoch, another subset; another seed, another subset
    assert not torch.equal(idx, laplace_source.laplace_subset_indices(len(y), 20, 3, 1))
    assert not torch.equal(idx, laplace_source.laplace_subset_indices(len(y), 20, 4, 0))
    with pytest.raises(ValueError, match="train it from scratch"):
        laplace_source.LaplaceSource(cfg, model, len(y), seed=3).load_state({"laplace_factors": None}, 1)


def test_meronen_source_equals_fit_exit_laplace(monkeypatch):
    model, head, phi, y = _setup()
    g = torch.Generator().manual_seed(5)
    phi_val = torch.randn(30, phi.shape[1], generator=g)
    val = types.SimpleNamespace(y=torch.randint(0, 3, (30,), generator=g))
    import fairkd_utils.train as train
    monkeypatch.setattr(train, "predict", lambda model_, ds, device=None: types.SimpleNamespace(phi=phi_val))
    cfg = losses.DEFAULT_HPARAMS["laplace_kd_meronen"].replace(warmup_epochs=1)
    with pytest.raises(ValueError, match="validation split"):
        laplace_source.LaplaceSource(cfg, model, len(y))
    src = laplace_source.LaplaceSource(cfg, model, len(y), seed=0, val=val)
    _epoch(src, head, phi, y, epoch=0)
    with torch.no_grad():
        probs = F.softmax(head(phi.float()).double(), -1)
    ref = fit_exit_laplace(head, phi, probs, y=y, prior="meronen", phi_val=phi_val,
                           y_val=val.y, n_train=len(y))
    la = src.posterior
    assert la.recipe == "meronen" and (la.var0, la.temperature) == (ref.var0, ref.temperature)
    torch.testing.assert_close(torch.tensor(la.val_nll_grid), torch.tensor(ref.val_nll_grid))
    torch.testing.assert_close(la.U, ref.U)
    torch.testing.assert_close(la.V, ref.V)
    assert src.generator is not None  # the shared-draw Monte Carlo, seeded


@pytest.mark.parametrize("method,score", [("laplace_kd_entropy", "entropy"),
                                          ("laplace_kd_variance", "variance")])
def test_score_sources_give_laplace_weight(method, score):
    model, head, phi, y = _setup(C=2)
    cfg = losses.DEFAULT_HPARAMS[method].replace(warmup_epochs=1)
    src = laplace_source.LaplaceSource(cfg, model, len(y))
    _epoch(src, head, phi, y, epoch=0)
    inputs = losses.WeightInputs(laplace=src)
    idx = torch.arange(16)
    batch = Batch(idx, None, y[idx], torch.zeros_like(idx))
    w = losses.instance_weight(cfg, _out(head, phi[idx]), batch, inputs)
    ref = fit_exit_laplace(head, phi, F.softmax(head(phi.float()).double(), -1).detach(), y=y,
                           n_train=len(y))
    expect = losses.laplace_weight(ref.predict(phi[idx]), y[idx], cfg.beta, score)
    torch.testing.assert_close(w, expect)
    assert not torch.allclose(expect, losses.laplace_weight(ref.predict(phi[idx]), y[idx], cfg.beta, "margin"))


def test_sweep_and_hparams_files_cover_the_variants():
    from fairkd_utils import hparams, students, sweep

    run = types.SimpleNamespace(profile=profiles.PROFILES["smoke"])
    lam_T = {"lam": 0.9, "T": 4.0}
    for m in profiles.LAPLACE_METHODS:
        cfgs = sweep.sweep_configs(run, m, lam_T)
        assert [c.beta for c in cfgs] == list(sweep.SWEEP_GRID["beta"])
        assert all(c.method == m and (c.lam, c.T) == (0.9, 4.0) for c in cfgs)
        assert len({c.config_id for c in cfgs}) == len(cfgs)
    chosen = {"kd": lam_T, **{m: {"beta": 2.0} for m in profiles.LAPLACE_METHODS}}
    profiles.check_hparams({"x": chosen}, "f")
    assert profiles.missing_hparams(chosen, profiles.LAPLACE_METHODS) == []
    assert profiles.missing_hparams({"kd": lam_T}, ["laplace_kd_meronen"]) == [
        "laplace_kd_meronen's beta (read by laplace_kd_meronen)"]
    assert hparams.hparams_for(chosen, "laplace_kd_subset") == {**lam_T, "beta": 2.0}
    # only the subset variant trains its own warm-up (its first posterior is a subset's)
    tc = types.SimpleNamespace(epochs=3)
    for m in profiles.LAPLACE_METHODS:
        cfg = losses.default_config(m, warmup_epochs=1)
        assert students.shares_warmup(cfg, tc) == (m != "laplace_kd_subset")
