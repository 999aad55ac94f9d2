"""Teacher and early-exit student networks.

``default``/``smoke`` profiles: narrow ResNets built here (torchvision's
``BasicBlock`` refuses ``base_width != 64``) with a small-image stem (one 3x3
conv, no max-pool) for 32 px inputs.  ``paper`` profile: torchvision ResNet-50
teacher and ResNet-18 student (ImageNet stem, 224 px), optionally initialised
from a local weights file the user names; nothing is downloaded.

Every backbone is exposed the same way -- ``stem``, ``stages`` (a ModuleList,
stage ``k`` is ``stages[k-1]``, for torchvision ResNets ``layer1..layer4``) and
``fc`` -- so the early exit reads any stage of either family.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
from torch import nn
import torch.nn.functional as F

__all__ = ["phi_tilde", "ExitHead", "StudentOutput", "BasicBlock", "ResNetBackbone", "NarrowResNet",
           "EarlyExitStudent", "build_teacher", "build_student", "build_backbone", "load_weights",
           "count_parameters"]


# --------------------------------------------------------------------------- exit
def phi_tilde(phi: torch.Tensor) -> torch.Tensor:
    """``[phi, 1]``: features with a constant 1 appended, so the exit's bias is a
    column of its weight matrix (the Laplace factors then cover it)."""
    return torch.cat([phi, phi.new_ones(phi.shape[:-1] + (1,))], dim=-1)


class ExitHead(nn.Module):
    """Early-exit readout ``Linear(D+1, C, bias=False)`` applied to ``phi_tilde(phi)``."""

    def __init__(self, in_features: int, n_classes: int):
        super().__init__()
        self.in_features = in_features
        self.n_classes = n_classes
        self.linear = nn.Linear(in_features + 1, n_classes, bias=False)
        nn.init.normal_(self.linear.weight, std=0.01)
        with torch.no_grad():
            self.linear.weight[:, -1].zero_()

    def forward(self, phi: torch.Tensor) -> torch.Tensor:
        return self.linear(phi_tilde(phi))


class StudentOutput(NamedTuple):
    """What a student's forward pass returns.

    logits: (N, C) final head; exit_logits: (N, C) early exit; phi: (N, D) the
    pooled early features the exit read (detached when the exit is detached)."""
    logits: torch.Tensor
    exit_logits: torch.Tensor
    phi: torch.Tensor


# --------------------------------------------------------------------------- narrow ResNet
class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs) of any width; the 1x1 projection
    shortcut is used when shape changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        projected = stride != 1 or in_ch != out_ch
        self.shortcut = (nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False),
                                       nn.BatchNorm2d(out_ch)) if projected else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class ResNetBackbone(nn.Module):
    """``stem -> stages[0..K-1] -> global average pool -> fc``; forward returns logits.

    ``stage_widths[k]`` is the channel count of stage ``k+1``'s output."""

    def __init__(self, stem: nn.Module, stages: Sequence[nn.Module], fc: nn.Linear,
                 stage_widths: Sequence[int]):
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.fc = fc
        self.stage_widths = tuple(int(w) for w in stage_widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for stage in self.stages:
            h = stage(h)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


class NarrowResNet(ResNetBackbone):
    """Small-image ResNet: 3x3 stem conv (no max-pool), ``len(widths)`` stages of
    ``blocks[k]`` BasicBlocks; stage 1 keeps the resolution, later ones halve it."""

    def __init__(self, widths: Sequence[int], blocks: Sequence[int], n_classes: int,
                 in_channels: int = 3):
        widths, blocks = tuple(widths), tuple(blocks)
        if not widths or len(widths) != len(blocks):
            raise ValueError(
                f"narrow ResNet needs one block count per width, got widths={widths} "
                f"blocks={blocks}; set e.g. widths=(16, 32, 64), blocks=(1, 1, 1) in the profile")
        stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        # stage k: one block from the previous width (stride 2 after stage 1), n - 1 more
        stages = [nn.Sequential(BasicBlock(w_in, w, stride=1 if k == 0 else 2),
                                *(BasicBlock(w, w) for _ in range(n - 1)))
                  for k, (w_in, w, n) in enumerate(zip(widths[:1] + widths[:-1], widths, blocks))]
        super().__init__(stem, stages, nn.Linear(widths[-1], n_classes), widths)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Zero-init the last BN of each residual branch: each block starts as the
        # identity, which trains faster and more stably (Goyal et al., 2017).
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)


def _torchvision_resnet(arch: str, n_classes: int, weights_path=None) -> ResNetBackbone:
    """torchvision ``resnet18``/``resnet50`` re-exposed as stem/stages/fc.  ImageNet
    weights (if given) are loaded before the classifier is replaced."""
    import torchvision

    net = getattr(torchvision.models, arch)(weights=None)
    if weights_path is not None:
        state = _read_state_dict(weights_path)
        # An ImageNet file has a 1000-way fc: keep only what fits our classifier.
        own = net.state_dict()
        if any(k.startswith("fc.") and k in own and v.shape != own[k].shape for k, v in state.items()):
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise ValueError(
                f"weights file {weights_path} does not fit torchvision {arch}: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {list(unexpected)[:5]}; pass a torchvision {arch} state_dict "
                f"(e.g. the file torchvision's {arch} ImageNet weights are stored in)")
    stages = [net.layer1, net.layer2, net.layer3, net.layer4]
    # a stage's width: its last block's last conv (conv3 in a Bottleneck, conv2 in a BasicBlock)
    widths = [getattr(stage[-1], "conv3", stage[-1].conv2).out_channels for stage in stages]
    return ResNetBackbone(nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool), stages,
                          nn.Linear(net.fc.in_features, n_classes), widths)


def _read_state_dict(path) -> dict:
    """A state_dict from a local file (plain, or inside our checkpoint format under
    ``"state_dict"``), loaded with ``weights_only=True``; clear errors otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file {path} does not exist; nothing is downloaded at run time -- "
            f"put the torchvision state_dict there or pass weights_path=None to start "
            f"from random initialisation")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle / zip errors: say what is wrong, not where
        raise ValueError(
            f"could not read weights file {path} ({type(exc).__name__}: {exc}); it must be a "
            f"state_dict saved with torch.save and loadable with weights_only=True -- "
            f"re-save it or pass another file") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"weights file {path} holds no state_dict (a dict of tensors)")
    return obj


def load_weights(model: nn.Module, weights_path) -> nn.Module:
    """Load a state_dict (ours, strict) from a local file into ``model``."""
    state = _read_state_dict(weights_path)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(
            f"weights file {weights_path} does not fit this model ({exc}); was it produced "
            f"with another profile's widths/blocks?") from None
    return model


def build_backbone(arch: str, widths: Sequence[int], blocks: Sequence[int], n_classes: int,
                   weights_path=None) -> ResNetBackbone:
    """A ResNet of the named family: ``narrow_resnet`` (ours), ``resnet18``, ``resnet50``."""
    if arch == "narrow_resnet":
        net = NarrowResNet(widths, blocks, n_classes)
        if weights_path is not None:
            load_weights(net, weights_path)
        return net
    if arch in ("resnet18", "resnet34", "resnet50"):
        return _torchvision_resnet(arch, n_classes, weights_path)
    raise ValueError(f"unknown architecture {arch!r}; use narrow_resnet, resnet18 or resnet50")


# --------------------------------------------------------------------------- student
class EarlyExitStudent(nn.Module):
    """A ResNet with an early exit: the global average pool of stage
    ``exit_stage``'s output is ``phi`` (N, D), read by an ``ExitHead``.

    With ``detach_exit=True`` (default) the exit trains on ``phi.detach()``: it
    reads out what the early layers encode without changing them (DeDiER)."""

    def __init__(self, backbone: ResNetBackbone, n_classes: int, exit_stage: int,
                 detach_exit: bool = True):
        super().__init__()
        n_stages = len(backbone.stages)
        if not 1 <= exit_stage <= n_stages:
            raise ValueError(
                f"exit_stage={exit_stage} but the student has stages 1..{n_stages}; "
                f"set the profile's exit_stage in that range")
        self.backbone = backbone
        self.exit_stage = int(exit_stage)
        self.detach_exit = bool(detach_exit)
        self.exit = ExitHead(backbone.stage_widths[exit_stage - 1], n_classes)

    def forward(self, x: torch.Tensor) -> StudentOutput:
        bb = self.backbone
        h = bb.stem(x)
        for k, stage in enumerate(bb.stages, start=1):
            h = stage(h)
            if k == self.exit_stage:
                phi = torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)
        logits = bb.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))
        if self.detach_exit:
            phi = phi.detach()
        return StudentOutput(logits, self.exit(phi), phi)


# --------------------------------------------------------------------------- builders
@contextlib.contextmanager
def _seeded(seed):
    """Initialise under ``torch.manual_seed(seed)`` without touching the caller's RNG."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def build_teacher(profile, n_classes: int, weights_path=None, *,
                  seed: int | None = None) -> ResNetBackbone:
    """The profile's teacher; ``forward(x) -> logits``.  ``weights_path``: optional
    local state_dict (ImageNet torchvision weights for ``paper``).  ``seed`` fixes
    the random initialisation (the global RNG is left as it was)."""
    with _seeded(seed):
        return build_backbone(profile.teacher_arch, profile.teacher_widths,
                              profile.teacher_blocks, n_classes, weights_path)


def build_student(profile, n_classes: int, weights_path=None, *, seed: int | None = None,
                  detach_exit: bool = True) -> EarlyExitStudent:
    """The profile's student with its early exit at ``profile.exit_stage``.

    For torchvision archs ``weights_path`` is a backbone (ImageNet) state_dict; for
    ``narrow_resnet`` it may be a full ``EarlyExitStudent`` state_dict.  ``seed``
    fixes the random initialisation (the global RNG is left as it was)."""
    narrow = profile.student_arch == "narrow_resnet"
    with _seeded(seed):
        backbone = build_backbone(profile.student_arch, profile.student_widths, profile.student_blocks,
                                  n_classes, None if narrow else weights_path)
        model = EarlyExitStudent(backbone, n_classes, profile.exit_stage, detach_exit)
        if narrow and weights_path is not None:
            whole = any(k.startswith("backbone.") for k in _read_state_dict(weights_path))
            load_weights(model if whole else model.backbone, weights_path)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
