"""The built-in image miniature, "birds on backgrounds": Waterbirds' group counts, the
synthetic generator (``make_synthetic``), the teacher's pretraining corpus
(``make_pretraining_corpus``) and the renderer both share. ``data.load_splits``
returns it for ``--dataset synthetic``; ``synthetic_text`` is its text counterpart.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .data import BIRD_GROUP_NAMES, IMAGENET_MEAN, IMAGENET_STD, SPLITS, GroupDataset

# Waterbirds' group counts per split, index g = 2*y + a:
# landbird on land, landbird on water, waterbird on land, waterbird on water.
WATERBIRDS_COUNTS = {
    "train": (3498, 184, 56, 1057),
    "val": (467, 466, 133, 133),
    "test": (2255, 2255, 642, 642),
}


def synthetic_counts(split: str, scale: float = 1.0, spurious_strength: float = 0.95):
    """Group counts of a synthetic split: Waterbirds' counts times ``scale`` (each >= 1).

    ``spurious_strength`` sets, in train only, the fraction of each class on its
    majority background; 0.95 reproduces Waterbirds' train counts exactly.
    """
    counts = list(WATERBIRDS_COUNTS[split])
    if split == "train" and spurious_strength != 0.95:
        if not 0.5 <= spurious_strength < 1:
            raise ValueError(f"spurious_strength must be in [0.5, 1), got {spurious_strength}")
        n0, n1 = counts[0] + counts[1], counts[2] + counts[3]
        maj0, maj1 = round(n0 * spurious_strength), round(n1 * spurious_strength)
        counts = [maj0, n0 - maj0, n1 - maj1, maj1]
    return [max(1, int(round(c * scale))) for c in counts]


def make_synthetic(*, image_size: int = 32, scale: float = 1.0, seed: int = 0,
                   spurious_strength: float = 0.95, reliability: float = 1.0,
                   colour_cue: float = 0.0, background_contrast: float = 1.0,
                   shape_size: tuple = (0.2, 0.3), noise: float = 0.06) -> dict[str, GroupDataset]:
    """"Birds on backgrounds", a miniature of Waterbirds: label y = foreground shape,
    spurious attribute a = background. Each split has its own sub-seed of ``seed``.

    Background (a): land = green-brown with blotches, water = blue with horizontal
    ripples — a colour and texture that fill the image, which an early layer sees at
    once. Foreground (y): a small cross (landbird) or ring (waterbird) at a random
    position, scale, rotation and colour — the harder feature. The knobs, one per
    property of the benchmark:

    * ``spurious_strength`` (0.95, Waterbirds'): in train, the fraction of each class
      on its majority background; val and test are balanced within each class.
    * ``reliability`` (1.0): the probability that the drawn shape is the label's. At
      1 the object is **100 % predictive** of y, as the bird is in Waterbirds, so a
      model that reads the background instead is relying on a spurious feature, not
      following the Bayes rule. Below 1 the shape is swapped for the other class's.
    * ``colour_cue`` (0.0): the probability that the shape's colour follows its class
      (landbirds dark, waterbirds light) instead of being drawn independently. At 0
      no pooled early feature reads the class for free: the shape must be recognised.
    * ``background_contrast`` scales how far apart the two background colours are;
      ``shape_size`` is the shape's radius range as a fraction of the side;
      ``noise`` the pixel noise std.

    The defaults are calibrated by ``bench/calibrate_synthetic.py`` with the teacher,
    the ERM student, its exit, ``group_balanced`` and plain ``kd`` only.
    """
    render = dict(reliability=reliability, colour_cue=colour_cue,
                  background_contrast=background_contrast, shape_size=shape_size, noise=noise)
    return {split: _synthetic_split("synthetic", split, synthetic_counts(split, scale, spurious_strength),
                                    image_size, seed=[int(seed), k, 20250], **render)
            for k, split in enumerate(SPLITS)}


def make_pretraining_corpus(*, n_per_pair: int = 2500, alignment: float = 0.5,
                            image_size: int = 32, seed: int = 0, val_fraction: float = 0.1,
                            **render) -> dict[str, GroupDataset]:
    """The miniature's "ImageNet": a corpus on which the teacher is pretrained before it
    ever sees the study's biased training split (the paper's larger, *pretrained*
    teacher). Same renderer as :func:`make_synthetic`, an independent seed stream.

    ``alignment`` is the corpus's own background–label alignment, the documented knob
    of the teacher's bias: the fraction of each class on its "own" background (landbirds
    on land, waterbirds on water). 0.5 is balanced over (class, background), so the
    background carries no information; towards 1 the teacher learns to lean on it.
    Each class has ``2 * n_per_pair`` images. Returns ``{"train", "val"}`` (the val part,
    ``val_fraction`` of each group, selects the pretraining epoch). ``render``:
    ``reliability``, ``colour_cue``, ``background_contrast``, ``shape_size``, ``noise``.
    """
    if not 0.0 <= alignment <= 1.0:
        raise ValueError(f"pretraining alignment must lie in [0, 1], got {alignment}")
    if n_per_pair < 1:
        raise ValueError(f"n_per_pair must be >= 1, got {n_per_pair}")
    n_class = 2 * int(n_per_pair)
    own = int(round(alignment * n_class))
    counts = [own, n_class - own, n_class - own, own]  # g = 2y + a: own background is a = y
    val = [int(round(c * val_fraction)) for c in counts]
    parts = {"train": [c - v for c, v in zip(counts, val)], "val": val}
    return {part: _synthetic_split("synthetic_pretrain", part, part_counts, image_size,
                                   seed=[int(seed), 100 + k, 20251], **render)
            for k, (part, part_counts) in enumerate(parts.items())}


def _synthetic_split(name: str, split: str, counts, image_size: int, *, seed, **render) -> GroupDataset:
    """One split with ``counts[g]`` images of group g (shuffled), rendered from ``seed``."""
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence(seed).generate_state(1)[0]))
    g = torch.repeat_interleave(torch.arange(4), torch.tensor(counts, dtype=torch.long))
    g = g[torch.randperm(len(g), generator=gen)]
    y, a = g // 2, g % 2
    x, drawn = _render_birds(y, a, image_size, gen, **render)
    ds = GroupDataset(name, split, y, a, n_classes=2, n_attrs=2, group_names=BIRD_GROUP_NAMES,
                      ids=[f"{name}-{split}-{i:05d}" for i in range(len(y))], x=x, image_size=image_size)
    ds.object_class = drawn  # the class of the shape actually drawn (== y at reliability 1)
    return ds


def _render_birds(y, a, size, gen, *, reliability=1.0, colour_cue=0.0, background_contrast=1.0,
                  shape_size=(0.2, 0.3), noise=0.06):
    """Images (N,3,size,size) float32, ImageNet-normalised, and the class of the shape
    drawn in each (N,); fully vectorised. Checks ``reliability`` and ``colour_cue``, the
    knobs every caller passes on."""
    if not 0.5 <= reliability <= 1:
        raise ValueError(f"reliability must be in [0.5, 1], got {reliability}")
    if not 0.0 <= colour_cue <= 1:
        raise ValueError(f"colour_cue must be in [0, 1], got {colour_cue}")
    n = len(y)
    u = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    row, col = coords.view(1, size, 1), coords.view(1, 1, size)
    af = a.float().view(n, 1, 1, 1)

    # background: base colour by type, per-image jitter
    land = torch.tensor([0.42, 0.46, 0.24]).view(1, 3, 1, 1)
    water = torch.tensor([0.22, 0.38, 0.62]).view(1, 3, 1, 1)
    mid, half = (land + water) / 2, (water - land) / 2 * background_contrast
    base = mid + (2 * af - 1) * half + (u(n, 3, 1, 1) - 0.5) * 0.16
    # texture: land blotches (2-D low-frequency), water ripples (horizontal stripes)
    f1, f2 = 1.5 + 2 * u(n, 1, 1), 1.5 + 2 * u(n, 1, 1)
    p1, p2 = 2 * math.pi * u(n, 1, 1), 2 * math.pi * u(n, 1, 1)
    blotch = torch.sin(2 * math.pi * f1 * row + p1) * torch.sin(2 * math.pi * f2 * col + p2)
    fr = 5 + 4 * u(n, 1, 1)
    ripple = torch.sin(2 * math.pi * fr * row + p1 + 0.6 * torch.sin(2 * math.pi * 2 * col + p2))
    texture = torch.where(a.view(n, 1, 1) == 1, ripple, blotch).unsqueeze(1)
    img = base + 0.07 * texture

    # foreground: drawn class = y, swapped with probability 1 - reliability
    flip = u(n) >= reliability
    drawn = torch.where(flip, 1 - y, y).view(n, 1, 1)
    radius = (shape_size[0] + (shape_size[1] - shape_size[0]) * u(n, 1, 1))  # fraction of side
    cy = radius + (1 - 2 * radius) * u(n, 1, 1)
    cx = radius + (1 - 2 * radius) * u(n, 1, 1)
    theta = 2 * math.pi * u(n, 1, 1)
    dy, dx = (row - cy) / radius, (col - cx) / radius  # shape units: radius 1
    cos, sin = torch.cos(theta), torch.sin(theta)
    pu, pv = cos * dx + sin * dy, -sin * dx + cos * dy
    # signed distances (negative inside), in shape units; ring and cross cover
    # similar areas (2.36 vs 2.15 squared radii), so size is no class cue either
    r = torch.sqrt(pu ** 2 + pv ** 2)
    ring = (r - 0.75).abs() - 0.25
    arm1 = torch.maximum(pu.abs() - 1.0, pv.abs() - 0.32)
    arm2 = torch.maximum(pu.abs() - 0.32, pv.abs() - 1.0)
    cross = torch.minimum(arm1, arm2)
    sd = torch.where(drawn == 1, ring, cross) * (radius * size)  # in pixels
    mask = (0.5 - sd).clamp(0, 1).unsqueeze(1)  # anti-aliased edge
    # colour: with probability colour_cue it follows the drawn class (dark landbirds,
    # light waterbirds, random hue), otherwise any colour, independent of the class
    c = u(n, 3, 1, 1)
    cued = (u(n) < colour_cue).view(n, 1, 1, 1)
    by_class = torch.where(drawn.view(n, 1, 1, 1) == 1, 0.65 + 0.35 * c, 0.35 * c)
    colour = torch.where(cued, by_class, c)
    img = img * (1 - mask) + colour * mask
    img = (img + noise * torch.randn(img.shape, generator=gen)).clamp(0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((img - mean) / std).float().contiguous(), drawn.view(n).clone()
