"""The one training loop: it learns, it is deterministic, its checkpoints are
reused only for the same fingerprint, and it fails loudly."""

import math

import pytest
import torch
import torch.nn.functional as F

from fairkd_utils import checkpoints, models, profiles, train
from fairkd_utils.data import GroupDataset
from fairkd_utils.profiles import get_profile

TINY = get_profile("smoke").replace(
    teacher_widths=(8, 16), teacher_blocks=(1, 1),
    student_widths=(8, 16), student_blocks=(1, 1), exit_stage=1, image_size=16)
NAMES = ["y0 a0", "y0 a1", "y1 a0", "y1 a1"]


def _split(split, n, seed, size=16):
    """Tiny in-memory grouped data: the class shifts channel 0, the attribute channel 1."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    a = (torch.rand(n, generator=gen) < 0.3).long()
    x = 0.8 * torch.randn(n, 3, size, size, generator=gen)
    x[:, 0] += (2 * y - 1).float()[:, None, None]
    x[:, 1] += 0.5 * (2 * a - 1).float()[:, None, None]
    return GroupDataset("tiny", split, y, a, n_classes=2, n_attrs=2, group_names=NAMES,
                        ids=[f"{split}{i}" for i in range(n)], x=x, image_size=size)


@pytest.fixture(scope="module")
def splits():
    return {"train": _split("train", 192, 0), "val": _split("val", 96, 1),
            "test": _split("test", 96, 2)}


def _cfg(**kw):
    base = dict(epochs=2, batch_size=64, lr=0.05, seed=0, progress=False)
    base.update(kw)
    return train.TrainConfig(**base)


@pytest.fixture(scope="module")
def learned(splits):
    """A tiny student trained for 3 epochs (shared by the tests that only read it)."""
    return train.train_model(models.build_student(TINY, 2, seed=0), splits, _cfg(epochs=3))


def test_a_tiny_student_learns_well_above_chance(splits, learned):
    res = learned
    metrics = train.evaluate(res.model, splits["test"])
    assert metrics["avg_acc"] > 0.85          # chance is 0.5
    assert "exit_avg_acc" in metrics and res.history["val_avg_acc"].iloc[-1] > 0.85
    assert res.checkpoint is None and not res.reused


def test_the_same_seed_gives_the_same_metrics(splits, learned):
    again = train.train_model(models.build_student(TINY, 2, seed=0), splits, _cfg(epochs=3))
    runs = [learned, again]
    cols = [c for c in runs[0].history if not c.endswith("seconds")]  # timings differ
    assert runs[0].history[cols].equals(runs[1].history[cols])
    p0, p1 = (train.predict(r.model, splits["test"]) for r in runs)
    assert torch.equal(p0.logits, p1.logits) and torch.equal(p0.exit_logits, p1.exit_logits)


def test_the_kept_epoch_is_the_best_on_val_worst_group_accuracy(learned):
    res = learned
    h = res.history
    best = h.sort_values(["val_worst_group_acc", "val_avg_acc"], kind="stable",
                         ascending=False).iloc[0]
    assert res.best_epoch == best["epoch"] and h.loc[h.best, "epoch"].item() == res.best_epoch
    assert not any(c.startswith("test") for c in h)


def test_predict_returns_outputs_in_dataset_order_with_groups(splits):
    student = models.build_student(TINY, 2, seed=0)
    p = train.predict(student, splits["val"], batch_size=40)
    n = len(splits["val"])
    assert p.logits.shape == (n, 2) and p.exit_logits.shape == (n, 2) and p.phi.shape == (n, 8)
    assert p.logits.dtype == torch.float32
    assert torch.equal(p.g, splits["val"].g)
    student.eval()
    with torch.no_grad():
        torch.testing.assert_close(student(splits["val"].x[:5]).logits, p.logits[:5])
    tp = train.predict(models.build_teacher(TINY, 2, seed=0), splits["val"])
    assert tp.exit_logits is None and tp.phi is None


def test_checkpoint_is_reused_for_the_same_fingerprint_and_a_new_one_trains_a_new_file(
        splits, tmp_path):
    first = train.train_model(models.build_student(TINY, 2, seed=0), splits, _cfg(epochs=1),
                              ckpt_dir=tmp_path, name="student")
    assert first.checkpoint.name == f"student-{first.fingerprint}.pt" and not first.reused
    ck = torch.load(first.checkpoint, weights_only=True)       # plain tensors and values only
    assert ck["fingerprint"] == first.fingerprint and ck["history"]

    again = train.train_model(models.build_student(TINY, 2, seed=0), splits, _cfg(epochs=1),
                              ckpt_dir=tmp_path, name="student")
    assert again.reused and again.checkpoint == first.checkpoint
    assert again.history.equals(first.history)
    for k, v in first.model.state_dict().items():
        torch.testing.assert_close(again.model.state_dict()[k], v)

    other = train.train_model(models.build_student(TINY, 2, seed=0), splits,
                              _cfg(epochs=1, lr=0.01), ckpt_dir=tmp_path, name="student")
    assert not other.reused and other.checkpoint != first.checkpoint
    assert len(list(tmp_path.glob("student-*.pt"))) == 2


def test_corrupt_checkpoint_gives_a_clear_error_not_a_pickle_traceback(splits, tmp_path):
    res = train.train_model(models.build_teacher(TINY, 2, seed=0), splits, _cfg(epochs=1),
                            ckpt_dir=tmp_path, name="teacher")
    res.checkpoint.write_bytes(b"\x00garbage")
    with pytest.raises(checkpoints.CheckpointError, match="corrupt.*delete it"):
        train.train_model(models.build_teacher(TINY, 2, seed=0), splits, _cfg(epochs=1),
                          ckpt_dir=tmp_path, name="teacher")


def test_a_checkpoint_from_another_config_gives_a_clear_error(splits, tmp_path):
    res = train.train_model(models.build_teacher(TINY, 2, seed=0), splits, _cfg(epochs=1),
                            ckpt_dir=tmp_path, name="teacher")
    with pytest.raises(checkpoints.CheckpointError, match="produced by another config"):
        checkpoints.load_checkpoint(res.checkpoint, expected_fingerprint="0" * 16)
    # a foreign file under this config's name is refused too, not silently used
    fp = train.train_model(models.build_teacher(TINY, 2, seed=0), splits, _cfg(epochs=1, lr=0.2),
                           ckpt_dir=None, name="teacher").fingerprint
    res.checkpoint.rename(tmp_path / f"teacher-{fp}.pt")
    with pytest.raises(checkpoints.CheckpointError, match="another config"):
        train.train_model(models.build_teacher(TINY, 2, seed=0), splits, _cfg(epochs=1, lr=0.2),
                          ckpt_dir=tmp_path, name="teacher")


class _NaNAtSecondEpoch(train.CrossEntropyObjective):
    def loss(self, out, batch, epoch):
        loss, w = super().loss(out, batch, epoch)
        return (loss * float("nan") if epoch == 1 else loss), w


def test_a_nan_loss_stops_training_with_a_clear_error_and_writes_no_checkpoint(splits, tmp_path):
    with pytest.raises(train.NonFiniteLossError, match=r"epoch 2, step 1"):
        train.train_model(models.build_student(TINY, 2, seed=0), splits, _cfg(),
                          _NaNAtSecondEpoch(), ckpt_dir=tmp_path, name="student")
    assert not list(tmp_path.iterdir())


class _GroupWeights:
    """Weights equal to the instance's group index (ce) and twice it (kd)."""

    def __init__(self):
        self.epochs_seen, self.ended = [], []

    def loss(self, out, batch, epoch):
        self.epochs_seen.append(epoch)
        g = (2 * batch.y + batch.a).float()
        assert isinstance(out, models.StudentOutput) and out.phi.shape[0] == len(batch.idx)
        return F.cross_entropy(out.logits, batch.y), {"ce": g, "kd": 2 * g}

    def on_epoch_end(self, epoch):
        self.ended.append(epoch)


def test_the_loop_logs_each_epochs_mean_weight_per_group_from_the_objective(splits):
    obj = _GroupWeights()
    res = train.train_model(models.build_student(TINY, 2, seed=0), splits, _cfg(), obj)
    assert obj.ended == [0, 1] and sorted(set(obj.epochs_seen)) == [0, 1]
    w = res.weights
    assert list(w.columns) == list(train.WEIGHT_COLUMNS) and len(w) == 2 * 4
    assert (w["mean_weight_ce"] == w["group"]).all()
    assert (w["mean_weight_kd"] == 2 * w["group"]).all()
    assert (w.groupby("epoch")["n"].sum() == len(splits["train"])).all()


def test_erm_logs_no_weights_and_train_config_follows_the_profile(learned):
    assert learned.weights.empty and list(learned.weights.columns) == list(train.WEIGHT_COLUMNS)
    cfg = train.TrainConfig.from_profile(get_profile("default"), "student", seed=2)
    assert cfg.epochs == get_profile("default").student_epochs and cfg.seed == 2
    with pytest.raises(ValueError, match="optimizer"):
        train.TrainConfig(epochs=1, optimizer="rmsprop")


def test_adamw_trains_too(splits):
    res = train.train_model(models.build_teacher(TINY, 2, seed=0), splits,
                            _cfg(epochs=1, optimizer="adamw", lr=1e-3))
    assert math.isfinite(res.history["train_loss"].iloc[0])


def test_paper_configuration_trains_a_few_steps_on_a_fake_waterbirds_folder(tmp_path):
    """The GPU profile's code path (torchvision ResNet-50 teacher, ResNet-18 student
    with its exit at layer2, the Waterbirds loader with its transforms and
    augmentation) runs on the CPU at 64 px, so it is never first exercised on a GPU."""
    from fakes import make_fake_waterbirds

    from fairkd_utils.data import load_splits

    make_fake_waterbirds(tmp_path / "wb")
    paper = get_profile("paper")
    sp = load_splits("waterbirds", tmp_path / "wb", image_size=64, augment=paper.augment)
    assert sp["train"].augment and not sp["train"].in_memory
    for role, build in (("teacher", models.build_teacher), ("student", models.build_student)):
        model = build(paper, 2, seed=0)
        cfg = train.TrainConfig.from_profile(paper, role, epochs=1, batch_size=6, progress=False)
        res = train.train_model(model, sp, cfg, ckpt_dir=tmp_path / "ck", name=role)
        assert math.isfinite(res.history["train_loss"].iloc[0]) and res.checkpoint.exists()
        p = train.predict(res.model, sp["test"], batch_size=4)
        assert p.logits.shape == (len(sp["test"]), 2) and torch.isfinite(p.logits).all()
        if role == "student":
            assert res.model.exit_stage == 2 and p.phi.shape == (len(sp["test"]), 128)


def test_warm_up_epochs_are_never_kept(splits):
    res = train.train_model(models.build_student(TINY, 2, seed=0), splits,
                            _cfg(epochs=3, select_after=2))
    assert res.best_epoch == 3
    with pytest.raises(ValueError, match="select_after"):
        _cfg(epochs=2, select_after=2)


def test_predictions_never_see_training_augmentation(splits):
    model = models.build_student(TINY, 2, seed=0)
    ds = splits["train"]
    plain = train.predict(model, ds)
    ds.augment = True
    try:
        augmented = train.predict(model, ds)
        assert ds.augment  # restored
    finally:
        ds.augment = False
    assert torch.equal(plain.logits, augmented.logits)


@pytest.mark.parametrize("method", ["kd", "dedier_both", "laplace_kd", "shuffled", "group_balanced",
                                    "erm", "group_balanced_erm", "jtt", "dedier_final"])
def test_a_branch_from_the_shared_warmup_equals_a_run_from_scratch(splits, tmp_path, method):
    """Every method trains with unit weights during the warm-up (distillation methods
    are kd, lam = 0 methods plain cross-entropy): branching it from one warm-up state
    per seed ends exactly where training from scratch ends (jtt's weights, too, start
    after the warm-up)."""
    from fairkd_utils import losses

    ds = splits["train"]
    teacher = torch.randn(len(ds), 2, generator=torch.Generator().manual_seed(5)) * 2
    lam = 0.5 if profiles.METHOD_SPECS[method].distils else 0.0
    config = losses.default_config(method, lam=lam, T=2.0 if lam else 1.0, beta=2.0, warmup_epochs=2)
    # with a learning-rate warm-up that outlasts the shared warm-up's first epoch
    tcfg = _cfg(epochs=4, select_after=2, lr_warmup=0.4 if method in ("kd", "erm") else 0.0)

    if method == "jtt":
        config = losses.default_config(method, lam=lam, T=2.0, jtt_epochs=1, jtt_upweight=5.0,
                                       warmup_epochs=2)
    error_set = torch.arange(len(ds)) % 5 == 0

    def objective(model):
        return losses.make_objective(config, teacher_logits=teacher, group_counts=ds.group_counts(),
                                     n_train=len(ds), n_classes=2, model=model, seed=3,
                                     error_set=error_set)

    scratch_model = models.build_student(TINY, 2, seed=1)
    scratch = train.train_model(scratch_model, splits, tcfg, objective(scratch_model))
    trunk = models.build_student(TINY, 2, seed=1)
    warm = train.train_warmup(trunk, splits, tcfg, losses.warmup_objective(config, teacher, len(ds), 2),
                              2, ckpt_dir=tmp_path, name="warmup")
    assert warm["epoch"] == 2 and len(list(tmp_path.glob("warmup-*.pt"))) == 1
    again = train.train_warmup(models.build_student(TINY, 2, seed=1), splits, tcfg,
                               losses.warmup_objective(config, teacher, len(ds), 2), 2,
                               ckpt_dir=tmp_path, name="warmup")  # cached, read back
    branch_model = models.build_student(TINY, 2, seed=1)
    branched = train.train_model(branch_model, splits, tcfg, objective(branch_model), branch_from=again)

    assert branched.fingerprint == scratch.fingerprint and branched.best_epoch == scratch.best_epoch
    for k, v in scratch.model.state_dict().items():
        assert torch.equal(v, branched.model.state_dict()[k]), k
    pd_cols = [c for c in scratch.history.columns if "seconds" not in c]
    assert scratch.history[pd_cols].equals(branched.history[pd_cols])
    assert scratch.weights.equals(branched.weights)


def test_lr_warmup_rises_linearly_then_follows_the_cosine(splits):
    # 12 steps, 6 of warm-up: 1/6 .. 6/6, then the cosine over the other 6 (hand-written)
    c = [0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(7)]
    want = [1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0, *c[:6], c[6]]
    assert [train.lr_factor(s, 12, 6) for s in range(13)] == pytest.approx(want)
    plain = [0.5 * (1 + math.cos(math.pi * s / 12)) for s in range(13)]
    assert [train.lr_factor(s, 12) for s in range(13)] == pytest.approx(plain)   # no warm-up
    # the loop: 192 training items, batch 64 -> 3 steps an epoch, 12 in all, 6 of warm-up;
    # the rate logged after epoch 1 lies inside the warm-up
    res = train.train_model(models.build_teacher(TINY, 2, seed=0), splits,
                            _cfg(epochs=4, lr_warmup=0.5, lr=0.05))
    assert res.history["lr"].tolist() == pytest.approx([0.05 * want[s] for s in (3, 6, 9, 12)])
    with pytest.raises(ValueError, match="lr_warmup=1"):
        _cfg(lr_warmup=1)


def test_exit_lr_scale_moves_only_the_detached_exit_head(splits):
    """The exit's own learning rate: its groups run at lr * exit_lr_scale; the exit reads
    detached features, so under ERM (which does not read the exit) every other weight
    trains exactly as at scale 1."""
    model = models.build_student(TINY, 2, seed=0)
    opt = train._make_optimizer(model, _cfg(lr=0.05, exit_lr_scale=10))
    exit_ids = {id(p) for p in model.exit.parameters()}
    for group in opt.param_groups:
        ids = {id(p) for p in group["params"]}
        assert ids <= exit_ids or not ids & exit_ids                # no group mixes them
        assert group["lr"] == pytest.approx(0.5 if ids and ids <= exit_ids else 0.05)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    plain = train._make_optimizer(model, _cfg(lr=0.05))
    assert len(plain.param_groups) == 2                              # scale 1: as before
    one = train.train_model(models.build_student(TINY, 2, seed=0), splits, _cfg(epochs=2))
    ten = train.train_model(models.build_student(TINY, 2, seed=0), splits, _cfg(epochs=2, exit_lr_scale=10))
    a, b = one.model.state_dict(), ten.model.state_dict()
    for k in a:
        same = torch.equal(a[k], b[k])
        assert same != k.startswith("exit."), k                    # only the exit differs
    with pytest.raises(ValueError, match="exit_lr_scale=0"):
        _cfg(exit_lr_scale=0)
    student = train.TrainConfig.from_profile(TINY.replace(exit_lr_scale=4.0), "student")
    teacher = train.TrainConfig.from_profile(TINY.replace(exit_lr_scale=4.0), "teacher")
    assert student.exit_lr_scale == 4.0 and teacher.exit_lr_scale == 1.0
