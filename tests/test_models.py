"""Teacher and early-exit student: shapes, the exit's gradient isolation, sizes,
local weights."""

import pytest
import torch
import torch.nn.functional as F

from fairkd_utils import models
from fairkd_utils.profiles import get_profile

TINY = get_profile("smoke").replace(student_widths=(8, 16, 32), student_blocks=(1, 1, 1),
                                    exit_stage=2)


def test_phi_tilde_appends_a_constant_one():
    phi = torch.randn(5, 3)
    out = models.phi_tilde(phi)
    assert out.shape == (5, 4)
    assert torch.equal(out[:, :3], phi) and torch.equal(out[:, 3], torch.ones(5))


def test_exit_head_is_a_bias_free_linear_on_phi_tilde():
    head = models.ExitHead(6, 3)
    assert head.linear.bias is None and head.linear.weight.shape == (3, 7)
    phi = torch.randn(4, 6)
    expected = phi @ head.linear.weight[:, :6].T + head.linear.weight[:, 6]
    torch.testing.assert_close(head(phi), expected)


def test_student_returns_final_logits_exit_logits_and_phi_of_the_exit_stage():
    student = models.build_student(TINY, n_classes=3, seed=0)
    out = student(torch.randn(4, 3, 16, 16))
    assert isinstance(out, models.StudentOutput)
    assert out.logits.shape == (4, 3) and out.exit_logits.shape == (4, 3)
    assert out.phi.shape == (4, 16)                 # width of stage 2
    assert student.exit_stage == 2 and student.detach_exit
    torch.testing.assert_close(out.exit_logits, student.exit(out.phi))


def test_teacher_returns_logits():
    teacher = models.build_teacher(get_profile("smoke"), n_classes=2, seed=0)
    assert teacher(torch.randn(3, 3, 16, 16)).shape == (3, 2)


def _backbone_grads(detach_exit):
    student = models.build_student(TINY, n_classes=2, seed=0, detach_exit=detach_exit)
    out = student(torch.randn(4, 3, 16, 16))
    F.cross_entropy(out.exit_logits, torch.tensor([0, 1, 0, 1])).backward()
    grads = [p.grad for p in student.backbone.parameters()]
    exit_grad = student.exit.linear.weight.grad
    return grads, exit_grad


def test_exit_loss_sends_no_gradient_to_the_backbone_when_detached():
    grads, exit_grad = _backbone_grads(detach_exit=True)
    assert all(g is None or not g.any() for g in grads)
    assert exit_grad is not None and exit_grad.abs().sum() > 0


def test_exit_loss_reaches_the_early_backbone_when_not_detached():
    grads, _ = _backbone_grads(detach_exit=False)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_default_teacher_is_clearly_larger_than_the_student():
    prof = get_profile("default")
    t = models.count_parameters(models.build_teacher(prof, 2, seed=0))
    s = models.count_parameters(models.build_student(prof, 2, seed=0))
    assert t > 3 * s


def test_seed_fixes_the_initialisation_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = models.build_student(TINY, 2, seed=7).state_dict()
    assert torch.equal(torch.random.get_rng_state(), before)
    b = models.build_student(TINY, 2, seed=7).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_missing_weights_file_gives_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        models.build_teacher(get_profile("smoke"), 2, weights_path=tmp_path / "nope.pt")


def test_narrow_student_weights_round_trip_through_a_local_file(tmp_path):
    a = models.build_student(TINY, 2, seed=1)
    torch.save(a.state_dict(), tmp_path / "s.pt")
    b = models.build_student(TINY, 2, weights_path=tmp_path / "s.pt", seed=2)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_torchvision_student_loads_imagenet_style_weights_but_keeps_its_own_classifier(tmp_path):
    import torchvision

    ref = torchvision.models.resnet18(weights=None)      # 1000-way fc, like ImageNet files
    torch.save(ref.state_dict(), tmp_path / "resnet18.pth")
    student = models.build_student(get_profile("paper"), 2, weights_path=tmp_path / "resnet18.pth")
    torch.testing.assert_close(student.backbone.stem[0].weight, ref.conv1.weight)
    assert student.backbone.fc.out_features == 2 and student.exit.in_features == 128   # layer2


def test_corrupt_weights_file_gives_a_clear_error(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="could not read weights file"):
        models.build_student(TINY, 2, weights_path=tmp_path / "bad.pt")
