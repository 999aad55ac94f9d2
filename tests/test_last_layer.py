"""DFR (fairkd_utils/last_layer.py, students.run_dfr): the validation split cut in halves,
group-balanced subsamples of the first, a logistic regression that solves its own
objective, the strength chosen on the second half, and test never read."""

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from fairkd_utils import last_layer as LL
from fairkd_utils import losses, models, records, rundir, students, train
from fairkd_utils.data import GroupDataset
from fairkd_utils.profiles import get_profile

NAMES = ["y0 a0", "y0 a1", "y1 a0", "y1 a1"]


def _features(n_per_group=(120, 30, 14, 90), d=6, seed=0):
    """Features whose first coordinate carries y and second a (the spurious one)."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.cat([torch.full((n,), k) for k, n in enumerate(n_per_group)])
    y, a = g // 2, g % 2
    x = torch.randn(len(g), d, generator=gen, dtype=torch.float64)
    x[:, 0] += 1.2 * (2 * y - 1)
    x[:, 1] += 2.5 * (2 * a - 1)
    return x, y, g


def test_halves_are_disjoint_stratified_and_cover_the_split():
    _, _, g = _features()
    first, second = LL.split_halves(g, torch.Generator().manual_seed(3))
    assert not set(first.tolist()) & set(second.tolist())
    assert sorted(first.tolist() + second.tolist()) == list(range(len(g)))
    for k in range(4):
        n = int((g == k).sum())
        assert int((g[first] == k).sum()) == n // 2 and int((g[second] == k).sum()) == n - n // 2


def test_the_balanced_subsample_has_equal_group_counts_drawn_from_the_first_half():
    _, _, g = _features()
    gen = torch.Generator().manual_seed(1)
    first, _ = LL.split_halves(g, gen)
    sub = LL.balanced_subsample(g, first, gen)
    counts = torch.bincount(g[sub], minlength=4)
    smallest = int(torch.bincount(g[first], minlength=4).min())
    assert counts.tolist() == [smallest] * 4
    assert set(sub.tolist()) <= set(first.tolist()) and len(set(sub.tolist())) == len(sub)


def test_l2_logistic_regression_minimises_its_objective_like_scipy():
    x, y, _ = _features()
    C, n = 0.3, len(y)
    head = LL.fit_logistic(x, y, 2, penalty="l2", C=C, max_iter=20000, tol=1e-11)
    xt = np.c_[x.numpy(), np.ones(n)]
    yy = y.numpy()

    def objective(theta):  # binary logistic regression, class 0 as reference
        z = xt @ theta
        return np.mean(np.logaddexp(0, z) - yy * z) + (theta[:-1] ** 2).sum() / (2 * C * n)

    ref = minimize(objective, np.zeros(xt.shape[1]), method="L-BFGS-B", options={"gtol": 1e-12}).x
    assert torch.allclose(head.weight[0], torch.zeros(x.shape[1], dtype=torch.float64))
    np.testing.assert_allclose(head.weight[1].numpy(), ref[:-1], atol=1e-5)
    np.testing.assert_allclose(head.bias[1].item(), ref[-1], atol=1e-5)


def test_l1_logistic_regression_meets_its_optimality_conditions():
    """At the L1 optimum the mean cross-entropy's gradient is -lam*sign(w) where w != 0
    and at most lam in size where w = 0 (lam = 1/(C n)); the intercept's is 0."""
    x, y, _ = _features(d=12)
    C, n = 0.05, len(y)
    head = LL.fit_logistic(x, y, 2, penalty="l1", C=C, max_iter=20000, tol=1e-12)
    w, b = head.weight[1], head.bias[1]
    p = torch.sigmoid(x @ w + b)
    grad_w, grad_b = x.T @ (p - y) / n, (p - y).mean()
    lam = 1 / (C * n)
    nz = w != 0
    assert 0 < int(nz.sum()) < len(w)                       # sparse, not empty
    torch.testing.assert_close(grad_w[nz], -lam * w[nz].sign(), atol=1e-6, rtol=0)
    assert (grad_w[~nz].abs() <= lam + 1e-8).all()
    assert abs(float(grad_b)) < 1e-6
    with pytest.raises(ValueError, match="penalty"):
        LL.fit_logistic(x, y, 2, penalty="elasticnet")


def test_dfr_fits_on_balanced_subsamples_of_one_half_and_chooses_on_the_other():
    x, y, g = _features()
    res = LL.dfr(x, y, g, 2, seed=4, penalty="l1", grid=(1.0, 0.1, 0.01), n_subsets=3)
    assert not set(res.fit_idx.tolist()) & set(res.select_idx.tolist())
    for sub in res.subsets:
        assert set(sub.tolist()) <= set(res.fit_idx.tolist())
        assert len(set(torch.bincount(g[sub], minlength=4).tolist())) == 1
    # every strength's row is the averaged head's accuracy on the second half, by hand
    for row, C in zip(res.table, (1.0, 0.1, 0.01)):
        heads = [LL.standardised_fit(x[s], y[s], 2, "l1", C) for s in res.subsets]  # one by one
        w = torch.stack([h.weight for h in heads]).mean(0)
        b = torch.stack([h.bias for h in heads]).mean(0)
        pred = (x[res.select_idx] @ w.T + b).argmax(1)
        right = pred == y[res.select_idx]
        sel_g = g[res.select_idx]
        assert row["val_half2_worst_group_acc"] == pytest.approx(
            min(float(right[sel_g == k].double().mean()) for k in range(4)))
    best = max(res.table, key=lambda r: (r["val_half2_worst_group_acc"], r["val_half2_avg_acc"]))
    assert [r["chosen"] for r in res.table].count(True) == 1 and best["chosen"]
    assert res.C == best["C"]
    # the second half decides: flipping its labels changes the table, never the fits
    flipped = y.clone()
    flipped[res.select_idx] = 1 - flipped[res.select_idx]
    other = LL.dfr(x, flipped, g, 2, seed=4, penalty="l1", grid=(1.0, 0.1, 0.01), n_subsets=3)
    assert [r["val_half2_worst_group_acc"] for r in other.table] != \
        [r["val_half2_worst_group_acc"] for r in res.table]
    # deterministic per seed
    again = LL.dfr(x, y, g, 2, seed=4, penalty="l1", grid=(1.0, 0.1, 0.01), n_subsets=3)
    assert torch.equal(again.head.weight, res.head.weight) and again.table == res.table


def test_the_retrained_head_replaces_only_the_last_layer():
    model = models.build_student(get_profile("smoke"), 2, seed=0)
    ds = _split("val", 40, 1)
    feats = LL.penultimate_features(model, ds)
    head = LL.LinearHead(torch.randn(2, feats.shape[1], dtype=torch.float64),
                         torch.randn(2, dtype=torch.float64))
    new = LL.with_head(model, head)
    before, after = train.predict(model, ds), train.predict(new, ds)
    torch.testing.assert_close(after.logits, head.logits(feats).float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(after.exit_logits, before.exit_logits)       # the exit untouched
    torch.testing.assert_close(train.predict(model, ds).logits, before.logits)  # a copy


def _split(split, n, seed, size=16):
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    a = (torch.arange(n) // 2) % 2
    x = 0.8 * torch.randn(n, 3, size, size, generator=gen)
    x[:, 0] += (2 * y - 1).float()[:, None, None]
    return GroupDataset("tiny", split, y, a, n_classes=2, n_attrs=2, group_names=NAMES,
                        ids=[f"{split}{i}" for i in range(n)], x=x, image_size=size)


def test_dfr_never_reads_test_and_is_recorded_like_every_student(tmp_path, monkeypatch):
    """students.run_dfr: two runs that differ only in their test split choose the same
    strength and the same last layer; the student and its (kd) exit are recorded."""
    profile = get_profile("smoke").replace(student_widths=(8, 16), student_blocks=(1, 1),
                                           image_size=16)
    model = models.build_student(profile, 2, seed=0)

    def fake_student(run_, cfg, seed, teacher=None, ckpt_dir=None, progress=True):
        assert cfg.method == "kd" and (cfg.lam, cfg.T) == (0.9, 4.0)
        return train.TrainResult(model, None, None, None, True, "fp", 1)

    monkeypatch.setattr(students, "train_student", fake_student)
    heads = []
    for k, test_seed in enumerate((2, 3)):
        splits = {"train": _split("train", 32, 0), "val": _split("val", 64, 1),
                  "test": _split("test", 24, test_seed)}
        run = rundir.Run(run_dir=tmp_path / f"r{k}", figures_dir=tmp_path, profile=profile,
                         dataset="synthetic", data_root=None, seeds=[0], device="cpu",
                         _splits=splits)
        cfg = losses.default_config("dfr", lam=0.9, T=4.0)
        res = students.run_method(run, "dfr", 0, config=cfg)
        heads.append((res.model.backbone.fc.weight.detach().clone(),
                       records.assemble(run.run_dir, "dfr", write=False)))
        m = records.assemble(run.run_dir, "metrics", write=False)
        assert set(zip(m.model, m.split)) == {("student", "val"), ("student", "test"),
                                              ("exit", "val"), ("exit", "test")}
        assert set(m.method) == {"dfr"} and set(m.config_id) == {cfg.config_id}
        assert not records.record_path(run.run_dir, "weights", f"dfr-{cfg.config_id}-seed0").exists()
    torch.testing.assert_close(heads[0][0], heads[1][0])
    assert heads[0][1].drop(columns=[]).equals(heads[1][1])
    assert heads[0][1].chosen.sum() == 1 and set(heads[0][1].C) == set(LL.C_GRID)
